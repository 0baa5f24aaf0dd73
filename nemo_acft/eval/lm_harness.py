"""An lm-evaluation-harness model for our checkpoints (``pip install .[harness]``).

The utility and detection metrics of METHOD.md at scale: the commonsense tasks (piqa, hellaswag,
winogrande, arc_easy, arc_challenge, boolq, social_iqa, openbookqa), MMLU and ``toxigen``::

    acft-harness --run-dir runs/big --tasks piqa,hellaswag,toxigen --out eval/harness
    acft-harness --nemo acft_gpt.nemo --tasks mmlu --num-fewshot 5 --out eval/harness_mmlu
    acft-harness --run-dir runs/big --store nado_decoding --tasks piqa --out eval/nado

:class:`ACFTHarnessLM` implements the harness's three request types on a
:class:`~nemo_acft.models.acft_model.MegatronGPTACFTModel` (a run's θ_k, or any GPT ``.nemo``),
through its ``token_log_probs`` and ``generate``: ``loglikelihood`` (the multiple-choice tasks),
``loglikelihood_rolling`` (perplexity tasks) and ``generate_until`` (greedy). With a NADO head
and ``guided=True`` every log-probability is NADO decoding's ``q ∝ p·R^β`` instead of p, so the
decoding baseline is evaluated on the same tasks. Tasks download their data from the Hugging Face
hub; this machine has none, so the tests run the adapter through the harness's evaluator on a
task defined from a local file, and the hub tasks were not run here.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple


try:
    from lm_eval.api.model import LM
except ImportError as e:  # pragma: no cover - the optional dependency
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install "
                      "'nemo-acft[harness]' (or pip install lm-eval)") from e


class ACFTHarnessLM(LM):
    """``model``: a :class:`~nemo_acft.models.acft_model.MegatronGPTACFTModel` (single pipeline
    stage for ``generate_until``) with ``tokenizer`` (:class:`~nemo_acft.data.TextTokenizer`)
    and context ``max_length``."""

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 16,
                 guided: bool = False, guidance: float = 1.0, max_gen_toks: int = 64):
        super().__init__()
        self.model, self.tok = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.guided, self.guidance, self.max_gen_toks = guided, guidance, max_gen_toks

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
        length; p, or q when guided), and whether it is the greedy continuation."""
        import torch

        results = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            seqs = [((ctx or [self.tok.eos_id]) + cont)[-(self.max_length + 1):]
                    for ctx, cont in chunk]
            x = torch.full((len(seqs), max(len(q) for q in seqs)), self.tok.eos_id,
                           dtype=torch.long)
            for j, q in enumerate(seqs):
                x[j, :len(q)] = torch.as_tensor(q)
            lp, top = self.model.token_log_probs(x, guidance=self.guidance if self.guided
                                                 else None, return_max=True)
            for j, ((ctx, cont), q) in enumerate(zip(chunk, seqs)):
                n = min(len(cont), len(q) - 1)  # a continuation longer than the context
                if n == 0:
                    results.append((0.0, True))
                    continue
                sel = slice(len(q) - 1 - n, len(q) - 1)
                results.append((float(lp[j, sel].double().sum()),
                                bool((lp[j, sel] >= top[j, sel]).all())))
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
        from nemo_acft.models.generate import SamplingParams

        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = (self.tok.encode(context) or [self.tok.eos_id])[-max(self.max_length - n, 1):]
            params = SamplingParams(max_new_tokens=n, top_k=1, eos_id=self.tok.eos_id,
                                    guidance=self.guidance)  # top_k=1: greedy
            s = self.model.generate([ids], params, guided=self.guided)
            text = self.tok.decode(s.tokens[0, s.prompt_lengths[0]:s.lengths[0]].tolist())
            cut = min([text.find(u) for u in until if u and u in text], default=len(text))
            out.append(text[:cut])
        return out
