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


def short_names(rows) -> list[str]:
    """Run names without the key=value parts every run shares (plot labels)."""
    parts = [row["run"].split(",") for row in rows]
    shared = set.intersection(*map(set, parts)) if len(parts) > 1 else set()
    return [",".join(p for p in ps if p not in shared) or row["run"] for ps, row in zip(parts, rows)]


def _legend_below(fig, axes, height: float, count: int) -> None:
    """One legend for all panels, one run per line below them; the panels keep their own space."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, min(0.8, 0.13 * count / height + 0.02), 1, 1))


def _plot_losses(rows, path):
    import matplotlib.pyplot as plt

    height = 3.6 + 0.13 * len(rows)
    fig, ax = plt.subplots(figsize=(7, height))
    for i, (row, name) in enumerate(zip(rows, short_names(rows))):
        curve = _loss_curve(row["workdir"])
        if curve is not None:
            ax.plot(curve[:, 0], curve[:, 1], label=name, lw=1, color=f"C{i % 10}")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="Loss curves")
    _legend_below(fig, [ax], height, len(rows))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_vs_nfe(rows, metric, path):
    import matplotlib.pyplot as plt

    samplers = sorted({e["sampler"] for r in rows for e in r["evals"]})
    nfes = sorted({e["nfe"] for r in rows for e in r["evals"]})
    height = 3.2 + 0.13 * len(rows)
    fig, axes = plt.subplots(1, len(samplers), figsize=(max(4 * len(samplers), 8), height), squeeze=False,
                             sharey=True)
    for ax, sampler in zip(axes[0], samplers):
        for i, (row, name) in enumerate(zip(rows, short_names(rows))):
            pts = sorted((e["nfe"], e[metric]) for e in row["evals"]
                         if e["sampler"] == sampler and metric in e)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, lw=1, color=f"C{i % 10}")
        ax.set(xlabel="NFE", title=sampler, xscale="log")
        ax.minorticks_off()
        ax.set_xticks(nfes, [str(n) for n in nfes])
    axes[0][0].set_ylabel(metric)
    _legend_below(fig, axes[0], height, len(rows))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_per_run(rows, metric, sampler, nfe, path):
    import matplotlib.pyplot as plt

    names, vals = [], []
    for row, name in zip(rows, short_names(rows)):
        v = [e[metric] for e in row["evals"] if e["sampler"] == sampler and e["nfe"] == nfe and metric in e]
        if v:
            names.append(name)
            vals.append(v[0])
    longest = max((len(n) for n in names), default=10)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names) + 2), 2.5 + 0.055 * longest))
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
