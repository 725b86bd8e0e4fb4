"""Stage 2: text-conditioned latent diffusion with a frozen autoencoder and a frozen text encoder.

Per step (Rombach et al. 2022, with the diffusion core's choices from ``config.diffusion``):

    z = (E(x) sample - shift) * scale          frozen VAE (or latent_mean + latent_std * eps from a latent cache)
    c = tau(caption)                           frozen text encoder (or its cached output); captions dropped to ""
                                               with p = caption_dropout
    t ~ p(t)  (diffusion.noise_sampling)       x_t = alpha_t z + sigma_t eps
    loss = mean_b  w(t) || f(x_t, timestep(t), c) - target ||^2     (diffusion.loss: prediction x weighting)

``data.latent_cache="auto"`` encodes the dataset once into ``workdir/latent_cache`` (VAE posteriors and
text-encoder states), which removes both frozen encoders from the training step.

The sample callback draws a grid for ``config.sample.prompts`` from the EMA parameters with classifier-free
guidance every ``sample.every_steps`` steps and saves it as ``workdir/samples/<step>.png``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import diffusion
from ldm_jax.data import make_iterator
from ldm_jax.eval import stage_metrics
from ldm_jax.models import AutoencoderKL, UNet, unbox
from ldm_jax.training import components
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


@dataclasses.dataclass(frozen=True, eq=False)
class LatentDiffusion:
    """The networks of stage 2 and the functions built on them (shared by training, sampling, evaluation)."""

    unet: UNet
    vae: AutoencoderKL
    text: object            # models.text_encoder.TextEncoder
    schedule: object
    prediction: str

    def model_fn(self, unet_params):
        """(x_t, t, context) -> network output, t in [0, 1] mapped to the network's timesteps."""
        def fn(x, t, context):
            return self.unet.apply({"params": unet_params}, x, self.schedule.timestep(t), context)
        return fn

    def generate(self, unet_params, vae_params, text_params, ids, mask, uncond_ids, uncond_mask, noise, *,
                 guidance_scale: float, sampler: str, num_steps: int, rng):
        """Images in [-1, 1] for tokenized prompts; pure (jit it with the sampling options static)."""
        ctx = self.text.encode_ids(text_params, ids, mask)
        uctx = self.text.encode_ids(text_params, uncond_ids, uncond_mask)
        denoise = diffusion.cfg(self.model_fn(unet_params), ctx, uctx, guidance_scale)
        z = diffusion.sample(denoise, noise, schedule=self.schedule, prediction=self.prediction,
                             sampler=sampler, num_steps=num_steps, rng=rng)
        return self.vae.apply({"params": vae_params}, z, method=self.vae.decode_latents)


def build(config):
    """(LatentDiffusion, frozen params {vae, text}, unet config, pretrained unet params or None)."""
    te = components.text_encoder(config.model.text_encoder)
    vae_cfg, vae_params = components.frozen_vae(config.model.vae)
    pre = components.pretrained_unet(config.model.unet)
    if pre is not None:
        unet_cfg, unet_params = pre
    else:
        unet_cfg = components.unet_config(config.model.unet, cross_attention_dim=te.hidden_size,
                                          in_channels=vae_cfg.latent_channels,
                                          out_channels=vae_cfg.latent_channels,
                                          **components.compute_options(config))
        unet_params = None
    if unet_cfg.cross_attention_dim != te.hidden_size:
        raise ConfigError(f"model.unet.cross_attention_dim={unet_cfg.cross_attention_dim} but the text encoder "
                          f"gives {te.hidden_size}-wide states: make them equal")
    model = LatentDiffusion(UNet(unet_cfg), AutoencoderKL(vae_cfg), te, components.schedule(config.diffusion),
                            str(config.diffusion.prediction))
    frozen = {"vae": components.as_arrays(unbox(vae_params)), "text": te.params}
    return model, frozen, unet_cfg, unet_params


