"""The shared machinery of TextToImage, Img2Img and Inpaint: one jitted function from tokens to uint8 images.

Per batch, inside a single `jax.jit` (compiled once per options and batch shapes, cached on the pipeline):

    context = text_encoder(ids); uncond = text_encoder(negative ids)          (CFG: Ho & Salimans 2022)
    noise_i = N(0, I) from jax.random.key(seed + i) (drawn on the host)       one seed per image
    [img2img / inpaint: known = VAE latents of the input image (posterior mean) x scaling_factor]
    x0 = diffusion.sample(cfg(unet), noise, ...)                              the whole loop: one lax.scan
    images = round(255 clip((VAE.decode(x0 / scaling_factor) + 1) / 2, 0, 1))

Image i of a call uses seed + i (images are ordered prompt by prompt, `num_images_per_prompt` each), so any
single image is reproduced alone with its prompt and seed. Stochastic samplers (ddpm, euler_ancestral,
dpmpp_2m_sde, ddim with eta > 0, churn > 0) draw their per-step noise from ``fold_in(key(seed + i), 1)`` per
image: the loop is vmapped over images so that batch composition does not change any image.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import diffusion
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.pipelines import images as imlib
from ldm_jax.pipelines.compile_cache import enable_compilation_cache
from ldm_jax.pipelines.components import Components, UNetDenoiser
from ldm_jax.types import ConfigError, PyTree, nearest

logger = logging.getLogger("ldm_jax.pipelines")

_STOCHASTIC = ("ddpm", "euler_ancestral", "dpmpp_2m_sde")
_SAMPLER_OPTIONS = ("churn", "s_tmin", "s_tmax", "s_noise", "variance", "rho", "sigma_min", "sigma_max", "t_max")


@dataclasses.dataclass(frozen=True)
class Options:
    """Static settings of one compiled generation function (hashable; part of the compile-cache key)."""

    task: str  # "text", "img2img", "inpaint"
    sampler: str
    num_steps: int
    spacing: str
    final: str
    steps_offset: int
    prediction: str
    strength: float
    guided: bool
    guidance_rescale: float
    guidance_interval: tuple | None
    eta: float | None
    extra: tuple  # sorted (name, value) pairs passed on to diffusion.sample

    @property
    def stochastic(self) -> bool:
        extra = dict(self.extra)
        eta = self.eta if self.eta is not None else (1.0 if self.sampler == "euler_ancestral" else 0.0)
        return self.sampler in _STOCHASTIC or eta > 0 or extra.get("churn", 0.0) > 0


def _conditional(denoiser, context, x, t):
    return denoiser(x, t, context)


def _sample(opts: Options, params: PyTree, denoiser, noise, rng, ctx, uctx, scale, init, mask, known):
    if opts.guided:
        fn = diffusion.cfg(denoiser, ctx, uctx, scale, rescale=opts.guidance_rescale, interval=opts.guidance_interval)
    else:
        fn = jax.tree_util.Partial(_conditional, denoiser, ctx)
    return diffusion.sample(
        fn, noise, schedule=params["schedule"], prediction=opts.prediction, sampler=opts.sampler,
        num_steps=opts.num_steps, rng=rng, spacing=opts.spacing, final=opts.final, eta=opts.eta,
        steps_offset=opts.steps_offset, init=init, strength=opts.strength if init is not None else 1.0,
        mask=mask, known=known, **dict(opts.extra),
    )


def _sample_batch(opts, params, denoiser, noise, keys, ctx, uctx, scale, init, mask, known):
    """Deterministic samplers: one batched loop. Stochastic ones: vmapped per image with its own key."""
    if not opts.stochastic:
        return _sample(opts, params, denoiser, noise, None, ctx, uctx, scale, init, mask, known)

    def one(noise, key, ctx, uctx, init, mask, known):
        add = lambda tree: jax.tree.map(lambda a: a[None], tree)
        rng = jax.random.fold_in(key, 1)
        out = _sample(opts, params, denoiser, add(noise), rng, add(ctx), add(uctx), scale, add(init), add(mask),
                      add(known))
        return out[0]

    return jax.vmap(one)(noise, keys, ctx, uctx, init, mask, known)


def _image_conditioning(comps: Components, opts: Options, vae, vae_params, batch: dict):
    """(init, mask, known, extra) from the input image and mask of img2img / inpainting (None when unused).

    init: latents img2img starts from; mask, known: latent blending; extra: the [mask, masked-image latents]
    channels of an inpainting U-Net. Images that are needed together go through the encoder as one batch.
    """
    if "image" not in batch:
        return None, None, None, None
    image = batch["image"]
    encode = lambda x: vae.apply({"params": vae_params}, x, method=AutoencoderKL.latents)
    start_from_image = opts.task == "img2img" or opts.strength < 1.0
    if "mask" not in batch:
        known = encode(image)
        return known, None, None, None
    m = batch["mask"]
    m_lat = m[:, ::comps.downsample_factor, ::comps.downsample_factor, :]  # nearest, as torch's interpolate
    if not comps.is_inpainting_unet:
        known = encode(image)
        return (known if start_from_image else None), m_lat, known, None
    masked_image = image * (1.0 - m)
    if start_from_image:
        known, masked = jnp.split(encode(jnp.concatenate([image, masked_image])), 2)
    else:
        known, masked = None, encode(masked_image)
    return known, None, None, jnp.concatenate([m_lat, masked], axis=-1)


def generate(comps: Components, opts: Options, params: PyTree, batch: dict) -> jax.Array:
    """The traced body: tokens (+ images, masks) -> uint8 images (B, H, W, 3). See the module docstring."""
    unet, vae = comps.modules()
    te = comps.text_encoder
    if opts.guided:  # prompts and negative prompts in one pass of the text encoder
        both = te.encode_ids(params["text"], jnp.concatenate([batch["ids"], batch["uncond_ids"]]),
                             jnp.concatenate([batch["attn"], batch["uncond_attn"]]))
        ctx, uctx = jnp.split(both, 2)
    else:
        ctx, uctx = te.encode_ids(params["text"], batch["ids"], batch["attn"]), None
    init, mask, known, extra = _image_conditioning(comps, opts, vae, params["vae"], batch)
    if extra is not None:
        ctx = {"text": ctx, "concat": extra}
        uctx = None if uctx is None else {"text": uctx, "concat": extra}
    denoiser = UNetDenoiser(params["unet"], params["schedule"], unet)
    keys = jax.vmap(jax.random.key)(batch["seeds"])
    x0 = _sample_batch(opts, params, denoiser, batch["noise"], keys, ctx, uctx, batch["scale"], init, mask, known)
    if mask is not None:  # the kept region is exactly the input's latents at the end (as diffusers' last step)
        x0 = mask * x0 + (1.0 - mask) * known
    decoded = vae.apply({"params": params["vae"]}, x0, method=AutoencoderKL.decode_latents)
    return imlib.to_uint8(decoded.astype(jnp.float32))


def seeded_noise(seeds, latent_shape: tuple) -> np.ndarray:
    """The initial latents of images with these seeds: image i gets N(0, I) drawn from jax.random.key(seeds[i])."""
    return np.stack([np.asarray(jax.random.normal(jax.random.key(int(s)), latent_shape, jnp.float32)) for s in seeds])


def _check_choice(kind: str, name: str, choices) -> None:
    if name not in choices:
        raise ConfigError(f"unknown {kind} '{name}'{nearest(str(name), choices)}; choose one of: {', '.join(choices)}")


def _as_prompt_list(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ConfigError("empty prompt list: pass at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ConfigError(f"prompts must be strings, got {type(bad[0]).__name__}")
    return prompts


def _per_prompt(value, num_prompts: int, what: str) -> list[str]:
    if value is None:
        return [""] * num_prompts
    if isinstance(value, str):
        return [value] * num_prompts
    value = list(value)
    if len(value) != num_prompts:
        raise ConfigError(f"{what}: got {len(value)} for {num_prompts} prompts; pass one, or one per prompt")
    return value


def _per_image(arr: np.ndarray | None, num_prompts: int, per_prompt: int, what: str) -> np.ndarray | None:
    """A batch of 1, one per prompt, or one per output image -> one per output image."""
    if arr is None:
        return None
    total = num_prompts * per_prompt
    if arr.shape[0] == 1:
        return np.repeat(arr, total, axis=0)
    if arr.shape[0] == num_prompts:
        return np.repeat(arr, per_prompt, axis=0)
    if arr.shape[0] == total:
        return arr
    raise ConfigError(f"{what}: got {arr.shape[0]}; pass 1, one per prompt ({num_prompts}) or one per image ({total})")


class Pipeline:
    """Base class: components, a compile cache, batching, seeds and a progress bar.

    `compilation_cache`: True enables JAX's persistent compilation cache in the default user cache directory
    (see `compile_cache`), a path uses that directory, False leaves JAX's setting alone.
    """

    task = "text"

    def __init__(self, components: Components, *, compilation_cache: bool | str = True):
        self.components = components
        self._params = components.params()
        self._compiled: dict = {}
        self.compile_seconds: dict = {}
        if compilation_cache:
            enable_compilation_cache(None if compilation_cache is True else compilation_cache)

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, prediction: str | None = None, ema: bool = True,
                        kind: str = "auto", compilation_cache: bool | str = True):
        """From a diffusers SD folder, a CompVis single file or an ldm_jax workdir (`loading.load_components`)."""
        from ldm_jax.pipelines.loading import load_components

        comps = load_components(path, dtype=dtype, prediction=prediction, ema=ema, kind=kind)
        return cls(comps, compilation_cache=compilation_cache)

    @property
    def num_compiled(self) -> int:
        """How many generation functions this pipeline has compiled (one per options and batch shapes)."""
        return len(self._compiled)

    @property
    def default_size(self) -> int:
        c = self.components
        return c.default_size or c.unet_config.sample_size * c.downsample_factor

    # ------------------------------------------------------------------------------------------ checks
    def _check_size(self, height: int, width: int) -> None:
        mult = max(8, self.components.downsample_factor)
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % mult:
                raise ConfigError(f"{name}={v} must be a positive multiple of {mult}; resize the input image or "
                                  f"pass another {name}")

    def _options(self, *, sampler, num_steps, spacing, eta, strength, guidance_scale, guidance_rescale,
                 final, sampler_options, guidance_interval=None) -> Options:
        _check_choice("sampler", sampler, diffusion.SAMPLERS)
        d = self.components.defaults
        spacing = spacing or d.spacing
        _check_choice("spacing", spacing, diffusion.SPACINGS)
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if not 0.0 <= strength <= 1.0:
            raise ConfigError(f"strength must be in [0, 1], got {strength}")
        if self.task != "text" and int(num_steps * strength) < 1:
            raise ConfigError(f"strength={strength} with num_steps={num_steps} runs no denoising step; raise "
                              "strength or num_steps")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ConfigError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if guidance_interval is not None and not (len(guidance_interval) == 2
                                                  and 0.0 <= guidance_interval[0] <= guidance_interval[1] <= 1.0):
            raise ConfigError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {guidance_interval}")
        unknown = [k for k in sampler_options if k not in _SAMPLER_OPTIONS]
        if unknown:
            raise ConfigError(f"unknown sampler option '{unknown[0]}'{nearest(unknown[0], _SAMPLER_OPTIONS)}")
        return Options(
            task=self.task, sampler=sampler, num_steps=int(num_steps), spacing=spacing,
            final=final or d.final_for(sampler), steps_offset=d.steps_offset, prediction=self.components.prediction,
            strength=float(strength), guided=float(guidance_scale) > 1.0, guidance_rescale=float(guidance_rescale),
            guidance_interval=None if guidance_interval is None else tuple(float(v) for v in guidance_interval),
            eta=None if eta is None else float(eta), extra=tuple(sorted(sampler_options.items())),
        )

    # ------------------------------------------------------------------------------------------ running
    def _compiled_fn(self, opts: Options, batch: dict):
        signature = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
        key = (opts, signature)
        fn = self._compiled.get(key)
        if fn is None:
            start = time.perf_counter()
            body = functools.partial(generate, self.components, opts)
            fn = jax.jit(body).lower(self._params, batch).compile()
            self.compile_seconds[key] = time.perf_counter() - start
            logger.info("compiled %s/%s/%d steps for batch %s in %.1f s", opts.task, opts.sampler, opts.num_steps,
                        batch["ids"].shape[0], self.compile_seconds[key])
            self._compiled[key] = fn
        return fn

    def _generate(self, prompts, negative_prompt, *, num_images_per_prompt: int, height: int, width: int,
                  seed: int, noise, batch_size, progress: bool, opts: Options, guidance_scale: float,
                  image: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
        prompts = _as_prompt_list(prompts)
        negatives = _per_prompt(negative_prompt, len(prompts), "negative_prompt")
        n = int(num_images_per_prompt)
        if n < 1:
            raise ConfigError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        self._check_size(height, width)
        if mask is None and self.components.is_inpainting_unet:
            raise ConfigError(f"this U-Net takes {self.components.unet_config.in_channels} input channels (an "
                              "inpainting U-Net): use the Inpaint pipeline with an image and a mask")
        if not isinstance(seed, (int, np.integer)) or seed < 0 or seed + len(prompts) * n > 2**32:
            raise ConfigError(f"seed must be an integer in [0, 2^32 - number of images), got {seed!r}")
        total = len(prompts) * n
        f, c = self.components.downsample_factor, self.components.latent_channels
        latent_shape = (height // f, width // f, c)
        inputs = self._host_inputs(prompts, negatives, n, seed, opts.guided)
        if noise is None:
            noise = seeded_noise(inputs["seeds"], latent_shape)
        noise = np.asarray(noise, np.float32)
        if noise.shape != (total, *latent_shape):
            raise ConfigError(f"noise has shape {noise.shape}, expected {(total, *latent_shape)} (NHWC latents)")
        inputs["noise"] = noise
        if image is not None:
            inputs["image"] = imlib.to_model_range(_per_image(image, len(prompts), n, "number of images"))
        if mask is not None:
            inputs["mask"] = _per_image(mask, len(prompts), n, "number of masks")
        return self._run_batches(inputs, total, batch_size, progress, opts, guidance_scale)

    def _host_inputs(self, prompts, negatives, n, seed, guided) -> dict:
        te = self.components.text_encoder
        ids, attn = te.tokenize(prompts)
        inputs = {"ids": np.repeat(ids, n, 0), "attn": np.repeat(attn, n, 0),
                  "seeds": (seed + np.arange(len(prompts) * n)).astype(np.uint32)}
        if guided:
            uids, uattn = te.tokenize(negatives)
            inputs.update(uncond_ids=np.repeat(uids, n, 0), uncond_attn=np.repeat(uattn, n, 0))
        return inputs

    def _run_batches(self, inputs, total, batch_size, progress, opts, guidance_scale) -> np.ndarray:
        from tqdm.auto import tqdm

        bs = min(int(batch_size or total), total)
        if bs < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        outputs = []
        starts = range(0, total, bs)
        bar = tqdm(starts, desc=f"{opts.task} {opts.sampler} x{opts.num_steps}", unit="batch",
                   disable=not progress or len(starts) < 2)
        for start in bar:
            idx = np.minimum(np.arange(start, start + bs), total - 1)  # pad the last batch by repetition
            batch = jax.device_put({k: v[idx] for k, v in inputs.items()})  # device_put: no jnp.asarray compiles
            batch["scale"] = jax.device_put(np.float32(guidance_scale))
            fn = self._compiled_fn(opts, batch)
            outputs.append(np.asarray(fn(self._params, batch))[: min(bs, total - start)])
        return np.concatenate(outputs, axis=0)
