"""Both real stages end to end through the main job's code path (`ldm-jax demo --variant=tiny`):
shapes dataset -> autoencoder -> text-conditioned LDM -> guided samples -> shapes scores."""

import json
import os
import subprocess
import sys

import numpy as np

from ldm_jax.commands.demo import demo_prompts, run_demo
from ldm_jax.training.writers import read_metrics


def test_demo_tiny_runs_both_stages_and_resumes(tmp_path):
    workdir = str(tmp_path / "demo")
    summary = run_demo(workdir, "tiny")

    ae = read_metrics(os.path.join(workdir, "autoencoder"))
    losses = [r["loss"] for r in ae if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], f"autoencoder loss did not fall: {losses}"
    assert os.path.exists(os.path.join(workdir, "autoencoder", "samples", "0000030.png"))

    ldm = read_metrics(os.path.join(workdir, "ldm"))
    assert [r["step"] for r in ldm if "loss" in r] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in ldm if "loss" in r)
    assert os.path.exists(os.path.join(workdir, "ldm", "samples", "0000004.png"))

    prompts, heldout = demo_prompts()
    assert sum(heldout) == 3 and len(prompts) == 18
    for key in ("color_acc", "shape_acc", "position_acc", "heldout_color_acc", "heldout_shape_acc", "minutes"):
        assert 0.0 <= summary[key] <= (1.0 if key != "minutes" else 60.0), key
    assert summary["num_images"] == 36
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["color_acc"] == summary["color_acc"]
    assert os.path.getsize(os.path.join(workdir, "samples.png")) > 1000

    # the trained workdir samples through the `ldm-jax sample` CLI (EMA parameters, PNG metadata)
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "ldm_jax", "sample", f"--model={workdir}/ldm",
                           "--prompt=a red circle in the top left", "--steps=3", "--guidance=2", "--seed=5",
                           "--num-images=2", f"--out={out}", "--height=16", "--width=16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png") and p != "grid.png")
    assert len(pngs) == 2
    from PIL import Image

    meta = Image.open(out / pngs[0]).text
    assert "a red circle" in meta.get("prompt", "") and meta.get("seed") in ("5", "6"), meta

    again = run_demo(workdir, "tiny")  # rerun continues: both stages are finished, nothing retrains
    assert len(read_metrics(os.path.join(workdir, "autoencoder"))) == len(ae)
    assert again["color_acc"] == summary["color_acc"]
