"""Tables and plots for the noise-schedule study's README, from a finished (or partly finished) sweep directory.

    python experiments/noise_schedules/analyze.py runs/ablation_shapes [--out experiments/noise_schedules]
    python experiments/noise_schedules/analyze.py runs/ablation_samplers --out experiments/noise_schedules/samplers
    python experiments/noise_schedules/analyze.py runs/ablation_fmnist --out experiments/noise_schedules/fashion_mnist

Copies the sweep's per-run rows (results.jsonl), report.md and plots next to this script, adds each run's
training metrics (loss and the in-training adherence evaluations, `runs.jsonl`), and writes `findings.md`
(every setting: the sweep's metric and the brightness gap per sampler x NFE, mean over seeds with the
per-seed values) and `convergence.png` (the in-training evaluations). On shapes the metric is prompt adherence:
fractions of the evaluation images whose colour / shape / position the shapes checker reads as prompted,
`mean_acc` the mean of the three; on fashion_mnist it is FD-FMNIST (lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import defaultdict

import numpy as np

ADHERENCE = ("color_acc", "shape_acc", "position_acc", "all_acc")


def setting(overrides: dict) -> tuple[str, str, str]:
    sched = overrides["diffusion.schedule"]
    if overrides.get("diffusion.zero_snr"):
        sched += " zero-SNR"
    elif float(overrides.get("diffusion.shift", 1.0)) != 1.0:
        sched += f" shift {float(overrides['diffusion.shift']):g}"
    return sched, overrides.get("diffusion.prediction", "-"), overrides.get("diffusion.weighting", "-")


SCHEDULE_ORDER = ("linear", "scaled_linear", "cosine", "sigmoid", "edm")


def schedule_order(name: str) -> tuple:
    """Table order: the schedule family as in the config, then its variants (shift, zero-SNR)."""
    base = name.split(" ")[0]
    return (SCHEDULE_ORDER.index(base) if base in SCHEDULE_ORDER else len(SCHEDULE_ORDER), name)


def setting_order(key: tuple[str, str, str]) -> tuple:
    sched, pred, weighting = key
    return schedule_order(sched), pred, weighting != "uniform"


def training_metrics(run_dir: str) -> dict:
    """{"loss": [(step, loss)], "adherence": {step: {color_acc, ...}}, "fd": {step: FD-FMNIST}} from a run's
    metrics.jsonl."""
    out = {"loss": [], "adherence": {}, "fd": {}}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        for r in map(json.loads, open(path)):
            if "loss" in r:
                out["loss"].append((int(r["step"]), float(r["loss"])))
            if "eval/adherence/all_acc" in r:
                out["adherence"][int(r["step"])] = {k: float(r[f"eval/adherence/{k}"]) for k in ADHERENCE}
            if "eval/fd_fmnist/fd" in r:
                out["fd"][int(r["step"])] = float(r["eval/fd_fmnist/fd"])
    return out


def fmt(values, digits: int = 2) -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "-"
    return f"{np.mean(v):.{digits}f}" + (f" ({'/'.join(f'{x:.{digits}f}' for x in v)})" if len(v) > 1 else "")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from ldm_jax.sweeps.runner import read_results

    rows = read_results(args.workdir)
    for r in rows:
        r["training"] = training_metrics(r["workdir"])
    by = defaultdict(list)
    for r in rows:
        by[setting(r["overrides"])].append(r)
    for key in by:
        by[key].sort(key=lambda r: int(r["overrides"].get("train.seed", 0)))
    points = sorted({(e["sampler"], e["nfe"]) for r in rows for e in r["evals"]})

    def ev(r, sampler, nfe, key):
        return next((float(e[key]) for e in r["evals"]
                     if e["sampler"] == sampler and e["nfe"] == nfe and key in e), None)

    shapes = any("mean_acc" in e for r in rows for e in r["evals"])
    metric, label = ("mean_acc", "acc") if shapes else ("fd_fmnist", "FD")
    lines = [f"# Findings: {len(rows)} finished runs", "",
             "Mean over seeds, per-seed values in parentheses. "
             + ("`acc` = mean of colour / shape / position accuracy" if shapes
                else "`FD` = FD-FMNIST (lower is better)")
             + " at the end of training; `gap` = |mean generated pixel - mean test pixel| (0..1).", ""]
    head = "| schedule | prediction | weighting | seeds | " + " | ".join(f"{label} {s}@{n}" for s, n in points)
    lines += [head + " | gap (mean over samplers) | final loss |", "|" + "---|" * (len(points) + 6)]
    for key in sorted(by, key=setting_order):
        rs = by[key]
        cells = [fmt([ev(r, s, n, metric) for r in rs], 2 if shapes else 1) for s, n in points]
        gaps = [np.nanmean([ev(r, s, n, "brightness_gap") or np.nan for s, n in points]) for r in rs]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {len(rs)} | " + " | ".join(cells)
                     + f" | {fmt(gaps, 3)} | {fmt([r['final_loss'] for r in rs], 3)} |")
    lines += ["", "## Brightness gap per sampler x NFE", "",
              "| schedule | prediction | weighting | " + " | ".join(f"gap {s}@{n}" for s, n in points) + " |",
              "|" + "---|" * (len(points) + 3)]
    for key in sorted(by, key=setting_order):
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                     + " | ".join(fmt([ev(r, s, n, "brightness_gap") for r in by[key]], 3) for s, n in points) + " |")
    if not shapes:  # per class: the brightness range of the 10 classes (Lin et al.'s bias flattens it)
        lines += ["", "## Brightness per class: class gap / slope (generated vs test class mean pixels; 1 = kept)",
                  "", "| schedule | prediction | weighting | " + " | ".join(f"{s}@{n}" for s, n in points) + " |",
                  "|" + "---|" * (len(points) + 3)]
        for key in sorted(by, key=setting_order):
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(
                f"{fmt([ev(r, s, n, 'class_brightness_gap') for r in by[key]], 3)} / "
                f"{fmt([ev(r, s, n, 'brightness_slope') for r in by[key]])}" for s, n in points) + " |")
    sampler, nfe = max(points, key=lambda p: (p[0] == "dpmpp_2m", p[1] == 20, p[1]))
    if shapes:
        lines += ["", f"## Attribute accuracies ({sampler} {nfe} NFE)", "",
                  "| schedule | prediction | weighting | colour | shape | position |", "|---|---|---|---|---|---|"]
        for key in sorted(by, key=setting_order):
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                         + " | ".join(fmt([ev(r, sampler, nfe, k) for r in by[key]]) for k in ADHERENCE[:3]) + " |")

    # the grid: schedule x (prediction, weighting) at one evaluation point, seed 0 (the seed every setting has)
    columns = sorted({key[1:] for key in by}, key=lambda c: (c[0], c[1] != "uniform"))
    schedules = sorted({key[0] for key in by}, key=schedule_order)
    seed0 = {key: rs[0] for key, rs in by.items() if int(rs[0]["overrides"].get("train.seed", 0)) == 0}
    grid = {key: v for key, r in seed0.items() if (v := ev(r, sampler, nfe, metric)) is not None}
    if len(columns) > 1 and len(schedules) > 1 and grid:
        best = (max if shapes else min)(grid.values())
        lines += ["", f"## The grid: {label} ({sampler} {nfe} NFE), seed 0; brightness gap in parentheses", "",
                  "| schedule | " + " | ".join(f"{pred}, {w}" for pred, w in columns) + " |",
                  "|" + "---|" * (len(columns) + 1)]
        for sched in schedules:
            cells = []
            for key in ((sched, *col) for col in columns):
                if key not in grid:
                    cells.append("")
                    continue
                cell = f"{grid[key]:.2f}" if shapes else f"{grid[key]:.1f}"
                cells.append((f"**{cell}**" if grid[key] == best else cell)
                             + f" ({ev(seed0[key], sampler, nfe, 'brightness_gap'):.3f})")
            lines.append(f"| {sched} | " + " | ".join(cells) + " |")

    def curve(r) -> dict:  # step -> the in-training metric
        if shapes:
            adh = r["training"]["adherence"]
            return {s: float(np.mean([adh[s][k] for k in ADHERENCE[:3]])) for s in adh}
        return r["training"]["fd"]

    steps = sorted({s for r in rows for s in curve(r)})
    lines += ["", "## During training (ddim 20 NFE): " + ("all attributes correct / mean attribute accuracy, 64 prompts"
                                                        if shapes else "FD-FMNIST, 500 images"), "",
              "| schedule | prediction | weighting | " + " | ".join(f"step {s}" for s in steps) + " |",
              "|" + "---|" * (len(steps) + 3)]
    for key in sorted(by, key=setting_order):
        rs = by[key]
        cells = []
        for s in steps:
            if shapes:
                allc = [r["training"]["adherence"].get(s, {}).get("all_acc") for r in rs]
                cells.append(f"{fmt(allc)} / {fmt([curve(r).get(s) for r in rs])}")
            else:
                cells.append(fmt([curve(r).get(s) for r in rs], 1))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "findings.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), sharey=True)
    colour = {sched: plt.get_cmap("tab10")(i % 10) for i, sched in enumerate(schedules)}
    for ax, pred in zip(axes, ("eps", "v")):
        for key in sorted((k for k in by if k[1] == pred), key=setting_order):
            for i, r in enumerate(by[key]):  # one colour per schedule, one line per seed
                points_ = sorted(curve(r).items())
                if points_:
                    ax.plot(*zip(*points_), marker=".", alpha=0.8, color=colour[key[0]],
                            ls="-" if key[2] == "min_snr" else "--", label=f"{key[0]}, {key[2]}" if i == 0 else None)
        ax.set_title(f"{pred}-prediction (solid: min-SNR, dashed: uniform)", fontsize=9)
        ax.set_xlabel("training step")
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    axes[0].set_ylabel("mean attribute accuracy (ddim 20, 64 prompts)" if shapes else "FD-FMNIST (ddim 20, 500 images)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "convergence.png"), dpi=110)
    for name in ("report.md", "loss_curves.png", "metric_vs_nfe.png", "metric_per_run.png"):
        if os.path.exists(os.path.join(args.workdir, name)):
            shutil.copy(os.path.join(args.workdir, name), os.path.join(args.out, name))
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "training"}) + "\n")
    with open(os.path.join(args.out, "runs.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({"run": r["run"], **r["training"]}) + "\n")
    print(os.path.join(args.out, "findings.md"))


if __name__ == "__main__":
    main()
