"""``acft-convert``: Hugging Face Llama-family checkpoints in and out.

    acft-convert hf-to-nemo --hf DIR --out model.nemo [--tensor-model-parallel-size T]
    acft-convert nemo-to-hf --nemo model.nemo --out DIR

``hf-to-nemo`` writes a ``.nemo`` stock ``MegatronGPTModel`` restores and ``acft-train``
fine-tunes (``model.restore_from_path=model.nemo``); ``T`` is the largest tensor-parallel size it
will be trained at (heads, KV groups and FFN width are checked against it, the vocabulary is
padded for it). ``nemo-to-hf`` takes any GPT or ACFT ``.nemo`` of that architecture (a run's
``export/acft_gpt.nemo``) and writes a folder ``AutoModelForCausalLM.from_pretrained`` loads.
Both run in one process (no GPU needed) and write to a temporary name, renamed when complete;
an existing output is refused unless ``--overwrite`` (then replaced whole, at the end); bad
input is a one-line ``error: ...`` (exit 2) before anything is written. The mapping: :mod:`nemo_acft.models.hf_convert`.
"""

from __future__ import annotations

import argparse

from nemo_acft.errors import InputError, entry_point


@entry_point
def main(argv=None) -> None:
    """``acft-convert hf-to-nemo|nemo-to-hf ...``"""
    parser = argparse.ArgumentParser(prog="acft-convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-nemo", help="an HF Llama-family folder -> a .nemo")
    a.add_argument("--hf", required=True, help="the HF folder (config.json, weights, tokenizer)")
    a.add_argument("--out", required=True, help="the .nemo to write")
    a.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="the largest TP size the .nemo will be trained at (checked)")
    a.add_argument("--seq-length", type=int, default=None,
                   help="encoder_seq_length (default: max_position_embeddings)")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    a.add_argument("--precision", default="bf16",
                   help="the .nemo's precision key (weights are stored as loaded); default bf16")
    b = sub.add_parser("nemo-to-hf", help="a GPT / ACFT .nemo -> an HF folder")
    b.add_argument("--nemo", required=True, help="the .nemo (e.g. run_dir/export/acft_gpt.nemo)")
    b.add_argument("--out", required=True, help="the HF folder to write")
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    for p in (a, b):
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out (otherwise refused)")
    args = parser.parse_args(argv)

    from nemo_acft.algorithms.setup import quiet_libraries
    from nemo_acft.models.hf_convert import ConversionError, hf_to_nemo, nemo_to_hf

    quiet_libraries()
    try:
        if args.command == "hf-to-nemo":
            out = hf_to_nemo(args.hf, args.out, tp=args.tensor_model_parallel_size,
                             seq_length=args.seq_length,
                             divisible_by=args.make_vocab_size_divisible_by,
                             precision=args.precision, overwrite=args.overwrite)
        else:
            out = nemo_to_hf(args.nemo, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except ConversionError as e:
        raise InputError(f"acft-convert {args.command}: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
