#!/usr/bin/env bash
# Issue 16's GPU mode as one prepared script of a few minutes (never in CI): on one CUDA GPU with
# the GPU stack (containers/Dockerfile.gpu: nemo-toolkit 2.5.0, megatron-core 0.13.1, Transformer
# Engine where installed), bf16:
#   1. step_overhead.py --device cuda: a ~1B GPT (hidden 2048, 16 layers, 4 x 2048 tokens) with a
#      32k and a 128k vocabulary, every variant (SFT, ACFT, unfused, frozen reference, compiled):
#      step time, peak memory (torch.cuda.max_memory_allocated), FLOP-predicted ratios, MFU;
#   2. sampling.py --device cuda: ours against megatron-core's StaticInferenceEngine and the
#      recompute loop on the small model and the 1B (32k), batch 1 / 16 / 64.
# Writes $OUT (default gpu_bench/): each JSON + PNG, each step's log, device.txt. Prepared on CPU;
# not yet run on a GPU (no GPU was lent when it was written): expect to fix it on first contact.
#
#   bash scripts/gpu_bench.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_bench}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS CMD...: run under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
    [[ $rc == 0 ]] || status=1
}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$OUT/device.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || exit 2
step step_overhead 360 $PY benchmarks/step_overhead.py --device cuda --repeats 3 --warmup 2 \
    --json "$OUT/step_overhead_gpu.json"
step sampling 180 $PY benchmarks/sampling.py --device cuda --models small,1b_32k \
    --batches 1,16,64 --repeats 3 --json "$OUT/sampling_gpu.json"
echo "gpu bench: $( [[ $status == 0 ]] && echo done || echo 'FAILED (see the logs)' ); $OUT"
exit $status
