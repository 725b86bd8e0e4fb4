"""Tables and plots for the noise-schedule study's README, from a finished (or partly finished) sweep directory.

    python experiments/noise_schedules/analyze.py runs/ablation_shapes [--out experiments/noise_schedules]

Copies the sweep's per-run rows (results.jsonl), report.md and plots next to this script, adds each run's
training metrics (loss and the in-training adherence evaluations, `runs.jsonl`), and writes `findings.md`
(every setting: accuracy and brightness gap per sampler x NFE, mean over seeds with the per-seed values) and
`convergence.png` (prompt adherence during training). Accuracies are fractions of the evaluation images whose
colour / shape / position the shapes checker reads as prompted; `mean_acc` is the mean of the three.
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


def training_metrics(run_dir: str) -> dict:
    """{"loss": [(step, loss)], "adherence": {step: {color_acc, ...}}} from a run's metrics.jsonl."""
    out = {"loss": [], "adherence": {}}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        for r in map(json.loads, open(path)):
            if "loss" in r:
                out["loss"].append((int(r["step"]), float(r["loss"])))
            if "eval/adherence/all_acc" in r:
                out["adherence"][int(r["step"])] = {k: float(r[f"eval/adherence/{k}"]) for k in ADHERENCE}
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

    lines = [f"# Findings: {len(rows)} finished runs", "",
             "Mean over seeds, per-seed values in parentheses. `acc` = mean of colour / shape / position accuracy at "
             "the end of training; `gap` = |mean generated pixel - mean test pixel| (0..1).", ""]
    head = "| schedule | prediction | weighting | seeds | " + " | ".join(f"acc {s}@{n}" for s, n in points)
    lines += [head + " | gap (mean over samplers) | final loss |", "|" + "---|" * (len(points) + 6)]
    for key in sorted(by):
        rs = by[key]
        accs = [fmt([ev(r, s, n, "mean_acc") for r in rs]) for s, n in points]
        gaps = [np.nanmean([ev(r, s, n, "brightness_gap") or np.nan for s, n in points]) for r in rs]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {len(rs)} | " + " | ".join(accs)
                     + f" | {fmt(gaps, 3)} | {fmt([r['final_loss'] for r in rs], 3)} |")
    sampler, nfe = max(points, key=lambda p: (p[0] == "dpmpp_2m", p[1]))
    lines += ["", f"## Attribute accuracies ({sampler} {nfe} NFE)", "",
              "| schedule | prediction | weighting | colour | shape | position |", "|---|---|---|---|---|---|"]
    for key in sorted(by):
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                     + " | ".join(fmt([ev(r, sampler, nfe, k) for r in by[key]]) for k in ADHERENCE[:3]) + " |")
    lines += ["", "## During training (ddim 20 NFE, 64 prompts): all attributes correct / mean attribute accuracy", "",
              "| schedule | prediction | weighting | " + " | ".join(
                  f"step {s}" for s in sorted({s for r in rows for s in r["training"]["adherence"]})) + " |"]
    steps = sorted({s for r in rows for s in r["training"]["adherence"]})
    lines.append("|" + "---|" * (len(steps) + 3))
    for key in sorted(by):
        rs = by[key]
        cells = []
        for s in steps:
            allc = [r["training"]["adherence"].get(s, {}).get("all_acc") for r in rs]
            mean = [np.mean([r["training"]["adherence"][s][k] for k in ADHERENCE[:3]])
                    if s in r["training"]["adherence"] else None for r in rs]
            cells.append(f"{fmt(allc)} / {fmt(mean)}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "findings.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, pred in zip(axes, ("eps", "v")):
        for c, key in enumerate(sorted(k for k in by if k[1] == pred)):
            for i, r in enumerate(by[key]):  # one colour per setting, one line per seed
                adh = r["training"]["adherence"]
                st = sorted(adh)
                if st:
                    ax.plot(st, [np.mean([adh[s][k] for k in ADHERENCE[:3]]) for s in st], marker=".", alpha=0.8,
                            color=f"C{c}",
                            ls="-" if key[2] == "min_snr" else "--", label=f"{key[0]}, {key[2]}" if i == 0 else None)
        ax.set_title(f"{pred}-prediction (solid: min-SNR, dashed: uniform)", fontsize=9)
        ax.set_xlabel("training step")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("mean attribute accuracy (ddim 20, 64 prompts)")
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
