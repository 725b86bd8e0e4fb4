"""Stage 2: text-conditioned latent diffusion with a frozen autoencoder and a frozen text encoder.

Per step (Rombach et al. 2022, with the diffusion core's choices from ``config.diffusion``):

    z = (E(x) sample - shift) * scale          frozen VAE (or latent_mean + latent_std * eps from a latent cache)
    c = tau(caption)                           frozen text encoder (or its cached output); captions dropped to ""
                                               with p = caption_dropout
    t ~ p(t)  (diffusion.noise_sampling)       x_t = alpha_t z + sigma_t eps
    loss = mean_b  w(t) || f(x_t, timestep(t), c) - target ||^2     (diffusion.loss: prediction x weighting)

f is the configured backbone (``model.backbone``: U-Net, DiT or MMDiT) behind ``ldm.Denoiser``, which feeds it
x_t and timestep(t), or SD3's rectified-flow input with ``diffusion.network_input="flow"``.

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
import optax
from jax.experimental import multihost_utils

from ldm_jax import diffusion
from ldm_jax.data import DataConfig, DataError, build_latent_cache, make_iterator
from ldm_jax.eval import stage_metrics
from ldm_jax.images import make_grid, save_png
from ldm_jax.ldm import LatentDiffusion, SampleConfig, build
from ldm_jax.models import lora, unbox
from ldm_jax.training.sharding import host_copy
from ldm_jax.training.task import Task
from ldm_jax.types import ConfigError


def cached_latents(batch: dict, rng, vae_config) -> jax.Array:
    """Latents drawn from a latent cache's posterior: (mean + std eps - shift) * scaling_factor."""
    z = batch["latent_mean"] + batch["latent_std"] * jax.random.normal(rng, batch["latent_mean"].shape)
    return (z - vae_config.shift_factor) * vae_config.scaling_factor


def training_context(hidden, pooled, latents, factor: int):
    """The denoiser's context in training: the text states; with SDXL's pooled text (`pooled` not None) also the
    micro-conditioning of an uncropped image at its training size, (h, w, 0, 0, h, w) with (h, w) = the latent
    size x the VAE `factor` (diffusers' training scripts' default without crop bookkeeping; each aspect-ratio
    bucket its own size)."""
    if pooled is None:
        return hidden
    h, w = latents.shape[1] * factor, latents.shape[2] * factor
    ids = jnp.broadcast_to(jnp.asarray([h, w, 0, 0, h, w], jnp.float32), (latents.shape[0], 6))
    return {"text": hidden, "added": {"text_embeds": pooled, "time_ids": ids}}


