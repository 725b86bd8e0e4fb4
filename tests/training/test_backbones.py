"""The transformer backbones through the real latent-diffusion stage: configs/shapes_dit.py:tiny and
configs/shapes_mmdit.py:tiny train by rectified flow on the tiny shapes autoencoder (the loss falls), their
sample grid comes from the one `LatentDiffusion.generate`, and the workdir samples the same pixels through
`LatentDiffusion.from_workdir` (the path `ldm-jax sample` takes)."""

import os

import numpy as np
import pytest
from PIL import Image

from ldm_jax.configlib import load_config
from ldm_jax.images import make_grid
from ldm_jax.ldm import LatentDiffusion
from ldm_jax.training import run
from ldm_jax.training.writers import read_metrics

STEPS = 30


@pytest.mark.parametrize("name", ["dit", "mmdit"])
def test_flow_matching_run_trains_and_samples_through_the_one_path(name, tiny_autoencoder, tmp_path):
    ae_dir, data_dir = tiny_autoencoder
    c = load_config(f"configs/shapes_{name}.py:tiny")
    assert c.model.backbone == name and c.diffusion.network_input == "flow" and c.diffusion.prediction == "flow"
    c.model.vae.workdir, c.data.data_dir = ae_dir, data_dir
    c.train.num_steps, c.train.log_every_steps = STEPS, 5
    c.checkpoint.every_steps = c.sample.every_steps = STEPS
    c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 5
    workdir = str(tmp_path / name)
    run(c, workdir)

    losses = [r["loss"] for r in read_metrics(workdir) if "loss" in r]
    assert len(losses) == STEPS // 5 and np.all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses

    model = LatentDiffusion.from_workdir(workdir)
    assert model.backbone == name and model.network_input == "flow"
    s = c.sample
    images = model.generate(list(s.prompts), seed=int(s.seed), sampler=str(s.sampler), num_steps=int(s.num_steps),
                            guidance_scale=float(s.guidance_scale))
    assert images.shape == (2, 16, 16, 3) and images.std() > 1
    grid = np.asarray(Image.open(os.path.join(workdir, "samples", f"{STEPS:07d}.png")))
    np.testing.assert_array_equal(grid, make_grid(images))
