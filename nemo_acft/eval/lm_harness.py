"""An lm-evaluation-harness model for our checkpoints (``pip install .[harness]``).

The utility and detection metrics of METHOD.md at scale: the commonsense tasks (piqa, hellaswag,
winogrande, arc_easy, arc_challenge, boolq, social_iqa, openbookqa), MMLU and ``toxigen``::

    acft-harness --run-dir runs/big --tasks piqa,hellaswag,toxigen --out eval/harness
    acft-harness --nemo acft_gpt.nemo --tasks mmlu --num-fewshot 5 --out eval/harness_mmlu
    acft-harness --run-dir runs/big --store nado_decoding --tasks piqa --out eval/nado

:class:`ACFTHarnessLM` implements the harness's three request types on a megatron-core GPT (ours,
or the one inside a NeMo ``.nemo``): ``loglikelihood`` (the multiple-choice tasks),
``loglikelihood_rolling`` (perplexity tasks) and ``generate_until`` (greedy). With a NADO head
and ``guided=True`` every log-probability is NADO decoding's ``q ∝ p·R^β`` instead of p, so the
decoding baseline is evaluated on the same tasks. Tasks download their data from the Hugging Face
hub; this machine has none, so the tests run the adapter through the harness's evaluator on a
task defined from a local file, and the hub tasks were not run here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - the optional dependency
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install "
                      "'nemo-acft[harness]' (or pip install lm-eval)") from e


@register_model("nemo_acft")
class ACFTHarnessLM(LM):
    """``model``: a single-stage megatron-core GPT (``GPTModel`` or ``GPTNADOModel``) with
    ``tokenizer`` (``encode``/``decode``/``eos_id``), real vocabulary ``vocab_size`` and context
    ``max_length``."""

    def __init__(self, model, tokenizer, vocab_size: int, max_length: int, batch_size: int = 16,
                 guided: bool = False, guidance: float = 1.0, max_gen_toks: int = 64):
        super().__init__()
        if guided and not getattr(model, "head_enabled", False):
            raise ValueError("guided=True needs a model with a NADO head (GPTNADOModel)")
        self.model, self.tok, self.vocab_size = model, tokenizer, vocab_size
        self.max_length, self.batch_size = max_length, batch_size
        self.guided, self.guidance, self.max_gen_toks = guided, guidance, max_gen_toks

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """``lm_eval --model nemo_acft --model_args run_dir=R[,store=S,iteration=K,guided=True]``
        or ``nemo=F.nemo``."""
        from lm_eval.utils import simple_parse_args_string

        args = {**simple_parse_args_string(arg_string), **(additional_config or {})}
        bs = args.pop("batch_size", 16)
        args.pop("device", None)
        model, tok, vocab, seq, guided = load_checkpoint(
            run_dir=args.pop("run_dir", None), nemo=args.pop("nemo", None),
            store=args.pop("store", "exchange"), iteration=args.pop("iteration", None),
            guided=bool(args.pop("guided", False)))
        return cls(model, tok, vocab, seq, batch_size=int(bs) if str(bs).isdigit() else 16,
                   guided=guided, **args)

    # --- log-probabilities ---------------------------------------------------------------

    @torch.no_grad()
    def _log_probs(self, seqs: Sequence[Sequence[int]]) -> List[torch.Tensor]:
        """For each token list, ``[len − 1, V]`` next-token log-probabilities (p, or q when
        guided) at positions 0..len−2."""
        from nemo_acft.nado import guided_log_probs

        self.model.eval()
        width = max(len(s) for s in seqs) - 1
        x = torch.full((len(seqs), max(width, 1)), self.tok.eos_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, :len(s) - 1] = torch.as_tensor(s[:-1])
        out = self.model(x, torch.arange(x.shape[1]).expand_as(x), None)
        z, s = out if isinstance(out, tuple) else (out, None)
        z = z[..., :self.vocab_size].float()
        if self.guided:
            lp = guided_log_probs(z, s[..., :self.vocab_size], None, self.guidance)
        else:
            lp = torch.log_softmax(z, -1)
        return [lp[i, :len(s) - 1] for i, s in enumerate(seqs)]

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """As the harness's own models: trailing spaces of the context move to the
        continuation, and the continuation's tokens are those of the whole text after the
        context's."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        return ctx, whole[len(ctx):]

    def _score(self, pairs: Sequence[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """Σ log-prob of each continuation given its context (left-truncated to the model's
        length), and whether it is the greedy continuation."""
        results = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            seqs = [((ctx or [self.tok.eos_id]) + cont)[-(self.max_length + 1):]
                    for ctx, cont in chunk]
            for (ctx, cont), seq, lp in zip(chunk, seqs, self._log_probs(seqs)):
                n = len(cont)
                if n == 0:
                    results.append((0.0, True))
                    continue
                rows = lp[-n:]
                target = torch.as_tensor(seq[-n:])
                logp = rows.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                results.append((float(logp.double().sum()),
                                bool((rows.argmax(-1) == target).all())))
        return results

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:  # noqa: D102
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> List[float]:  # noqa: D102
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            tokens = self.tok.encode(req.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                tokens, self.tok.eos_id, self.max_length, 1)]
            out.append(sum(ll for ll, _ in self._score(windows)))
        return out

    def generate_until(self, requests) -> List[str]:  # noqa: D102
        from nemo_acft.sampling import SamplingParams, generate

        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = (self.tok.encode(context) or [self.tok.eos_id])[-max(self.max_length - n, 1):]
            params = SamplingParams(max_new_tokens=n, top_k=1, eos_id=self.tok.eos_id,
                                    guidance=self.guidance)  # top_k=1: greedy
            s = generate(self.model, [ids], params, vocab_size=self.vocab_size,
                         guided=self.guided)
            text = self.tok.decode(s.tokens[0, s.prompt_lengths[0]:s.lengths[0]].tolist())
            cut = min([text.find(u) for u in until if u and u in text], default=len(text))
            out.append(text[:cut])
        return out


def load_checkpoint(run_dir: Optional[str] = None, nemo: Optional[str] = None,
                    store: str = "exchange", iteration: Optional[int] = None,
                    guided: bool = False):
    """(model, tokenizer, vocab size, context length, guided) of an ``acft-train`` run
    directory or a GPT ``.nemo`` (the loaders of ``acft-eval``)."""
    from nemo_acft.eval.cli import load_nemo, load_run

    if (run_dir is None) == (nemo is None):
        raise ValueError("give exactly one of run_dir and nemo")
    if run_dir is not None:
        model, tok, vocab, cfg, _, _, guided = load_run(
            Path(run_dir), store, None if iteration is None else int(iteration), guided)
        return model, tok, vocab, int(cfg["model"]["seq_length"]), guided
    if guided:
        raise ValueError("guided decoding needs a run directory (the NADO head)")
    model, tok, vocab, seq = load_nemo(Path(nemo))
    return model, tok, vocab, seq, False


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="lm-evaluation-harness tasks on an ACFT checkpoint")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="an acft-train run directory")
    src.add_argument("--nemo", help="a GPT .nemo")
    ap.add_argument("--store", default="exchange",
                    choices=("exchange", "baseline", "filtering", "rl", "nado_decoding"))
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
    ap.add_argument("--out", required=True, help="folder for results.json")
    args = ap.parse_args(argv)

    import lm_eval
    from lm_eval.tasks import TaskManager

    from nemo_acft.io_utils import atomic_write

    model, tok, vocab, seq, guided = load_checkpoint(args.run_dir, args.nemo, args.store,
                                                     args.iteration, args.guided)
    lm = ACFTHarnessLM(model, tok, vocab, seq, batch_size=args.batch_size, guided=guided,
                       guidance=args.guidance)
    res = lm_eval.simple_evaluate(model=lm, tasks=args.tasks.split(","),
                                  num_fewshot=args.num_fewshot, limit=args.limit,
                                  task_manager=TaskManager(include_path=args.include_path),
                                  log_samples=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "results.json") as fh:
        json.dump({"results": res["results"], "configs": res.get("configs", {})}, fh, indent=1,
                  default=str)
    for task, metrics in res["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
