"""ldm-jax demo [--workdir=runs/demo] [--variant=tiny]

The main job on the embedded default: builds the `shapes` dataset, trains the autoencoder (stage 1) and the
text-conditioned latent diffusion model (stage 2, MiniLM-L6 text encoder, caption dropout), samples a grid
for a fixed prompt list that includes color x shape pairs held out from training, scores it with the
shapes checker and writes WORKDIR/samples.png and WORKDIR/summary.json. Rerunning continues from the
workdir (finished stages are skipped); delete the workdir (`make clean-demo`) to start fresh.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from absl import flags

from ldm_jax.commands._app import fail, run_or_fail, start
from ldm_jax.configlib import load_config
from ldm_jax.eval.adherence import demo_prompts
from ldm_jax.eval.generated import evaluate_generated
from ldm_jax.images import make_grid, save_png
from ldm_jax.ldm import LatentDiffusion
from ldm_jax.training import run

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where both stages, samples.png and summary.json go.")
_VARIANT = flags.DEFINE_string("variant", "", "Config variant of both stages ('tiny': a seconds-long smoke run).")
_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def run_demo(workdir: str, variant: str = "") -> dict:
    t0 = time.time()
    suffix = f":{variant}" if variant else ""
    ae_cfg = load_config(str(_CONFIGS / "shapes_autoencoder.py") + suffix)
    ldm_cfg = load_config(str(_CONFIGS / "shapes_ldm.py") + suffix)
    ae_dir, ldm_dir = os.path.join(workdir, "autoencoder"), os.path.join(workdir, "ldm")
    ldm_cfg.model.vae.workdir = ae_dir
    for cfg in (ae_cfg, ldm_cfg):  # the dataset lives with the run: deleting the workdir starts fresh
        cfg.data.data_dir = cfg.data.data_dir or os.path.join(workdir, "data")
    print(f"[demo 1/3] autoencoder -> {ae_dir}", flush=True)
    run(ae_cfg, ae_dir)
    print(f"[demo 2/3] latent diffusion -> {ldm_dir}", flush=True)
    run(ldm_cfg, ldm_dir)
    print("[demo 3/3] sampling and scoring", flush=True)
    model = LatentDiffusion.from_workdir(ldm_dir)
    settings = model.sample.generate_kwargs()
    seed = settings.pop("seed")
    # 4 images per prompt (72 scored): the evaluation `ldm-jax evaluate --num_samples=72` runs
    summary, images, _ = evaluate_generated(
        "shapes", lambda p, s: model.generate(p, seed=s, batch_size=72, **settings), num_samples=72, seed=seed,
        return_images=True)
    grid_path = os.path.join(workdir, "samples.png")
    save_png(grid_path, make_grid(images, cols=6))
    base, heldout = demo_prompts()
    summary.update(minutes=(time.time() - t0) / 60, num_images=len(images), prompts=base,
                   heldout_pairs=[p for p, h in zip(base, heldout) if h], samples=grid_path, seed=seed,
                   **{k: settings[k] for k in ("sampler", "num_steps", "guidance_scale")})
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"demo done in {summary['minutes']:.1f} min: color_acc={summary['color_acc']:.3f} "
          f"shape_acc={summary['shape_acc']:.3f} position_acc={summary['position_acc']:.3f} "
          f"(held-out pairs: color {summary.get('heldout_color_acc', float('nan')):.3f}, "
          f"shape {summary.get('heldout_shape_acc', float('nan')):.3f}); images: {grid_path}", flush=True)
    return summary


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    if _VARIANT.value not in ("", "tiny"):
        fail(f"--variant={_VARIANT.value!r}: use 'tiny' or leave it empty")
    run_or_fail(run_demo, _WORKDIR.value, _VARIANT.value)


def run_cli(argv):
    start(main, argv)
