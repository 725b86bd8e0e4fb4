"""What bitwise reproducibility costs in `LatentDiffusion.generate`: batched sums vs fixed micro-batches.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python experiments/benchmarks/generate_micro_batch.py

The model is the demo's architecture (configs/shapes_ldm.py: U-Net (64, 128) on 8 x 8 x 8 latents, MiniLM-L6
text encoder, the tiny VAE) with random, perturbed weights; 18 prompts, DDIM 20 steps, guidance 3. Measured:
- `unbatched_diff`: the largest difference between an image's latents computed in a batch of 18 and alone,
  with the network run on the whole batch at once (what float sums do: the reason for micro-batches);
- `equal_*`: whether `generate` gives identical pixels alone / in the batch / on 1 or 8 devices;
- seconds per call (median of 3 after a warm-up) of the 18 images on one device with micro_batch = 1 (the
  default), 6 and 18.
Writes generate_micro_batch.json beside this file.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import diffusion
from ldm_jax.configlib import load_config
from ldm_jax.eval.adherence import demo_prompts
from ldm_jax.ldm import LatentDiffusion, SamplingDefaults, build
from ldm_jax.models import AutoencoderKL, UNet, presets, unbox
from ldm_jax.models.text_encoder import TextEncoder


def _model() -> LatentDiffusion:
    cfg = load_config("configs/shapes_ldm.py")
    te = TextEncoder.minilm(max_length=int(cfg.model.text_encoder.max_length))
    vae_cfg = presets.tiny_vae(latent_channels=8)
    unet_cfg = build.unet_config(cfg.model.unet, cross_attention_dim=te.hidden_size, in_channels=8, out_channels=8)
    side = cfg.data.resolution // vae_cfg.downsample_factor
    key = jax.random.key(0)
    unet = unbox(UNet(unet_cfg).init(key, jnp.zeros((1, side, side, 8)), jnp.zeros((1,)),
                                     jnp.zeros((1, te.max_length, te.hidden_size)))["params"])
    unet = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(9), p.shape), unet)  # off zero-init
    vae = unbox(AutoencoderKL(vae_cfg).init(key, jnp.zeros((1, cfg.data.resolution, cfg.data.resolution, 3)))["params"])
    schedule = build.schedule(cfg.diffusion)
    return LatentDiffusion(unet_cfg, unet, vae_cfg, vae, te, schedule, prediction=str(cfg.diffusion.prediction),
                           defaults=SamplingDefaults.for_schedule(schedule), default_size=cfg.data.resolution)


def _unbatched_diff(model: LatentDiffusion, prompts) -> float:
    """Max |x0(batch) - x0(alone)| with the sampling loop run on the whole batch (no micro-batches)."""
    te = model.text_encoder
    ctx = te.encode(prompts)
    side = model.size // model.downsample_factor
    noise = jax.random.normal(jax.random.key(1), (len(prompts), side, side, model.latent_channels))
    denoiser = model.denoiser()

    @jax.jit
    def run(noise, ctx):
        fn = jax.tree_util.Partial(lambda d, c, x, t: d(x, t, c), denoiser, ctx)
        return diffusion.sample(fn, noise, schedule=model.schedule, prediction=model.prediction, sampler="ddim",
                                num_steps=20)

    batch = np.asarray(run(noise, ctx))
    alone = np.concatenate([np.asarray(run(noise[i:i + 1], ctx[i:i + 1])) for i in range(len(prompts))])
    return float(np.abs(batch - alone).max())


def _seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    model = _model()
    prompts, _ = demo_prompts()
    opts = dict(sampler="ddim", num_steps=20, guidance_scale=3.0, seed=0)
    one = jax.devices()[:1]
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "jax": jax.__version__, "devices": len(jax.devices()), "images": len(prompts),
              "unbatched_diff": _unbatched_diff(model, prompts)}
    batch = model.generate(prompts, devices=one, **opts)
    result["equal_alone"] = bool(np.array_equal(model.generate(prompts[5:6], **{**opts, "seed": 5})[0], batch[5]))
    result["equal_8_devices"] = bool(np.array_equal(model.generate(prompts, **opts), batch))
    for micro in (1, 6, 18):
        result[f"seconds_micro_batch_{micro}"] = _seconds(
            lambda m=micro: model.generate(prompts, devices=one, micro_batch=m, **opts))
    print(json.dumps(result, indent=1))
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "generate_micro_batch.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
