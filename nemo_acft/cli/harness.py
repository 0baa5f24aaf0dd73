"""``acft-harness``: lm-evaluation-harness tasks on a run's θ_k or a ``.nemo`` (``pip install
.[harness]``); see :mod:`nemo_acft.eval.lm_harness`.

    acft-harness --run-dir runs/big --tasks piqa,hellaswag,toxigen --out eval/harness
    acft-harness --nemo acft_gpt.nemo --tasks mmlu --num-fewshot 5 --out eval/harness_mmlu
    acft-harness --run-dir runs/big --store nado_decoding --tasks piqa --out eval/nado
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nemo_acft.cli.eval import check_output, output_folder, run_lock_for
from nemo_acft.cli.load import STORES
from nemo_acft.errors import entry_point


def registered():
    """The adapter under the harness's model name ``nemo_acft``: ``lm_eval --model nemo_acft
    --model_args run_dir=R[,store=S,iteration=K,guided=True]`` or ``nemo=F.nemo`` (after
    importing this module)."""
    from lm_eval.api.registry import register_model

    from nemo_acft.eval.lm_harness import ACFTHarnessLM

    @register_model("nemo_acft")
    class NeMoACFTLM(ACFTHarnessLM):
        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config=None):  # noqa: D102
            from lm_eval.utils import simple_parse_args_string

            from nemo_acft.cli.load import load_nemo, load_run

            args = {**simple_parse_args_string(arg_string), **(additional_config or {})}
            bs = args.pop("batch_size", 16)
            args.pop("device", None)
            guided = bool(args.pop("guided", False))
            if args.get("run_dir"):
                got = load_run(args.pop("run_dir"), args.pop("store", "exchange"),
                               args.pop("iteration", None), guided)
            else:
                got = load_nemo(args.pop("nemo"), guided)
            return cls(got.model, got.tokenizer, int(got.model.cfg.encoder_seq_length),
                       batch_size=int(bs) if str(bs).isdigit() else 16, guided=got.guided,
                       **args)

    return NeMoACFTLM


@entry_point
def main(argv=None) -> None:
    """``acft-harness --run-dir R | --nemo F --tasks T --out O``"""
    ap = argparse.ArgumentParser(description="lm-evaluation-harness tasks on an ACFT checkpoint")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="an acft-train run directory")
    src.add_argument("--nemo", help="a GPT .nemo (or an ACFT .nemo with the head)")
    ap.add_argument("--store", default="exchange", choices=STORES)
    ap.add_argument("--iteration", type=int, default=None)
    ap.add_argument("--guided", action="store_true", help="score with q ∝ p·R^guidance")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--tasks", required=True,
                    help="comma-separated harness tasks (e.g. piqa,hellaswag,winogrande,"
                         "arc_easy,arc_challenge,boolq,social_iqa,openbookqa,mmlu,toxigen)")
    ap.add_argument("--include-path", help="a folder of extra task YAMLs (local data)")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--limit", type=float, default=None, help="examples per task (testing)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ap.add_argument("--out", required=True, help="folder for results.json")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an --out folder that holds anything (otherwise refused)")
    args = ap.parse_args(argv)
    check_output(Path(args.out), args.overwrite)
    with run_lock_for(args):
        _harness(args)


def _harness(args) -> None:
    """Load the checkpoint, run the tasks, write ``results.json``."""
    import lm_eval
    import torch.distributed as dist
    from lm_eval.tasks import TaskManager

    from nemo_acft.cli.load import load_nemo, load_run
    from nemo_acft.eval.lm_harness import ACFTHarnessLM
    from nemo_acft.io_utils import atomic_write

    if args.run_dir:
        got = load_run(args.run_dir, args.store, args.iteration, args.guided,
                       args.tensor_model_parallel_size)
    else:
        got = load_nemo(args.nemo, args.guided, args.tensor_model_parallel_size)
    lm = ACFTHarnessLM(got.model, got.tokenizer, int(got.model.cfg.encoder_seq_length),
                       batch_size=args.batch_size, guided=got.guided, guidance=args.guidance)
    res = lm_eval.simple_evaluate(model=lm, tasks=args.tasks.split(","),
                                  num_fewshot=args.num_fewshot, limit=args.limit,
                                  task_manager=TaskManager(include_path=args.include_path),
                                  log_samples=False)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    out = Path(args.out)
    with output_folder(out) as tmp, atomic_write(tmp / "results.json") as fh:
        json.dump({"results": res["results"], "configs": res.get("configs", {}),
                   "checkpoint": got.label, "guided": got.guided}, fh, indent=1, default=str)
    for task, metrics in res["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
