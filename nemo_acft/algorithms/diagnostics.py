"""What tells whether the method works before a toxicity number is believed: NADO's calibration
and the collapse diagnostics. Every function is collective over the world that holds the model.

- :func:`calibration` (the oracle block, after φ_k is trained): on held-out prompts, NADO's
  ``Z(prompt) = Σ_v p(v | prompt) σ(s[v])``, its estimate of the probability that a continuation
  sampled from θ satisfies the constraint, against the empirical success rate of
  ``samples_per_prompt`` fresh samples per prompt labelled by the oracle: expected calibration
  error (ECE, equal-width bins), Brier score and a reliability-diagram PNG.
- :func:`collapse` (the finish phase, per LM block k): on a fixed probe set of prompts, samples
  from θ_k; their distinct-2 and repeat rate; the entropies of p_θk and of the q the block was
  pushed toward, at the sampled prefixes; and the head's mean ``|ΔZ|`` on those prefixes between
  the block's reference trunk (θ_(k−1), or θ_0 for ``reference: base``) and θ_k's hidden states,
  i.e. how far R drifts when the trunk moves under a fixed φ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from nemo_acft.io_utils import atomic_write, save_figure
from nemo_acft.models.generate import SamplingParams
from nemo_acft.sampling import generated_mask, sample_and_label, texts


def ece(z: Sequence[float], success: Sequence[float], bins: int = 10) -> Dict[str, Any]:
    """Expected calibration error of predictions ``z`` in [0, 1] against outcomes ``success``
    (rates in [0, 1]): ``Σ_b n_b / N · |mean z_b − mean success_b|`` over ``bins`` equal-width
    bins, the Brier score ``mean (z − success)²`` and the bins (for the diagram)."""
    z, y = torch.as_tensor(z, dtype=torch.float64), torch.as_tensor(success, dtype=torch.float64)
    if z.numel() == 0:
        return {"ece": math.nan, "brier": math.nan, "bins": []}
    idx = (z * bins).long().clamp(0, bins - 1)
    rows, total = [], 0.0
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        if n:
            mz, my = float(z[sel].mean()), float(y[sel].mean())
            total += n / z.numel() * abs(mz - my)
            rows.append({"lo": b / bins, "hi": (b + 1) / bins, "n": n, "mean_z": mz,
                         "success": my})
    return {"ece": total, "brier": float(((z - y) ** 2).mean()), "bins": rows}


def _plot_reliability(path: Path, report: Dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(1, 2, figsize=(9, 3.8))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="calibrated")
    b = report["bins"]
    ax.plot([r["mean_z"] for r in b], [r["success"] for r in b], "o-", label="NADO")
    ax.scatter(report["z"], report["success"], s=8, alpha=0.35, label="prompts")
    ax.set(xlabel="NADO's Z(prompt)", ylabel="empirical success rate",
           title=f"{title}: ECE {report['ece']:.3f}", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    hx.hist(report["z"], bins=20, range=(0, 1), alpha=0.6, label="Z(prompt)")
    hx.hist(report["success"], bins=20, range=(0, 1), alpha=0.6, label="success rate")
    hx.set(xlabel="probability", ylabel="prompts", title="distributions")
    hx.legend(fontsize=8)
    for a in (ax, hx):
        a.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def calibration(run, k: int, seed: int) -> Dict[str, Any]:
    """NADO's calibration on ``model.acft.calibration.prompts`` held-out prompts with the model
    as it is (θ the head was trained for, φ_k); writes ``run_dir/diagnostics/calibration_iter_
    <k>.{json,png}`` and returns the summary (``ece``, ``brier``, ``mean_z``,
    ``mean_success``). Empty when switched off (``prompts: 0``)."""
    c = run.acft["calibration"]
    prompts = list(run.data.eval_prompts[: c["prompts"]])
    if not prompts:
        return {}
    n = c["samples_per_prompt"]
    s = run.acft["sampling"]
    params = SamplingParams(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                            top_k=s["top_k"], top_p=s["top_p"], eos_id=run.tokenizer.eos_id,
                            seed=seed)
    out = sample_and_label(run.model, run.tokenizer, [p for p in prompts for _ in range(n)],
                           run.oracle, params, batch_size=s["batch_size"],
                           threshold=run.cfg["oracle"]["threshold"],
                           oracle_batch_size=run.cfg["oracle"]["batch_size"])
    log_z = run.model.distribution_stats(out.samples.tokens)[2]
    z, success = [], []
    for i in range(len(prompts)):
        rows = range(i * n, (i + 1) * n)
        labels = [out.labels[r] for r in rows if out.labels[r] is not None]
        if not labels:
            continue
        first = rows[0]
        pl = int(out.samples.prompt_lengths[first])
        z.append(float(log_z[first, pl - 1].exp()))  # Z after the whole prompt
        success.append(sum(labels) / len(labels))
    report = {**ece(z, success, c["bins"]), "iteration": k, "prompts": len(z),
              "samples_per_prompt": n,
              "mean_z": sum(z) / len(z) if z else math.nan,
              "mean_success": sum(success) / len(success) if success else math.nan,
              "z": z, "success": success}
    if run.rank0:
        d = run.run_dir / "diagnostics"
        d.mkdir(parents=True, exist_ok=True)
        with atomic_write(d / f"calibration_iter_{k}.json") as fh:
            json.dump(report, fh, indent=1)
        _plot_reliability(d / f"calibration_iter_{k}.png", report, f"NADO φ_{k}")
    return {x: report[x] for x in ("ece", "brier", "mean_z", "mean_success", "prompts")}


def collapse(run, k: int, reference_mode: str, probe: Sequence[str], seed: int
             ) -> Dict[str, float]:
    """The collapse diagnostics of LM block k with the model holding θ_k and φ (the head the
    block used) and the reference holding the block's reference trunk and the same φ
    (``set_reference``). ``reference_mode`` says which q the block pushed toward: ``current``
    (q from θ_k itself) or a reference's."""
    s, e = run.acft["sampling"], run.cfg["eval"]
    params = SamplingParams(max_new_tokens=e["max_new_tokens"], top_p=e["top_p"],
                            eos_id=run.tokenizer.eos_id, seed=seed)
    from nemo_acft.eval import diversity
    from nemo_acft.sampling import generate_batched

    samples = generate_batched(run.model, run.tokenizer, list(probe), params,
                               batch_size=s["batch_size"])
    mask = generated_mask(samples)
    mine = run.model.distribution_stats(samples.tokens)  # H(p), H(q), log Z per prefix
    ref = run.model.distribution_stats(samples.tokens, on_reference=True)
    n = mask.sum().clamp_min(1)

    def mean(x):
        return float((x * mask).sum() / n)

    h_q = mine[1] if reference_mode == "current" else ref[1]
    return {"entropy_p": mean(mine[0]), "entropy_q": mean(h_q),
            "delta_z": mean((mine[2].exp() - ref[2].exp()).abs()),
            "mean_z": mean(mine[2].exp()),
            **diversity(texts(samples, run.tokenizer, continuation_only=True))}


def plot_collapse(path: Path, rows: List[Dict[str, Any]]) -> None:
    """The collapse diagnostics per LM block, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("entropy_p", "H(p_θk)"), ("entropy_q", "H(q) pushed toward"),
            ("distinct_2", "distinct-2 (probe)"), ("repeat_rate", "repeat rate (probe)"),
            ("delta_z", "mean |ΔZ| (reference vs θ_k trunk)"), ("gated_share", "gated share")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 3.2))
    ks = [r["iteration"] for r in rows]
    for ax, (key, label) in zip(axes, keys):
        ax.plot(ks, [r.get(key, math.nan) for r in rows], "o-")
        ax.set(xlabel="LM block k", title=label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


__all__ = ["ece", "calibration", "collapse", "plot_collapse"]
