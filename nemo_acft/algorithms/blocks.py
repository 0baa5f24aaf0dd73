"""The two blocks of an ACFT iteration, over the model's interface.

- :func:`oracle_block`: load θ_(k−1) and φ_(k−1), sample continuations of a fresh slice of
  prompts, label them with the oracle, train φ_k (``nado_step``, the trunk frozen), publish φ_k
  and the labelled samples.
- :func:`lm_block`: load θ_(k−1) with its optimizer state (or a rolling checkpoint inside the
  block) and a φ, fine-tune the trunk for a block of steps (``lm_step``), publish θ_k.

The baselines are the same blocks with another data choice, an extra loss term or no LM update
(:mod:`.baselines`). Every batch and every sampling seed is a pure function of
``(seed, block, step)``, so a block restarted from a checkpoint repeats itself exactly. Every
function is collective over the world that calls it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from nemo_acft import progress
from nemo_acft.algorithms.coordination import StopRequested, stop_agreed
from nemo_acft.algorithms.exchange import ArtifactStore, save_tensors
from nemo_acft.data import LMDataset, batch_indices
from nemo_acft.models.objectives import Regularizer
from nemo_acft.models.generate import SamplingParams
from nemo_acft.sampling import nado_batch, sample_and_label

log = logging.getLogger("nemo_acft")

#: ``(step) -> [(batch, objective)]``: extra loss terms of an LM step (the RL baseline's)
ExtraTerms = Callable[[int], Tuple[List[Tuple[Dict[str, torch.Tensor], Any]], Dict[str, float]]]


def _read(run, store: ArtifactStore, kind: str, iteration: int, part: str,
          with_optimizer: bool = False) -> Dict[str, Any]:
    """Load ``part`` of an artifact into the model (verified, resharded); returns what was read
    for the reader's manifest: the artifact, the layout it was read at, bytes and seconds."""
    t0 = time.perf_counter()
    path = store.verify(kind, iteration)
    run.model.load_part(path / part, part, with_optimizer=with_optimizer)
    man = store.manifest(kind, iteration)
    return {"path": str(path), "iteration": iteration, "written_at": man.get("layout"),
            "read_at": run.model.layout(), "bytes": man.get("bytes"),
            "seconds": time.perf_counter() - t0}


def _write_part(run, part: str, with_optimizer: bool = False, common=None):
    def write(tmp):
        run.model.save_part(tmp / part, part, with_optimizer=with_optimizer, common=common)
    return write


def publish_initial_head(run, store: ArtifactStore) -> None:
    """φ_0: the freshly built, zero-initialised head (R = 1/2 everywhere, q = p). With
    ``model.acft.nado_head.kind: separate`` the separate NADO model's embedding and layers start
    from θ_0's (read from the run's exchange), its output layer at zero."""
    if store.exists("nado", 0):
        return
    store.clean_temporaries("nado")
    head = run.model.module.nado_head
    if head is not None and bool(head.output_layer.weight.detach().abs().max() > 0):
        raise RuntimeError("φ_0 must be the zero-initialised head: publish it before loading one")
    init, read = "zeros", None
    if head is not None and head.separate:
        read = _read(run, run.exchange, "lm", 0, "trunk")
        head.warm_start_from(run.model.module)
        init = "separate: embedding and first layers from θ_0, output layer zeros"
    store.publish("nado", 0, _write_part(run, "head"),
                  {"based_on": {"lm": 0 if read else None, "nado": None}, "init": init,
                   "layout": run.model.layout(), **({"read": read} if read else {})})


def regularizer(run, domains: Sequence[str]) -> Regularizer:
    """The configured regularizer over the data's domains (q from the model itself with
    ``model.acft.reference: current``, else from the LM block's reference)."""
    from nemo_acft.config import domain_lambdas

    a = run.acft
    return Regularizer(torch.tensor(domain_lambdas(run.cfg, domains)), a["delta"],
                       float(a["min_z"]), reference=a["reference"] != "current",
                       shipped=ships_reference_q(run))


def sample_source(run, k: int) -> int:
    """Which θ oracle block k samples from (and trains φ_k on): θ_(k−1), or θ_0 with
    ``model.acft.reference: base`` (the prototype's NADO, trained on the base model's samples,
    so that q = p_0·R / Z is the constraint-projected base distribution)."""
    return 0 if run.acft["reference"] == "base" else k - 1