def noised_loss(denoiser, latents, ctx, r_t, r_noise, schedule, dc: build.DiffusionConfig):
    """(per-example loss (B,), t) of the stage on given latents and text states: t from the configured noise
    sampler, x_t = q_sample(t), the denoiser's output scored by ``diffusion.loss`` (prediction x weighting).
    The planner lowers this same function."""
    t = diffusion.sample_t(dc.noise_sampling, r_t, latents.shape[0], schedule=schedule,
                           **dict(dc.noise_sampling_options))
    noise = jax.random.normal(r_noise, latents.shape)
    x_t = diffusion.q_sample(schedule, latents, t, noise)
    out = denoiser(x_t, t, jax.tree.map(lambda a: a.astype(x_t.dtype), ctx))
    return diffusion.loss(out, latents, noise, t, schedule=schedule, prediction=dc.prediction,
                          **dc.loss_options()), t


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
    ``workdir/latent_cache`` from the frozen VAE's posteriors and the frozen text encoder's hidden states, by
    all processes together (each encodes its part).

    The cache records which encoders made it (the VAE's parameter checksum, the text encoder and its length),
    so a changed VAE, text encoder or dataset rebuilds it instead of training on stale latents.
    """
    path = str(config.data.get("latent_cache", "") or "")
    if path != "auto":
        return path or None
    out = os.path.join(workdir, "latent_cache")
    vae, vae_params, te = model.vae, model.vae_params, model.text_encoder
    posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))

    def encode_images(images):
        mean, logvar = posterior(vae_params, jnp.asarray(images))
        return np.asarray(mean), np.asarray(jnp.exp(0.5 * logvar))

    pooled_text = jax.jit(te.encode_pooled_ids)

    def encode_text(captions):
        if not model.num_time_ids:
            return np.asarray(te.encode(captions))
        hidden, pooled = pooled_text(te.params, *te.tokenize(captions))  # SDXL: the pooled text is cached too
        return {"text_embedding": np.asarray(hidden), "text_pooled": np.asarray(pooled)}

    checksum = float(sum(np.abs(np.asarray(v, np.float64)).sum() for v in jax.tree.leaves(vae_params)))
    ids = {"vae": f"{model.vae.config}|{checksum:.10e}",
           "text": f"{config.model.text_encoder.name}|{config.model.text_encoder.path}|"
                   f"{config.model.text_encoder.get('path_2', '')}|{te.max_length}"}
    source = DataConfig.from_run_config(config, max_length=te.max_length, latent_cache=None)
    # Every process encodes its part (the workdir is shared storage in a multi-process run).
    together = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                    barrier=multihost_utils.sync_global_devices if jax.process_count() > 1 else None)
    # The workdir's own cache is derived data: one made from other data or encoders is rebuilt, not an error.
    try:
        build_latent_cache(source, encode_images, encode_text, out, int(config.data.batch_size), encoder_ids=ids,
                           **together)
    except DataError:
        build_latent_cache(source, encode_images, encode_text, out, int(config.data.batch_size), encoder_ids=ids,
                           overwrite=True, **together)
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

    lora_cfg = build.lora_config(config)
    if lora_cfg is not None:  # adapters on the frozen pretrained network are the trained parameters
        if pretrained is None:
            raise ConfigError(f"lora.rank={lora_cfg.rank} trains adapters on a frozen network: set "
                              f"model.{model.backbone}.pretrained (a diffusers folder or a latent-diffusion workdir)")
        frozen["base"], pretrained = pretrained, None
    base_shapes = jax.eval_shape(lambda: frozen["base"]) if lora_cfg is not None else None

    def init(rng):
        if lora_cfg is not None:
            return lora.init_lora(lora_cfg, base_shapes, rng)  # up = 0: the step-0 model is the base exactly
        x = jnp.zeros((1, *latent_shape), jnp.float32)
        ctx = jnp.zeros((1, te.max_length, te.hidden_size), jnp.float32)
        added = {"added": conditioning(ctx, jnp.zeros((1, te.pooled_size or 0)), x)["added"]} if num_ids else {}
        return model.unet.init(rng, x, jnp.zeros((1,)), ctx, **added)["params"]  # pretrained: Task.pretrained

    num_ids = model.num_time_ids  # SDXL's text_time U-Net: pooled text and micro-conditioning beside the states

    def conditioning(hidden, pooled, latents):
        return training_context(hidden, pooled if num_ids else None, latents, f)

    if num_ids not in (0, 6):
        raise ConfigError(f"this U-Net takes {num_ids} time ids (a refiner's); training uses the base's 6: set "
                          "model.unet.projection_class_embeddings_input_dim to pooled width + 6 x "
                          "addition_time_embed_dim")

    def network_params(params, frozen):
        """The denoiser's weights: the trained tree, or the frozen base with the trained adapter applied."""
        return params if lora_cfg is None else lora.apply_lora(frozen["base"], [(params, 1.0)])

    def per_example_loss(params, batch, rng, schedule, frozen):
        r_lat, r_t, r_noise = jax.random.split(rng, 3)
        if "latent_mean" in batch:
            latents = cached_latents(batch, r_lat, model.vae_config)
        else:
            latents = model.vae.apply({"params": frozen["vae"]}, batch["image"], r_lat, method=model.vae.latents)
        latents = jax.lax.stop_gradient(latents.astype(jnp.float32))
        pooled = None
        if "text_embedding" in batch:  # from the latent cache (caption dropout already applied)
            hidden, pooled = batch["text_embedding"], batch.get("text_pooled")
        elif num_ids:
            hidden, pooled = te.encode_pooled_ids(frozen["text"], batch["input_ids"], batch.get("attention_mask"))
        else:
            hidden = te.encode_ids(frozen["text"], batch["input_ids"], batch.get("attention_mask"))
        ctx = conditioning(hidden, pooled, latents)
        return noised_loss(model.denoiser(network_params(params, frozen), schedule), latents,
                           jax.lax.stop_gradient(ctx), r_t, r_noise, schedule, dc)

    def schedule_of(extra):
        """The schedule of this step: a learned one from its trained parameters, else the fixed one."""
        return dc.make_schedule(jax.lax.stop_gradient(extra["params"])) if dc.learned else model.schedule

    def loss_fn(params, batch, rng, step, *, frozen, extra):
        del step
        per_example, t = per_example_loss(params, batch, rng, schedule_of(extra), frozen)
        return jnp.mean(per_example), {"mse_t_mean": jnp.mean(t)}

    keys = ("latent_mean", "latent_std", "text_embedding", "input_ids", "attention_mask") if dcfg.latent_cache else (
        "image", "input_ids", "attention_mask")
    if dcfg.latent_cache and num_ids:
        keys += ("text_pooled",)

    def iterator(process_index, process_count):
        it = make_iterator(dcfg, tokenizer=te.tokenize_dict, process_index=process_index,
                           process_count=process_count)
        return NumericBatches(it, keys)

    learned = learned_schedule_updates(dc, per_example_loss, float(config.optimizer.lr)) if dc.learned else {}
    task = Task(name="ldm", init=init, loss_fn=loss_fn, make_iterator=iterator, batch_size=dcfg.batch_size,
                frozen=frozen, pretrained=pretrained, **learned)

    def current(state, ema_params):
        """What generation uses at this step: the EMA denoiser (with a LoRA run's EMA adapter merged into the
        base) and the step's schedule."""
        params = unbox(ema_params)
        if lora_cfg is not None:  # the adapter gathered to host on every process (a collective), merged there
            params = network_params(host_copy(params), frozen)
        return params, (schedule_of(state.extra) if dc.learned else None)

    callbacks = []
    if sample.every_steps > 0:
        callbacks.append(SampleGrid(model, sample, workdir, current))
    generate = functools.partial(_generate_from, model)
    callbacks += stage_metrics.ldm_callbacks(config, generate, params_of=current)  # config.eval
    return task, callbacks


def learned_schedule_updates(dc, per_example_loss, lr: float) -> dict:
    """``init_extra`` / ``update_extra`` of a learned schedule trained with the network (Kingma et al. 2021, VDM).

    Under the ELBO weighting the expected loss does not depend on the schedule between its endpoints, so the
    schedule's parameters follow the gradient of the loss variance, E[L^2] (VDM Sec. 5.2); the endpoints
    (logsnr_min, logsnr_max) stay fixed. Adam at the run's learning rate. The U-Net parameters get no gradient
    from this update (it runs after theirs, with the parameters the loss saw).
    """
    tx = optax.adam(lr)
    fixed = ("logsnr_min", "logsnr_max")

    def init_extra(rng):
        params = dc.init_schedule_params(rng)
        return {"params": params, "opt_state": tx.init(params)}

    def update_extra(extra, params, batch, rng, step, *, frozen):
        del step

        def second_moment(schedule_params):
            per_example, _ = per_example_loss(jax.lax.stop_gradient(params), batch, rng,
                                              dc.make_schedule(schedule_params), frozen)
            return jnp.mean(jnp.square(per_example))

        moment, grads = jax.value_and_grad(second_moment)(extra["params"])
        grads = {k: jnp.zeros_like(g) if k in fixed else g for k, g in grads.items()}
        updates, opt_state = tx.update(grads, extra["opt_state"], extra["params"])
        return {"params": optax.apply_updates(extra["params"], updates), "opt_state": opt_state}, {
            "schedule_loss_second_moment": moment}

    return {"init_extra": init_extra, "update_extra": update_extra}


def _generate_from(model: LatentDiffusion, current, prompts, **settings):
    """``generate(current, prompts, **settings) -> uint8`` with ``current = (U-Net parameters, schedule or None)``
    (see `make_task`'s ``current``)."""
    unet_params, schedule = current
    return model.generate(prompts, unet_params=unet_params, schedule=schedule, **settings)


class SampleGrid:
    """Callback: every ``sample.every_steps`` a grid of ``sample.prompts`` from the EMA parameters (the images
    `LatentDiffusion.generate` gives for the same settings, tiled by ``images.make_grid``)."""

    def __init__(self, model: LatentDiffusion, sample: SampleConfig, workdir: str, current):
        self.model, self.sample, self.current = model, sample, current
        self.dir = os.path.join(workdir, "samples")

    def __call__(self, step, state):
        if step % self.sample.every_steps:
            return None
        # every process generates (the EMA parameters may be sharded across processes); process 0 writes
        unet_params, schedule = self.current(state, state.ema_params)
        images = self.model.generate(list(self.sample.prompts), unet_params=unet_params, schedule=schedule,
                                     **self.sample.generate_kwargs())
        if jax.process_index() != 0:
            return None
        grid = make_grid(images)
        os.makedirs(self.dir, exist_ok=True)
        save_png(os.path.join(self.dir, f"{step:07d}.png"), grid)
        return {"samples": grid}
