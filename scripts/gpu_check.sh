#!/usr/bin/env bash
# The GPU check: on one CUDA GPU with the GPU stack installed (containers/Dockerfile.gpu: the
# NGC NeMo image, nemo-toolkit 2.5.0, megatron-core 0.13.1, Transformer Engine), run
#   1. the model and math tests that run in one process on the GPU (the engine's steps, θ/φ
#      checkpoints and .nemo round trip, sampling, the fused loss, the math);
#   2. the built-in default end to end (acft-train, sequential, then parallel with both groups
#      on the one GPU is not possible: NCCL needs a GPU per rank, so the parallel schedule runs
#      on 2 GPUs only when there are 2);
#   3. NeMo's own MegatronGPTModel.generate on the exported acft_gpt.nemo (it needs CUDA).
# Writes $OUT (default gpu_check/) with each step's log and summary.json. CI never runs this.
#
#   bash scripts/gpu_check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 ACFT_CACHE_DIR="$OUT/cache"
status=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, record the exit code
    local name=$1; shift
    local t0=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
    [[ $rc == 0 ]] || status=1
}
$PY - <<'PY' | tee "$OUT/device.txt"
import torch, importlib.metadata as md
assert torch.cuda.is_available(), "no CUDA device: this is the GPU check"
print(torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| torch", torch.__version__,
      "| megatron-core", md.version("megatron-core"), "| nemo-toolkit", md.version("nemo-toolkit"))
PY
[[ ${PIPESTATUS[0]} == 0 ]] || exit 2
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")

# 1. the model tests (worlds larger than the GPU count skip themselves: NCCL needs a GPU each)
step tests $PY -m pytest -q -p no:cacheprovider -rs tests/test_nado_math.py \
    tests/test_fused_loss.py tests/test_engine.py tests/test_sampling.py tests/test_nado_training.py

# 2. the built-in default, bf16 (NeMo's autocast), then the parallel schedule where 2 GPUs exist
step default $PY -m nemo_acft.train run_dir="$OUT/default" trainer.precision=bf16 progress=false
cp "$OUT/default/summary.json" "$OUT/summary.json" 2>/dev/null
if [[ $NGPU -ge 2 ]]; then
    step parallel $PY -m nemo_acft.train run_dir="$OUT/parallel" schedule=parallel \
        trainer.precision=bf16 progress=false
fi

# 3. NeMo's own generate on the served .nemo
step nemo_generate $PY - "$OUT/default/export/acft_gpt.nemo" <<'PY'
import sys
from lightning.pytorch import Trainer
from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy
trainer = Trainer(accelerator="gpu", devices=1, strategy=NLPDDPStrategy(), logger=False)
model = MegatronGPTModel.restore_from(sys.argv[1], trainer=trainer)
out = model.generate(["my neighbour said the weather"], {"max_length": 12, "min_length": 1},
                     {"use_greedy": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                      "repetition_penalty": 1.0, "add_BOS": False, "all_probs": False,
                      "compute_logprob": False, "end_strings": ["<|endoftext|>"]})
print(out["sentences"][0])
PY
echo "gpu check: $( [[ $status == 0 ]] && echo passed || echo FAILED ); logs in $OUT"
exit $status