def reference_source(run, k: int, store: ArtifactStore) -> Tuple[ArtifactStore, int]:
    """The trunk LM block k's q is built from (``model.acft.reference``): θ_(k−1) of ``store``
    (``frozen``, and ``current`` for the diagnostics) or θ_0 (``base``)."""
    if run.acft["reference"] == "base" or k == 1:
        return run.exchange, 0
    return store, k - 1


def ships_reference_q(run) -> bool:
    """``model.acft.reference_on: oracle``: the oracle group computes each LM step's q."""
    return run.acft["reference"] != "current" and run.acft["reference_on"] == "oracle"


def _lm_batch(run, data: LMDataset, step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """LM step ``step``'s rows (a pure function of seed and step) and its batch."""
    idx = batch_indices(len(data), run.cfg["model"]["global_batch_size"], run.seed, "lm", step)
    return idx, data.batch(idx)


def publish_reference_q(run, k: int, store: ArtifactStore, nado_it: int,
                        data: LMDataset) -> Dict[str, Any]:
    """Oracle side, ``model.acft.reference_on: oracle``: the reference's q of every step of LM
    block k, one ``store/q/iter_<step+1>`` artifact per step, published as soon as it is
    computed (the LM block reads step t's while this computes later ones). The reference is
    the LM block's own (:func:`reference_source`, and φ ``nado_it``), loaded here; q is kept as
    its ``model.acft.reference_top_k`` ids per token and a tail bucket
    (:meth:`~nemo_acft.models.acft_model.MegatronGPTACFTModel.reference_q`). Steps already
    published are skipped (a restart), and so is a block whose θ_k exists; q of LM blocks that
    have finished is deleted. Returns what it read and loaded into the model (for
    :func:`oracle_block`'s ``loaded``), or ``{}`` when it loaded nothing."""
    S, a = run.S, run.acft
    done_blocks = {b for b in range(1, run.K + 1) if store.exists("lm", b)}
    stale = [t for t in store.iterations("q") if (t - 1) // S + 1 in done_blocks]
    store.remove("q", stale)
    steps = [t for t in range((k - 1) * S, k * S) if not store.exists("q", t + 1)]
    if k in done_blocks or not steps:
        return {}
    store.clean_temporaries("q")
    rs, ri = reference_source(run, k, store)
    read = {"lm": _read(run, rs, "lm", ri, "trunk"), "nado": _read(run, store, "nado", nado_it,
                                                                   "head")}
    top_k = int(a["reference_top_k"])
    # forward passes of the oracle block's micro-batch (several LM steps' rows at once), the
    # top-k in chunks of ~8 M logits (the fused pass's own chunk at large vocabularies)
    mbs = a["oracle_block"]["micro_batch_size"]
    gbs = run.cfg["model"]["global_batch_size"]
    group = max(1, mbs // gbs)
    chunk = max(a["nado_head"]["loss_chunk_tokens"] or 256, 2 ** 23 // run.model.module.vocab_size)
    bar = run.bar(len(steps), f"[{run.side}] q for LM block {k}/{run.K}", 1)
    t0 = time.perf_counter()
    # groups aligned on the step number, each computed whole: a restart computes a step's q in
    # the same forward as before, so it is the same bit for bit
    groups = sorted({t - t % group for t in steps})
    for g in groups:
        these = [t for t in range(g, g + group) if (k - 1) * S <= t < k * S]
        rows = [_lm_batch(run, data, t) for t in these]
        tokens = torch.cat([torch.cat([b["inputs"], b["targets"][:, -1:]], dim=1)
                            for _, b in rows])
        # q where the LM loss counts (a corpus row's padding gets a placeholder)
        q_all = run.model.reference_q(tokens, top_k, micro_batch_size=mbs, chunk_tokens=chunk,
                                      loss_mask=torch.cat([b["loss_mask"] for _, b in rows]))
        for n, (t, (idx, _)) in enumerate(zip(these, rows)):
            if store.exists("q", t + 1):
                continue
            q = {key: v[n * gbs:(n + 1) * gbs].clone() for key, v in q_all.items()}

            def write(tmp, q=q, idx=idx):
                if run.rank0:
                    save_tensors(tmp / "q.safetensors", {"rows": idx, **q})
            store.publish("q", t + 1, write,
                          {"block": k, "step": t + 1, "top_k": top_k,
                           "based_on": {"lm": ri, "nado": nado_it}, "read": read})
            bar.update(1)
        progress.tick(f"q for LM block {k} up to step {these[-1] + 1}")
        if stop_agreed():
            raise StopRequested(f"q for LM block {k} goes on after step {these[-1] + 1} on "
                                f"resume")
    bar.close()
    seconds = time.perf_counter() - t0
    run.scalars("q", {"seconds_per_step": seconds / len(steps)}, k)
    return {"read": read, "loaded": (str(rs.path("lm", ri)), str(store.path("nado", nado_it)))}


def _shipped_q(run, store: ArtifactStore, step: int, idx: torch.Tensor,
               alive=None) -> Dict[str, torch.Tensor]:
    """LM step ``step``'s q from the oracle group (waiting for it), checked to be of the same
    rows."""
    from nemo_acft.algorithms.coordination import wait_for

    if not store.exists("q", step + 1):
        if alive is None:
            raise FileNotFoundError(f"no q for LM step {step + 1}: "
                                    f"{store.path('q', step + 1)} does not exist")
        wait_for(store, "q", step + 1, run.acft["exchange"]["timeout_s"], "the oracle side",
                 alive)
    d = store.load("q", step + 1, "q.safetensors")
    if not torch.equal(d["rows"], idx):
        raise ValueError(f"{store.path('q', step + 1)}: q of other rows than LM step "
                         f"{step + 1}'s (a different seed, data or batch size)")
    return {key: v for key, v in d.items() if key != "rows"}


def _samples(store: ArtifactStore, iteration: int):
    """The labelled samples an oracle block published beside its φ (checked)."""
    from nemo_acft.models.generate import Samples

    d = store.load("nado", iteration, "samples.safetensors")
    return Samples(tokens=d["tokens"], prompt_lengths=d["prompt_lengths"], lengths=d["lengths"],
                   logprobs=d["logprobs"]), d["labels"]


class SampleKL:
    """``model.acft.kl_on: samples | both``: the regularizer also on the oracle block's sampled
    continuations (the positions from the last prompt token on), where the model's own
    continuations go, weighted by ``model.acft.sample_lambda`` (null: ``lambda``). Step t takes
    a batch of ``model.global_batch_size`` samples, a pure function of (seed, step)."""

    def __init__(self, run, store: ArtifactStore, iteration: int, reg: Regularizer):
        from nemo_acft.models.objectives import LMLoss

        a = run.acft
        lam = a["lambda"] if a["sample_lambda"] is None else a["sample_lambda"]
        self.samples, self.labels = _samples(store, iteration)
        self.run, self.n = run, self.samples.tokens.shape[0]
        self.objective = LMLoss(Regularizer(torch.tensor([float(lam)]), reg.delta, reg.min_z,
                                            reg.reference), lm_weight=0.0, prefix="samples_")

    def __call__(self, step: int):
        gbs = min(self.run.cfg["model"]["global_batch_size"], self.n)
        idx = batch_indices(self.n, gbs, self.run.seed, "kl_samples", step)
        b = nado_batch(self.samples, self.labels, idx)
        b.pop("labels")
        b["domain_ids"] = torch.zeros(len(idx), dtype=torch.long)
        return [(b, self.objective)], {}


def lm_block(run, method: str, k: int, store: ArtifactStore, data: LMDataset, *,
             reg: Optional[Regularizer] = None, nado: Optional[Tuple[ArtifactStore, int]] = None,
             extra: Optional[ExtraTerms] = None, alive=None) -> Dict[str, float]:
    """LM block k of ``method``: θ_k from θ_(k−1) (``store``'s, or the exchange's θ_0 for k = 1)
    on the corpus ``data``, published as ``store/lm/iter_k`` with its optimizer state.

    Args:
        reg: the regularizer (ACFT) with φ from ``nado`` = ``(store, iteration)``; None: the LM
            loss alone (the plain fine-tune and the filtering and RL baselines). With the
            reference's q shipped, φ is not read: the q the oracle side built from it is all
            the step needs.
        extra: extra loss terms per step (the RL baseline).
        alive: with the reference's q shipped (``reg.shipped``), the oracle side's liveness
            to wait on for each step's q (:func:`publish_reference_q`); None: it must exist.
    """
    cfg, a, m = run.cfg, run.acft, run.model
    S, K = run.S, run.K
    m.configure_training("trunk", cfg["model"]["optim"], max_steps=K * S)
    ckpts = ArtifactStore(run.run_dir / "checkpoints" / method)
    ckpts.clean_temporaries("lm")
    store.clean_temporaries("lm")  # this block's world is the only writer of store's θ
    start, end = (k - 1) * S, k * S
    nado_it = None if nado is None else nado[1]
    resumable = [t for t in ckpts.iterations("lm") if start < t < end
                 and ckpts.manifest("lm", t).get("nado_iteration") == nado_it]
    sums: Dict[str, float] = {}
    if resumable:
        src_store, src_it, start = ckpts, resumable[-1], resumable[-1]
        # the block's metrics so far, summed in step order: the resumed block's means are an
        # uninterrupted block's, bit for bit
        sums = dict(ckpts.manifest("lm", src_it).get("metric_sums", {}))
        log.info("[%s] %s LM block %d: resuming from the checkpoint at step %d", run.side,
                 method, k, start)
    else:
        src_store, src_it = (store, k - 1) if k > 1 else (run.exchange, 0)
    with_opt = bool(src_store.manifest("lm", src_it).get("with_optimizer"))
    read = {"lm": _read(run, src_store, "lm", src_it, "trunk", with_optimizer=with_opt)}
    shipped = reg is not None and reg.shipped
    if nado is not None and not shipped:  # a shipped q is all of φ the step needs
        read["nado"] = _read(run, nado[0], "nado", nado_it, "head")
    kl_on = a["kl_on"] if reg is not None else "corpus"
    if shipped:
        read["reference"] = {"q": str(store.root / "q"), "top_k": int(a["reference_top_k"])}
    elif reg is not None and reg.reference:
        rs, ri = reference_source(run, k, store)
        m.set_reference(rs.verify("lm", ri) / "trunk", nado[0].verify("nado", nado_it) / "head")
        read["reference"] = {"lm": str(rs.path("lm", ri)), "iteration": ri}
    terms_of = [extra] if extra is not None else []
    if kl_on in ("samples", "both"):
        terms_of.append(SampleKL(run, nado[0], nado_it, reg))
    corpus_reg = reg if kl_on in ("corpus", "both") else None
    mbs = cfg["model"]["micro_batch_size"]
    save_every = a["save_every"]
    bar = run.bar(end - start, f"[{run.side}] {method} {k}/{K}")
    t0 = time.perf_counter()
    first = (k - 1) * S
    for step in range(start, end):
        idx, batch = _lm_batch(run, data, step)
        if shipped:
            batch.update(_shipped_q(run, store, step, idx, alive))
        terms, extra_metrics = [], {}
        for term in terms_of:
            more, more_metrics = term(step)
            terms += more
            extra_metrics.update(more_metrics)
        metrics = m.lm_step(batch, corpus_reg, micro_batch_size=mbs, extra=terms)
        metrics.update(extra_metrics)
        for key, v in metrics.items():
            if isinstance(v, float):
                sums[key] = sums.get(key, 0.0) + v
        run.scalars(method, metrics, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        done = step + 1
        progress.tick(f"{method} LM block {k} step {done}")
        stop = done < end and stop_agreed()
        if (save_every and done % save_every == 0 and done < end) or stop:
            ckpts.publish("lm", done, _write_part(run, "trunk", with_optimizer=True),
                          {"block": k, "global_step": done, "nado_iteration": nado_it,
                           "with_optimizer": True, "layout": m.layout(),
                           "metric_sums": sums})
            ckpts.prune("lm", keep=2)
        if stop:
            raise StopRequested(f"checkpoint at step {done} in {ckpts.path('lm', done)}")
    bar.close()
    n = max(end - first, 1)
    means = {key: v / n for key, v in sums.items()}
    store.publish("lm", k, _write_part(run, "trunk", with_optimizer=True),
                  {"based_on": {"lm": k - 1, "nado": nado_it}, "global_step": end,
                   "method": method, "metrics": means, "seconds": time.perf_counter() - t0,
                   "with_optimizer": True, "layout": m.layout(), "read": read})
    return means


def oracle_block(run, k: int, store: ArtifactStore, lm: Tuple[ArtifactStore, int],
                 prompts_pool: Sequence[str], loaded: Optional[Dict[str, Any]] = None
                 ) -> Dict[str, float]:
    """Oracle block k: samples from θ of ``lm`` = ``(store, iteration)`` (θ_(k−1), or NADO
    decoding's fixed LM), labelled by the oracle; φ_k trained warm from ``store``'s φ_(k−1);
    publishes ``store/nado/iter_k`` (head and samples). ``loaded``: what
    :func:`publish_reference_q` just returned, when it loaded exactly that θ and φ_(k−1) (they
    are not read again)."""
    cfg, a, m = run.cfg, run.acft, run.model
    ob, s = a["oracle_block"], a["sampling"]
    if loaded and loaded.get("loaded") == (str(lm[0].path("lm", lm[1])),
                                           str(store.path("nado", k - 1))):
        read = loaded["read"]
    else:
        read = {"lm": _read(run, lm[0], "lm", lm[1], "trunk"),
                "nado": _read(run, store, "nado", k - 1, "head")}
    idx = batch_indices(len(prompts_pool), min(ob["prompts"], len(prompts_pool)), run.seed,
                        "prompts", k)
    prompts = [prompts_pool[i] for i in idx.tolist() for _ in range(ob["samples_per_prompt"])]
    t0 = time.perf_counter()
    params = SamplingParams(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                            top_k=s["top_k"], top_p=s["top_p"], eos_id=run.tokenizer.eos_id,
                            seed=run.seed * 1000 + k)
    labelled = sample_and_label(m, run.tokenizer, prompts, run.oracle, params,
                                batch_size=s["batch_size"], threshold=cfg["oracle"]["threshold"],
                                oracle_batch_size=cfg["oracle"]["batch_size"])
    t_sample = time.perf_counter() - t0
    samples, labels = labelled.samples, labelled.label_tensor()
    n = samples.tokens.shape[0]
    gbs = ob["global_batch_size"]
    if n < gbs:
        raise ValueError(f"oracle block {k}: {n} samples are fewer than "
                         f"model.acft.oracle_block.global_batch_size={gbs}")
    m.configure_training("head", ob["optim"], max_steps=max(ob["steps"], 1))
    bar = run.bar(ob["steps"], f"[{run.side}] NADO {k}/{run.K}", 1)
    tail: List[Dict[str, float]] = []
    for step in range(ob["steps"]):
        batch = nado_batch(samples, labels, batch_indices(n, gbs, run.seed, f"nado{k}", step))
        metrics = m.nado_step(batch, alpha=a["alpha"], micro_batch_size=ob["micro_batch_size"])
        run.scalars("nado", metrics, (k - 1) * ob["steps"] + step + 1)
        bar.update(1)
        progress.tick(f"oracle block {k} NADO step {step + 1}")
        if step >= ob["steps"] - max(ob["steps"] // 10, 1):
            tail.append(metrics)
        if stop_agreed():
            raise StopRequested(f"oracle block {k} is redone on resume")
    bar.close()
    means = {key: sum(x[key] for x in tail) / len(tail) for key in tail[0]} if tail else {}
    rate = labelled.violation_rate()
    run.scalars("nado", {"sample_violation_rate": rate}, k)
    from nemo_acft.algorithms.diagnostics import calibration

    calib = calibration(run, k, seed=run.seed * 1000 + 500 + k)
    if calib:
        run.scalars("nado/calibration", calib, k)
        log.info("[%s] NADO φ_%d calibration on %d held-out prompts: ECE %.3f, Brier %.3f, "
                 "mean Z %.3f vs success %.3f", run.side, k, calib["prompts"], calib["ece"],
                 calib["brier"], calib["mean_z"], calib["mean_success"])
    unlabelled = sum(x is None for x in labelled.labels)

    def write(tmp):
        m.save_part(tmp / "head", "head")
        if run.rank0:
            save_tensors(tmp / "samples.safetensors",
                         {"tokens": samples.tokens, "prompt_lengths": samples.prompt_lengths,
                          "lengths": samples.lengths, "logprobs": samples.logprobs,
                          "labels": labels})
            rows = [json.dumps({"text": t, "score": sc, "label": lb, "prompt_length": int(pl),
                                "length": int(ln)})
                    for t, sc, lb, pl, ln in zip(labelled.texts, labelled.scores, labelled.labels,
                                                 samples.prompt_lengths, samples.lengths)]
            (tmp / "samples.jsonl").write_text("\n".join(rows) + "\n")

    store.publish("nado", k, write,
                  {"based_on": {"lm": lm[1], "nado": k - 1}, "num_samples": n,
                   "num_unlabelled": unlabelled, "sample_violation_rate": rate,
                   "metrics": means, "calibration": calib, "seconds_sampling": t_sample,
                   "seconds": time.perf_counter() - t0, "layout": m.layout(), "read": read})
    return {**means, "sample_violation_rate": rate}


def log_block(run, what: str, k: int, metrics: Dict[str, float], t0: float, done: int,
              todo: int) -> None:
    """One line per block: the main metrics, seconds per block and the ETA."""
    rate = (time.perf_counter() - t0) / max(done, 1)
    shown = " ".join(f"{key} {v:.4g}" for key, v in metrics.items()
                     if key in ("lm_loss", "kl", "penalty", "gated_share", "nado_loss",
                                "sample_violation_rate", "reward", "samples_kl"))
    log.info("[%s] %s %d/%d  %s  (%.1f s/block, ETA %.0f s)", run.side, what, k, run.K, shown,
             rate, rate * (todo - done))
