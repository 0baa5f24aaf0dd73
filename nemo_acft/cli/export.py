"""``acft-export``: turn an ACFT ``.nemo`` (with the head) into the plain GPT ``.nemo`` to serve,
or re-write it with the head. Under torchrun for a model that needs TP > 1 (the ``.nemo`` is
restored at ``--tensor-model-parallel-size``, resharded)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nemo_acft.errors import InputError, entry_point


@entry_point
def main(argv=None) -> None:
    """``acft-export --nemo IN --out OUT [--with-head] [--overwrite]``"""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nemo", required=True, help="an ACFT .nemo (MegatronGPTACFTModel)")
    parser.add_argument("--out", required=True, help="the .nemo to write")
    parser.add_argument("--with-head", action="store_true",
                        help="keep the NADO head (for guided decoding); default: plain GPT")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (otherwise refused)")
    args = parser.parse_args(argv)
    src, out = Path(args.nemo), Path(args.out)
    from nemo_acft.models.nemo_file import check_nemo

    check_nemo(src, "--nemo")
    if out.suffix != ".nemo":
        raise InputError(f"--out {out}: expected a path ending in .nemo")
    if out.exists() and not args.overwrite:
        raise InputError(f"--out {out} exists; pass --overwrite to replace it, or choose "
                         "another path")
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    from nemo_acft.algorithms.setup import quiet_libraries

    quiet_libraries()
    if "acft" not in MegatronGPTModel.restore_from(str(src), return_config=True):
        raise InputError(f"--nemo {src}: not an ACFT .nemo (its config has no 'acft'); a plain "
                         "GPT .nemo needs no export")
    import torch.distributed as dist

    from nemo_acft.cli.load import load_nemo
    from nemo_acft.models.export import export_plain_gpt, export_with_head

    got = load_nemo(str(src), tp=args.tensor_model_parallel_size)
    if args.with_head:
        export_with_head(got.model, args.out)
    else:
        export_plain_gpt(got.model, args.out)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"wrote {args.out} ({'with' if args.with_head else 'without'} the NADO head)")


if __name__ == "__main__":
    main()