def ensure_latent_cache(config, model: LatentDiffusion, frozen, workdir: str) -> str | None:
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
    from ldm_jax.data import build_latent_cache
    from ldm_jax.data.common import DataError

    out = os.path.join(workdir, "latent_cache")
    vae, vae_params, te = model.vae, frozen["vae"], model.text
    posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))

    def encode_images(images):
        mean, logvar = posterior(vae_params, jnp.asarray(images))
        return np.asarray(mean), np.asarray(jnp.exp(0.5 * logvar))

    def encode_text(captions):
        return np.asarray(te.encode(captions))

    checksum = float(sum(np.abs(np.asarray(v, np.float64)).sum() for v in jax.tree.leaves(vae_params)))
    ids = {"vae": f"{model.vae.config}|{checksum:.10e}",
           "text": f"{config.model.text_encoder.name}|{config.model.text_encoder.path}|{te.max_length}"}
    source = components.data_config(config, max_length=te.max_length, latent_cache=None)
    # The workdir's own cache is derived data: one made from other data or encoders is rebuilt, not an error.
    try:
        build_latent_cache(source, encode_images, encode_text, out, int(config.data.batch_size), encoder_ids=ids)
    except DataError:
        build_latent_cache(source, encode_images, encode_text, out, int(config.data.batch_size), encoder_ids=ids,
                           overwrite=True)
    return out


