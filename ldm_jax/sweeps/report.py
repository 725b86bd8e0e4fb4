"""Renders ``report.md`` with matplotlib plots from a sweep's results: loss curves, the primary metric
against NFE for each sampler, and the primary metric per run at the largest NFE."""

from __future__ import annotations

import json
import os

import numpy as np

from ldm_jax.sweeps.runner import read_results


def _metric_names(rows) -> list[str]:
    names = []
    for row in rows:
        for e in row["evals"]:
            names += [k for k in e if k not in ("sampler", "nfe") and k not in names]
    return names


def _loss_curve(run_dir: str):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        pts = [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
    return np.array(pts) if pts else None


def _plot_losses(rows, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        curve = _loss_curve(row["workdir"])
        if curve is not None:
            ax.plot(curve[:, 0], curve[:, 1], label=row["run"], lw=1)
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="Loss curves")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_vs_nfe(rows, metric, path):
    import matplotlib.pyplot as plt

    samplers = sorted({e["sampler"] for r in rows for e in r["evals"]})
    fig, axes = plt.subplots(1, len(samplers), figsize=(4 * len(samplers), 3.5), squeeze=False, sharey=True)
    for ax, sampler in zip(axes[0], samplers):
        for row in rows:
            pts = sorted((e["nfe"], e[metric]) for e in row["evals"]
                         if e["sampler"] == sampler and metric in e)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=row["run"], lw=1)
        ax.set(xlabel="NFE", title=sampler, xscale="log")
    axes[0][0].set_ylabel(metric)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_per_run(rows, metric, sampler, nfe, path):
    import matplotlib.pyplot as plt

    names, vals = [], []
    for row in rows:
        v = [e[metric] for e in row["evals"] if e["sampler"] == sampler and e["nfe"] == nfe and metric in e]
        if v:
            names.append(row["run"])
            vals.append(v[0])
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names) + 2), 4))
    ax.bar(range(len(vals)), vals)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
    ax.set(ylabel=metric, title=f"{metric} per run ({sampler}, {nfe} NFE)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_report(workdir: str, *, title: str = "Sweep report", primary: str | None = None) -> str:
    """Writes workdir/report.md (+ PNG plots beside it) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    rows = read_results(workdir)
    if not rows:
        raise ValueError(f"no results in '{workdir}': run the sweep first")
    metrics = _metric_names(rows)
    primary = primary or (metrics[0] if metrics else None)
    lines = [f"# {title}", "", f"{len(rows)} runs. Primary metric: `{primary}`.", ""]
    _plot_losses(rows, os.path.join(workdir, "loss_curves.png"))
    lines += ["![loss curves](loss_curves.png)", ""]
    if primary:
        _plot_vs_nfe(rows, primary, os.path.join(workdir, "metric_vs_nfe.png"))
        last = max((e["sampler"], e["nfe"]) for r in rows for e in r["evals"])[0]
        nfe = max(e["nfe"] for r in rows for e in r["evals"] if e["sampler"] == last)
        _plot_per_run(rows, primary, last, nfe, os.path.join(workdir, "metric_per_run.png"))
        lines += ["![metric vs NFE](metric_vs_nfe.png)", "", "![metric per run](metric_per_run.png)", ""]
    cols = sorted({(e["sampler"], e["nfe"]) for r in rows for e in r["evals"]})
    header = ["run", "final loss", "train min"] + [f"{s}@{n}" for s, n in cols]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        by = {(e["sampler"], e["nfe"]): e.get(primary) for e in row["evals"]}
        cells = [row["run"], _fmt(row.get("final_loss")), f"{row['train_minutes']:.1f}"]
        cells += [_fmt(by.get(c)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4g}"
