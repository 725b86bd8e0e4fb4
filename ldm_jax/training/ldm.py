"""Stage 2: text-conditioned latent diffusion with a frozen autoencoder and a frozen text encoder.

Per step (Rombach et al. 2022, with the diffusion core's choices from ``config.diffusion``):

    z = (E(x) sample - shift) * scale          frozen VAE (or latent_mean + latent_std * eps from a latent cache)
    c = tau(caption)                           frozen text encoder (or its cached output); captions dropped to ""
                                               with p = caption_dropout
    t ~ p(t)  (diffusion.noise_sampling)       x_t = alpha_t z + sigma_t eps
    loss = mean_b  w(t) || f(x_t, timestep(t), c) - target ||^2     (diffusion.loss: prediction x weighting)

``data.latent_cache="auto"`` encodes the dataset once into ``workdir/latent_cache`` (VAE posteriors and
text-encoder states), which removes both frozen encoders from the training step.

The model is a `LatentDiffusion` built from the config (``ldm_jax.ldm``); the sample callback draws a grid for
``config.sample.prompts`` from the EMA parameters through its one `generate` (the images ``ldm-jax sample`` makes
from the checkpoint of that step, bit for bit) every ``sample.every_steps`` steps and saves it as
``workdir/samples/<step>.png``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import diffusion
from ldm_jax.data import DataConfig, DataError, build_latent_cache, make_iterator
from ldm_jax.eval import stage_metrics
from ldm_jax.images import make_grid, save_png
from ldm_jax.ldm import LatentDiffusion, SampleConfig, build
from ldm_jax.models import unbox
from ldm_jax.training.task import Task
from ldm_jax.types import ConfigError


class NumericBatches:
    """Wraps a data iterator, keeping only array fields that go to the device (captions stay on the host)."""

    def __init__(self, iterator, keys):
        self.iterator, self.keys = iterator, tuple(keys)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        return {k: batch[k] for k in self.keys if k in batch}

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def ensure_latent_cache(config, model: LatentDiffusion, workdir: str) -> str | None:
    """The latent cache the stage reads: ``data.latent_cache`` as given, or with "auto" one built (once) in
    ``workdir/latent_cache`` from the frozen VAE's posteriors and the frozen text encoder's hidden states.

    The cache records which encoders made it (the VAE's parameter checksum, the text encoder and its length),
    so a changed VAE, text encoder or dataset rebuilds it instead of training on stale latents.
    """
    path = str(config.data.get("latent_cache", "") or "")
    if path != "auto":
        return path or None
    if jax.process_count() > 1:
        raise ConfigError("data.latent_cache='auto' builds the cache on one host; build it once "
                          "(ldm_jax.data.build_latent_cache) and pass its path as data.latent_cache")
    out = os.path.join(workdir, "latent_cache")
    vae, vae_params, te = model.vae, model.vae_params, model.text_encoder
    posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))

    def encode_images(images):
        mean, logvar = posterior(vae_params, jnp.asarray(images))
        return np.asarray(mean), np.asarray(jnp.exp(0.5 * logvar))

    def encode_text(captions):
        return np.asarray(te.encode(captions))

    checksum = float(sum(np.abs(np.asarray(v, np.float64)).sum() for v in jax.tree.leaves(vae_params)))
    ids = {"vae": f"{model.vae.config}|{checksum:.10e}",
           "text": f"{config.model.text_encoder.name}|{config.model.text_encoder.path}|{te.max_length}"}
    source = DataConfig.from_run_config(config, max_length=te.max_length, latent_cache=None)
    # The workdir's own cache is derived data: one made from other data or encoders is rebuilt, not an error.
    try:
        build_latent_cache(source, encode_images, encode_text, out, int(config.data.batch_size), encoder_ids=ids)
    except DataError:
        build_latent_cache(source, encode_images, encode_text, out, int(config.data.batch_size), encoder_ids=ids,
                           overwrite=True)
    return out


def make_task(config, workdir: str):
    """(Task, callbacks) of the latent-diffusion stage."""
    model = LatentDiffusion.from_config(config)  # U-Net parameters: a pretrained folder's, or None (from init)
    frozen = {"vae": model.vae_params, "text": model.text_encoder.params}
    pretrained, model = model.unet_params, model.replace(unet_params=None)
    sample = model.sample  # the typed `sample` section, checked before any step runs
    cache = ensure_latent_cache(config, model, workdir)
    te = model.text_encoder
    dcfg = DataConfig.from_run_config(config, max_length=te.max_length, latent_cache=cache)
    f = model.downsample_factor
    if dcfg.resolution % f:
        raise ConfigError(f"data.resolution={dcfg.resolution} is not a multiple of the VAE's factor {f}")
    latent_shape = (dcfg.resolution // f, dcfg.resolution // f, model.latent_channels)
    dc = build.diffusion_config(config.diffusion)  # typed here; the traced loss reads only its fields
    dc.check(model.schedule)
    noise_sampling, noise_options, loss_options = dc.noise_sampling, dict(dc.noise_sampling_options), dc.loss_options()

    def init(rng):
        x = jnp.zeros((1, *latent_shape), jnp.float32)
        ctx = jnp.zeros((1, te.max_length, te.hidden_size), jnp.float32)
        return model.unet.init(rng, x, jnp.zeros((1,)), ctx)["params"]  # pretrained weights: Task.pretrained

    def loss_fn(params, batch, rng, step, *, frozen, extra):
        del step, extra
        r_lat, r_t, r_noise = jax.random.split(rng, 3)
        if "latent_mean" in batch:
            eps = jax.random.normal(r_lat, batch["latent_mean"].shape)
            z = batch["latent_mean"] + batch["latent_std"] * eps
            cfg = model.vae_config
            latents = (z - cfg.shift_factor) * cfg.scaling_factor
        else:
            latents = model.vae.apply({"params": frozen["vae"]}, batch["image"], r_lat, method=model.vae.latents)
        latents = jax.lax.stop_gradient(latents.astype(jnp.float32))
        if "text_embedding" in batch:  # from the latent cache (caption dropout already applied)
            ctx = batch["text_embedding"]
        else:
            ctx = te.encode_ids(frozen["text"], batch["input_ids"], batch.get("attention_mask"))
        ctx = jax.lax.stop_gradient(ctx)
        b = latents.shape[0]
        t = diffusion.sample_t(noise_sampling, r_t, b, schedule=model.schedule, **noise_options)
        noise = jax.random.normal(r_noise, latents.shape)
        x_t = diffusion.q_sample(model.schedule, latents, t, noise)
        out = model.denoiser(params)(x_t, t, ctx.astype(x_t.dtype))
        per_example = diffusion.loss(out, latents, noise, t, schedule=model.schedule, prediction=model.prediction,
                                     **loss_options)
        return jnp.mean(per_example), {"mse_t_mean": jnp.mean(t)}

    keys = ("latent_mean", "latent_std", "text_embedding", "input_ids", "attention_mask") if dcfg.latent_cache else (
        "image", "input_ids", "attention_mask")

    def iterator(process_index, process_count):
        it = make_iterator(dcfg, tokenizer=te.tokenize_dict, process_index=process_index,
                           process_count=process_count)
        return NumericBatches(it, keys)

    task = Task(name="ldm", init=init, loss_fn=loss_fn, make_iterator=iterator, batch_size=dcfg.batch_size,
                frozen=frozen, pretrained=pretrained)
    callbacks = []
    if sample.every_steps > 0:
        callbacks.append(SampleGrid(model, sample, workdir))
    generate = functools.partial(_generate_from, model)
    callbacks += stage_metrics.ldm_callbacks(config, generate)  # config.eval
    return task, callbacks


def _generate_from(model: LatentDiffusion, params, prompts, **settings):
    """``generate(params, prompts, **settings) -> uint8``: the model's generate with U-Net parameters `params`."""
    return model.generate(prompts, unet_params=unbox(params), **settings)


class SampleGrid:
    """Callback: every ``sample.every_steps`` a grid of ``sample.prompts`` from the EMA parameters (the images
    `LatentDiffusion.generate` gives for the same settings, tiled by ``images.make_grid``)."""

    def __init__(self, model: LatentDiffusion, sample: SampleConfig, workdir: str):
        self.model, self.sample = model, sample
        self.dir = os.path.join(workdir, "samples")

    def __call__(self, step, state):
        if step % self.sample.every_steps:
            return None
        # every process generates (the EMA parameters may be sharded across processes); process 0 writes
        images = self.model.generate(list(self.sample.prompts), unet_params=unbox(state.ema_params),
                                     **self.sample.generate_kwargs())
        if jax.process_index() != 0:
            return None
        grid = make_grid(images)
        os.makedirs(self.dir, exist_ok=True)
        save_png(os.path.join(self.dir, f"{step:07d}.png"), grid)
        return {"samples": grid}