def make_task(config, workdir: str):
    """(Task, callbacks) of the latent-diffusion stage."""
    model, frozen, unet_cfg, pretrained = build(config)
    cache = ensure_latent_cache(config, model, frozen, workdir)
    dcfg = components.data_config(config, max_length=model.text.max_length, latent_cache=cache)
    f = model.vae.config.downsample_factor
    if dcfg.resolution % f:
        raise ConfigError(f"data.resolution={dcfg.resolution} is not a multiple of the VAE's factor {f}")
    latent_shape = (dcfg.resolution // f, dcfg.resolution // f, model.vae.config.latent_channels)
    dc = config.diffusion
    weighting_kwargs = components.weighting_kwargs(dc)

    def init(rng):
        x = jnp.zeros((1, *latent_shape), jnp.float32)
        ctx = jnp.zeros((1, model.text.max_length, model.text.hidden_size), jnp.float32)
        return model.unet.init(rng, x, jnp.zeros((1,)), ctx)["params"]  # pretrained weights: Task.pretrained

    def loss_fn(params, batch, rng, step, *, frozen, extra):
        del step, extra
        r_lat, r_t, r_noise = jax.random.split(rng, 3)
        if "latent_mean" in batch:
            eps = jax.random.normal(r_lat, batch["latent_mean"].shape)
            z = batch["latent_mean"] + batch["latent_std"] * eps
            cfg = model.vae.config
            latents = (z - cfg.shift_factor) * cfg.scaling_factor
        else:
            latents = model.vae.apply({"params": frozen["vae"]}, batch["image"], r_lat, method=model.vae.latents)
        latents = jax.lax.stop_gradient(latents.astype(jnp.float32))
        if "text_embedding" in batch:  # from the latent cache (caption dropout already applied)
            ctx = batch["text_embedding"]
        else:
            ctx = model.text.encode_ids(frozen["text"], batch["input_ids"], batch.get("attention_mask"))
        ctx = jax.lax.stop_gradient(ctx)
        b = latents.shape[0]
        t = diffusion.sample_t(str(dc.noise_sampling), r_t, b, schedule=model.schedule)
        noise = jax.random.normal(r_noise, latents.shape)
        x_t = diffusion.q_sample(model.schedule, latents, t, noise)
        out = model.model_fn(params)(x_t, t, ctx.astype(x_t.dtype))
        per_example = diffusion.loss(out, latents, noise, t, schedule=model.schedule, prediction=model.prediction,
                                     weighting=str(dc.weighting), **weighting_kwargs)
        return jnp.mean(per_example), {"mse_t_mean": jnp.mean(t)}

    keys = ("latent_mean", "latent_std", "text_embedding", "input_ids", "attention_mask") if dcfg.latent_cache else (
        "image", "input_ids", "attention_mask")

    def iterator(process_index, process_count):
        it = make_iterator(dcfg, tokenizer=model.text.tokenize_dict, process_index=process_index,
                           process_count=process_count)
        return NumericBatches(it, keys)

    task = Task(name="ldm", init=init, loss_fn=loss_fn, make_iterator=iterator, batch_size=dcfg.batch_size,
                frozen=frozen, pretrained=None if pretrained is None else jax.tree.map(np.asarray, unbox(pretrained)))
    callbacks = []
    if int(config.sample.every_steps) > 0:
        callbacks.append(SampleGrid(model, frozen, config, workdir, latent_shape))
    callbacks += stage_metrics.ldm_callbacks(config, Generator(model, frozen, latent_shape))  # config.eval
    return task, callbacks


class Generator:
    """Text -> uint8 images from U-Net parameters: one jit per (batch, sampler, steps, guidance).

    Image i of a call uses noise from ``fold_in(PRNGKey(seed), i)``, so any single image reproduces alone.
    """

    def __init__(self, model: LatentDiffusion, frozen, latent_shape):
        self.model, self.frozen, self.latent_shape = model, frozen, tuple(latent_shape)
        self.uids, self.umask = model.text.tokenize([""])
        self._jits = {}

    def _fn(self, sampler: str, num_steps: int, guidance_scale: float):
        key = (sampler, num_steps, guidance_scale)
        if key not in self._jits:
            self._jits[key] = jax.jit(lambda u, v, te, ids, mask, uids, umask, noise, rng: self.model.generate(
                u, v, te, ids, mask, uids, umask, noise, guidance_scale=guidance_scale, sampler=sampler,
                num_steps=num_steps, rng=rng))
        return self._jits[key]

    def __call__(self, unet_params, prompts, *, seed: int = 0, sampler: str = "ddim", num_steps: int = 20,
                 guidance_scale: float = 3.0) -> np.ndarray:
        ids, mask = self.model.text.tokenize(list(prompts))
        base = jax.random.PRNGKey(seed)
        noise = jnp.stack([jax.random.normal(jax.random.fold_in(base, i), self.latent_shape)
                           for i in range(len(ids))])
        fn = self._fn(str(sampler), int(num_steps), float(guidance_scale))
        x = fn(unbox(unet_params), self.frozen["vae"], self.frozen["text"], ids, mask, self.uids, self.umask, noise,
               jax.random.fold_in(base, 1 << 20))
        return to_uint8(x)


class SampleGrid:
    """Callback: every ``sample.every_steps`` a grid of ``sample.prompts`` from the EMA parameters."""

    def __init__(self, model: LatentDiffusion, frozen, config, workdir: str, latent_shape):
        s = config.sample
        self.every, self.prompts = int(s.every_steps), list(s.prompts)
        self.options = dict(seed=int(s.seed), sampler=str(s.sampler), num_steps=int(s.num_steps),
                            guidance_scale=float(s.guidance_scale))
        self.generator = Generator(model, frozen, latent_shape)
        self.dir = os.path.join(workdir, "samples")

    def __call__(self, step, state):
        if step % self.every or jax.process_index() != 0:
            return None
        grid = image_grid(self.generator(state.ema_params, self.prompts, **self.options))
        os.makedirs(self.dir, exist_ok=True)
        save_png(os.path.join(self.dir, f"{step:07d}.png"), grid)
        return {"samples": grid}


def load_generator(workdir: str, config=None) -> tuple[Generator, object]:
    """(Generator, EMA U-Net params) of a trained stage-2 workdir."""
    import ml_collections

    from ldm_jax.training.checkpoint import read_config, restore_params

    config = config or ml_collections.ConfigDict(read_config(workdir))
    model, frozen, _, _ = build(config)
    dcfg = components.data_config(config, max_length=model.text.max_length)
    f = model.vae.config.downsample_factor
    shape = (dcfg.resolution // f, dcfg.resolution // f, model.vae.config.latent_channels)
    return Generator(model, frozen, shape), components.as_arrays(restore_params(workdir, ema=True))


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8."""
    return np.asarray(np.clip((np.asarray(images, np.float32) + 1) * 127.5 + 0.5, 0, 255), np.uint8)


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) image on white."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = img if c == 3 else np.repeat(img, 3, axis=-1)
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    tmp = path + ".tmp.png"
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)
