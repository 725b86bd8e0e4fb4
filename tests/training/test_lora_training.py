"""LoRA fine-tuning through the real latent-diffusion stage: `lora.rank > 0` on a trained workdir
(`model.unet.pretrained`) checkpoints only the adapter, never touches the base run, samples through the one
generate path (grid = `LatentDiffusion.from_workdir`), and the adapter written as a LoRA file
(`ldm_jax.convert.lora.save_lora`) merged into the base model by `with_lora` gives the same pixels."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from ldm_jax.configlib import load_config
from ldm_jax.convert.lora import save_lora
from ldm_jax.images import make_grid
from ldm_jax.ldm import LatentDiffusion, build
from ldm_jax.ldm.loading import lora_adapter
from ldm_jax.ldm.workdirs import restore_params
from ldm_jax.models.weights import flatten
from ldm_jax.training import run
from ldm_jax.training.writers import read_metrics
from ldm_jax.types import ConfigError


def _digest(root) -> dict:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def base_run(tiny_autoencoder, tmp_path_factory):
    """(autoencoder, data, base latent-diffusion workdir): shapes_ldm:tiny trained 4 steps."""
    ae_dir, data_dir = tiny_autoencoder
    base = str(tmp_path_factory.mktemp("lora_base") / "base")
    c = load_config("configs/shapes_ldm.py:tiny")
    c.model.vae.workdir, c.data.data_dir = ae_dir, data_dir
    c.sample.every_steps = 0
    run(c, base)
    return ae_dir, data_dir, base


def test_lora_run_trains_only_the_adapter_and_samples_through_the_one_path(base_run, tmp_path):
    ae_dir, data_dir, base_dir = base_run
    before = _digest(base_dir)
    c = load_config("configs/shapes_ldm.py:tiny")
    c.model.vae.workdir, c.data.data_dir = ae_dir, data_dir
    c.model.unet.pretrained = base_dir
    # the 4-step base's zero-initialised conv_out still hides its attention layers: adapt conv_out too
    c.lora.rank, c.lora.alpha, c.lora.targets = 2, 4.0, ("attention", "conv_out")
    c.optimizer.lr, c.optimizer.warmup_steps = 5e-2, 0
    c.train.num_steps = c.checkpoint.every_steps = c.sample.every_steps = 2
    c.train.ema.decay = 0.0  # sample the trained adapter itself (an EMA of 2 steps would stay at the base)
    workdir = str(tmp_path / "lora")
    run(c, workdir)
    assert _digest(base_dir) == before  # the base run is read, never written

    losses = [r["loss"] for r in read_metrics(workdir) if "loss" in r]
    assert len(losses) == 1 and np.all(np.isfinite(losses))
    saved = restore_params(workdir, ema=False)
    leaves = flatten(saved)
    assert leaves and all(k.endswith(("/down", "/up")) for k in leaves)  # only adapter factors are trained
    base_params = restore_params(base_dir)
    n_adapter, n_base = sum(v.size for v in leaves.values()), sum(v.size for v in flatten(base_params).values())
    assert n_adapter < 0.1 * n_base
    ranks = {v.shape[-1] if k.endswith("/down") else v.shape[-2 if v.ndim == 4 else 0] for k, v in leaves.items()}
    assert ranks == {2}  # down (in, r) / (kh, kw, in, r), up (r, out) / (1, 1, r, out)
    assert any(np.abs(v).max() > 0 for k, v in leaves.items() if k.endswith("/up"))  # up left zero: it trained

    s = c.sample
    settings = dict(seed=int(s.seed), sampler=str(s.sampler), num_steps=int(s.num_steps),
                    guidance_scale=float(s.guidance_scale))
    tuned = LatentDiffusion.from_workdir(workdir)
    images = tuned.generate(list(s.prompts), **settings)
    grid = np.asarray(Image.open(os.path.join(workdir, "samples", "0000002.png")))
    np.testing.assert_array_equal(grid, make_grid(images))
    # the base run's weights in the same model object (its compiled generation is reused): other images
    base = tuned.replace(unet_params=LatentDiffusion.from_workdir(base_dir).unet_params)
    assert np.abs(base.generate(list(s.prompts), **settings).astype(int) - images).mean() > 0.5

    # the EMA adapter as a LoRA file (diffusers layout), merged into the base model: the same pixels
    cfg = build.lora_config(c)
    adapter = lora_adapter(cfg, base.unet_params, restore_params(workdir))
    path = save_lora(str(tmp_path / "shapes_lora.safetensors"), adapter, unet_cfg=base.unet_config)
    np.testing.assert_array_equal(base.with_lora(path).generate(list(s.prompts), **settings), images)


def test_lora_needs_a_base_network(tmp_path):
    c = load_config("configs/shapes_ldm.py:tiny")
    c.model.vae.workdir = ""
    c.lora.rank = 4
    with pytest.raises(ConfigError, match=r"lora.rank=4 trains adapters on a frozen network: set model.unet.pre"):
        run(c, str(tmp_path / "w"))
    c.lora.dropout = 0.1
    with pytest.raises(ConfigError, match="lora.dropout=0.1"):
        run(c, str(tmp_path / "w"))
