"""The one generation path: prompts (+ images, masks) -> uint8 images, used through `LatentDiffusion.generate`.

Per micro-batch of m images, inside one `jax.jit` (compiled once per options, micro-batch, devices and batch
shapes, cached on the model):

    context = text_encoder(ids); uncond = text_encoder(negative ids)          (CFG: Ho & Salimans 2022)
    [img2img / inpaint: known = VAE latents of the input image (posterior mean) x scaling_factor]
    x0 = diffusion.sample(cfg(unet), noise, ...)                              the whole loop: one lax.scan
    images = round(255 clip((VAE.decode(x0 / scaling_factor) + 1) / 2, 0, 1))

The seeding rule, the same in every command: image i of a call with seed s (images ordered prompt by prompt,
`num_images_per_prompt` each) starts from noise_i = N(0, I) drawn with ``jax.random.key(s + i)``, and
stochastic samplers (ddpm, euler_ancestral, dpmpp_2m_sde, ddim with eta > 0, churn > 0) draw its step noise
from ``fold_in(key(s + i), 1)`` (step j: ``fold_in(that, j)``), per image. So image i of seed s is image 0 of
seed s + i, alone.

Bitwise reproducibility: floating-point sums inside the networks depend on how many images they process at
once, so the batch is cut into micro-batches of `micro_batch` images (default 1) and every micro-batch runs
through the same compiled body (`lax.map` on each device, `shard_map` over the devices; the last batch is
padded by repetition). An image therefore comes out bit-identical whatever the call's batch size, its
neighbours, its position or the number of devices; only `micro_batch` (a throughput knob) changes the
rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from ldm_jax import diffusion
from ldm_jax import images as imlib
from ldm_jax.diffusion.schedules import CONTINUOUS_TIMESTEP_SCALE
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.types import Array, ConfigError, FrozenConfig, PyTree, check_choice, nearest

logger = logging.getLogger("ldm_jax.ldm")

# Grid keywords of `diffusion.sample` a caller may pass as sampler options (spacing, final and steps_offset
# have their own arguments and model defaults).
_GRID_KEYWORDS = tuple(k for k in diffusion.GRID_OPTIONS if k not in ("spacing", "final", "steps_offset"))


@dataclasses.dataclass(frozen=True)
class SampleConfig(FrozenConfig):
    """Typed ``sample`` config section: what training grids, evaluation and the CLI generate with by default.

    every_steps: training grid period (0: none); prompts: the grid's prompts; negative_prompt: for every prompt;
    sampler, num_steps, guidance_scale, seed: as `LatentDiffusion.generate`; micro_batch: images the network
    sees at once (results depend on it, never on batch sizes or devices).
    """

    every_steps: int = 0
    prompts: tuple = ("a red circle in the top left",)
    negative_prompt: str = ""
    sampler: str = "ddim"
    num_steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 0
    micro_batch: int = 1

    def __post_init__(self):
        diffusion.sampler_spec(self.sampler)
        checks = [
            (self.every_steps >= 0, f"sample.every_steps must be >= 0, got {self.every_steps}"),
            (self.num_steps >= 1, f"sample.num_steps must be >= 1, got {self.num_steps}"),
            (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0,
             f"sample.guidance_scale must be a finite number >= 0, got {self.guidance_scale}"),
            (self.seed >= 0, f"sample.seed must be >= 0, got {self.seed}"),
            (self.micro_batch >= 1, f"sample.micro_batch must be >= 1, got {self.micro_batch}"),
            (all(isinstance(p, str) for p in self.prompts), "sample.prompts must be strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def generate_kwargs(self) -> dict:
        """The keyword arguments of `LatentDiffusion.generate` this section sets."""
        return dict(negative_prompt=self.negative_prompt or None, sampler=self.sampler, num_steps=self.num_steps,
                    guidance_scale=self.guidance_scale, seed=self.seed, micro_batch=self.micro_batch)


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
    output: str = "images"  # or "latents": the final (or handed-off) latents, VP scale, not decoded
    start_step: int | None = None  # denoising_start: continue from given latents at this grid point
    stop_step: int | None = None  # denoising_end: stop at this grid point
    zero_uncond: bool = False  # SDXL's force_zeros_for_empty_prompt: zero negative text when none is given

    @property
    def stochastic(self) -> bool:
        extra = dict(self.extra)
        return diffusion.sampler_spec(self.sampler).is_stochastic(self.eta, extra.get("churn", 0.0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Denoiser:
    """``(x_t, t, context) -> network output`` for `diffusion.cfg` / `diffusion.sample` and the training loss.

    The network is any backbone (U-Net, DiT, MMDiT) called as ``module.apply(params, x, timesteps, context)``.
    t is the framework's (B,) time in [0, 1] and x_t is variance preserving. What the network sees:
      network_input="vp":   x_t and ``schedule.timestep(t)`` (SD's U-Nets: 1000 t - 1 on the 1000-step tables);
      network_input="flow": the rectified-flow sample x_flow = x_t / (alpha + sigma) = (1 - tau) x0 + tau eps and
                            timestep 1000 tau, tau = sigma / (alpha + sigma) the flow time of the noise level
                            (SD3's convention, whatever shift the schedule has);
      precondition="edm":   EDM's scaled input and c_noise (``diffusion.edm_precondition``; the output is x0).
    `context` is the text encoder's hidden states, or a dict ``{"text": hidden}`` with optional entries
    "concat" (channels appended to the network's input: an inpainting U-Net's mask and masked-image latents)
    and "added" (the U-Net's ``added`` argument: SDXL's pooled text and micro-conditioning). The output is
    float32.
    """

    params: PyTree
    schedule: PyTree
    module: nn.Module = dataclasses.field(metadata=dict(static=True))
    precondition: str = dataclasses.field(default="none", metadata=dict(static=True))
    sigma_data: float = dataclasses.field(default=0.5, metadata=dict(static=True))
    network_input: str = dataclasses.field(default="vp", metadata=dict(static=True))

    def _network(self, x: Array, timesteps: Array, context: PyTree) -> Array:
        kwargs = {}
        if isinstance(context, dict):
            if "concat" in context:
                x = jnp.concatenate([x, context["concat"].astype(x.dtype)], axis=-1)
            if "added" in context:
                kwargs["added"] = context["added"]
            context = context["text"]
        return self.module.apply({"params": self.params}, x, timesteps, context, **kwargs).astype(jnp.float32)

    def __call__(self, x: Array, t: Array, context: PyTree) -> Array:
        if self.precondition == "edm":
            network = lambda x_in, c_noise: self._network(x_in.astype(x.dtype), c_noise, context)  # noqa: E731
            return diffusion.edm_precondition(network, self.schedule, self.sigma_data)(x, t).astype(jnp.float32)
        if self.network_input == "flow":
            alpha, sigma = self.schedule.alpha_sigma(t)
            total = alpha + sigma
            x_flow = x / total.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
            return self._network(x_flow, CONTINUOUS_TIMESTEP_SCALE * sigma / total, context)
        return self._network(x, self.schedule.timestep(t), context)


UNetDenoiser = Denoiser  # the name before other backbones existed


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
        mask=mask, known=known, start_step=opts.start_step, stop_step=opts.stop_step, **dict(opts.extra),
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


def _image_conditioning(model, opts: Options, vae, vae_params, batch: dict):
    """(init, mask, known, extra) from the input image and mask of img2img / inpainting (None when unused).

    init: latents img2img starts from; mask, known: latent blending; extra: the [mask, masked-image latents]
    channels of an inpainting U-Net. Images that are needed together go through the encoder as one batch.
    """
    if "latents" in batch:  # img2img from latents (a handoff's, or the caller's): no encoder pass
        return batch["latents"], None, None, None
    if "image" not in batch:
        return None, None, None, None
    image = batch["image"]
    encode = lambda x: vae.apply({"params": vae_params}, x, method=AutoencoderKL.latents)
    start_from_image = opts.task == "img2img" or opts.strength < 1.0
    if "mask" not in batch:
        known = encode(image)
        return known, None, None, None
    m = batch["mask"]
    m_lat = m[:, ::model.downsample_factor, ::model.downsample_factor, :]  # nearest, as torch's interpolate
    if not model.is_inpainting_unet:
        known = encode(image)
        return (known if start_from_image else None), m_lat, known, None
    masked_image = image * (1.0 - m)
    if start_from_image:
        known, masked = jnp.split(encode(jnp.concatenate([image, masked_image])), 2)
    else:
        known, masked = None, encode(masked_image)
    return known, None, None, jnp.concatenate([m_lat, masked], axis=-1)


def _text_conditioning(model, opts: Options, params: PyTree, batch: dict) -> tuple[dict, dict | None]:
    """The denoiser's contexts ``{"text": hidden[, "added": ...]}`` for the prompts and (guided) the negatives.

    Prompts and negative prompts go through the text encoder in one pass. A U-Net with SDXL's added
    conditioning also gets the pooled text and the micro-conditioning numbers (``batch["time_ids"]``,
    ``batch["uncond_time_ids"]``); with `Options.zero_uncond` the negative text and pooled vector are zeros
    (diffusers' force_zeros_for_empty_prompt).
    """
    te = model.text_encoder
    ids, attn = batch["ids"], batch["attn"]
    if opts.guided:
        ids, attn = jnp.concatenate([ids, batch["uncond_ids"]]), jnp.concatenate([attn, batch["uncond_attn"]])
    if model.num_time_ids:
        hidden, pooled = te.encode_pooled_ids(params, ids, attn)
    else:
        hidden, pooled = te.encode_ids(params, ids, attn), None
    sides = (lambda a: jnp.split(a, 2)) if opts.guided else (lambda a: [a])
    conds = [{"text": h} for h in sides(hidden)]
    if pooled is not None:
        for cond, p, key in zip(conds, sides(pooled), ("time_ids", "uncond_time_ids"), strict=False):
            cond["added"] = {"text_embeds": p, "time_ids": batch[key]}
    if opts.guided and opts.zero_uncond:
        conds[1] = jax.tree.map(jnp.zeros_like, conds[1])
        if pooled is not None:  # the negative micro-conditioning stays
            conds[1]["added"]["time_ids"] = batch["uncond_time_ids"]
    return conds[0], (conds[1] if opts.guided else None)


def micro_batch_images(model, opts: Options, params: PyTree, batch: dict, scale) -> jax.Array:
    """The traced body for one micro-batch: tokens, seeds and noise (+ images, masks) -> uint8 images
    (m, H, W, 3)."""
    unet, vae = model.unet, model.vae
    ctx, uctx = _text_conditioning(model, opts, params["text"], batch)
    init, mask, known, extra = _image_conditioning(model, opts, vae, params["vae"], batch)
    if extra is not None:
        ctx = {**ctx, "concat": extra}
        uctx = None if uctx is None else {**uctx, "concat": extra}
    denoiser = Denoiser(params["unet"], params["schedule"], unet, model.precondition, model.sigma_data,
                        model.network_input)
    keys = jax.vmap(jax.random.key)(batch["seeds"])
    x0 = _sample_batch(opts, params, denoiser, batch["noise"], keys, ctx, uctx, scale, init, mask, known)
    if mask is not None:  # the kept region is exactly the input's latents at the end (as diffusers' last step)
        x0 = mask * x0 + (1.0 - mask) * known
    if opts.output == "latents":
        return x0.astype(jnp.float32)
    decoded = vae.apply({"params": params["vae"]}, x0, method=AutoencoderKL.decode_latents)
    return imlib.to_uint8(decoded.astype(jnp.float32))


def _per_device(model, opts: Options, micro: int, params: PyTree, batch: dict, scale) -> jax.Array:
    """This device's images, micro-batch after micro-batch through the same body."""
    n = batch["ids"].shape[0]
    chunks = jax.tree.map(lambda a: a.reshape(n // micro, micro, *a.shape[1:]), batch)
    out = jax.lax.map(lambda b: micro_batch_images(model, opts, params, b, scale), chunks)
    return out.reshape(n, *out.shape[2:])


@functools.partial(jax.jit, static_argnames="latent_shape")
def _draw_noise(seeds: jax.Array, latent_shape: tuple) -> jax.Array:
    return jax.vmap(lambda s: jax.random.normal(jax.random.key(s), latent_shape, jnp.float32))(seeds)


def seeded_noise(seeds, latent_shape: tuple) -> np.ndarray:
    """The initial latents of images with these seeds: image i gets N(0, I) drawn from ``jax.random.key(seeds[i])``
    (one vectorized call; per image, whatever the batch). They become an input of the generation function, so a
    call with explicit ``noise=`` runs the same compiled function."""
    return np.asarray(_draw_noise(np.asarray(seeds, np.uint32), tuple(latent_shape)))


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


def make_options(model, *, task: str, sampler: str, num_steps: int, spacing, eta, strength: float,
                 guidance_scale: float, guidance_rescale: float, final, sampler_options: dict,
                 guidance_interval=None, output: str = "images", denoising_start: float | None = None,
                 denoising_end: float | None = None, zero_uncond: bool = False) -> Options:
    """Checks the sampling settings (one-line ConfigError) and fills the model's defaults."""
    spec = diffusion.sampler_spec(sampler)
    d = model.defaults
    spacing = spacing or d.spacing
    check_choice("spacing", spacing, diffusion.SPACINGS)
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not math.isfinite(float(guidance_scale)) or guidance_scale < 0:
        raise ConfigError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength must be in [0, 1], got {strength}")
    if task != "text" and int(num_steps * strength) < 1:
        raise ConfigError(f"strength={strength} with num_steps={num_steps} runs no denoising step; raise "
                          "strength or num_steps")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ConfigError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if guidance_interval is not None and not (len(guidance_interval) == 2
                                              and 0.0 <= guidance_interval[0] <= guidance_interval[1] <= 1.0):
        raise ConfigError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {guidance_interval}")
    allowed = diffusion.SAMPLER_OPTIONS + _GRID_KEYWORDS
    unknown = [k for k in sampler_options if k not in allowed or k == "eta"]
    if unknown:
        raise ConfigError(f"unknown sampler option '{unknown[0]}'{nearest(unknown[0], allowed)}")
    diffusion.samplers.check_sampler_options(sampler, eta=eta, **{k: v for k, v in sampler_options.items()
                                                                  if k in diffusion.SAMPLER_OPTIONS})
    check_choice("output", output, ("images", "latents"))
    opts = Options(
        task=task, sampler=sampler, num_steps=int(num_steps), spacing=spacing,
        final=final or d.final_for(spec.name), steps_offset=d.steps_offset, prediction=model.prediction,
        strength=float(strength), guided=float(guidance_scale) > 1.0, guidance_rescale=float(guidance_rescale),
        guidance_interval=None if guidance_interval is None else tuple(float(v) for v in guidance_interval),
        eta=None if eta is None else float(eta), extra=tuple(sorted(sampler_options.items())), output=output,
        zero_uncond=bool(zero_uncond),
    )
    return _with_handoff(model, opts, denoising_start, denoising_end)


def handoff_step(model, opts: Options, fraction: float) -> int:
    """The grid point where a handoff at `fraction` of the denoising happens (diffusers' denoising_end /
    denoising_start): the number of steps whose timestep is >= round(T (1 - fraction)), T the schedule's
    training timesteps (1000 for continuous schedules, whose timestep is 1000 t). The base model runs those
    steps, the refiner the rest, whatever the sampler."""
    grid_options = {k: v for k, v in opts.extra if k in _GRID_KEYWORDS}
    grid = diffusion.sampling_grid(model.schedule, sampler=opts.sampler, num_steps=opts.num_steps,
                                   prediction=opts.prediction, spacing=opts.spacing, final=opts.final,
                                   steps_offset=opts.steps_offset, **grid_options)
    timesteps = np.asarray(model.schedule.timestep(np.asarray(grid.t[:opts.num_steps])), np.float64)
    total = model.schedule.num_train_timesteps or CONTINUOUS_TIMESTEP_SCALE
    cutoff = round(total - fraction * total)
    return int(np.sum(timesteps >= cutoff - 1e-3))


def _with_handoff(model, opts: Options, start: float | None, end: float | None) -> Options:
    for name, value in (("denoising_start", start), ("denoising_end", end)):
        if value is not None and not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
            raise ConfigError(f"{name} must be a fraction in (0, 1), got {value!r}")
    if start is not None and end is not None and start >= end:
        raise ConfigError(f"denoising_start={start} must be below denoising_end={end}")
    start_step = None if start is None else handoff_step(model, opts, start)
    stop_step = None if end is None else handoff_step(model, opts, end)
    if stop_step is not None and stop_step < 1:
        raise ConfigError(f"denoising_end={end} with num_steps={opts.num_steps} stops before the first step; raise "
                          "denoising_end or num_steps")
    if start_step is not None and start_step >= (stop_step or opts.num_steps):
        raise ConfigError(f"denoising_start={start} with num_steps={opts.num_steps} leaves no step to run; lower "
                          "denoising_start or raise num_steps")
    return dataclasses.replace(opts, start_step=start_step, stop_step=stop_step)


def _compiled(model, opts: Options, micro: int, mesh: Mesh, params, batch: dict, scale):
    """The compiled function of these options, micro-batch, devices and batch shapes (cached on the model)."""
    signature = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
    key = (opts, micro, tuple(d.id for d in mesh.devices.flat), signature)
    fn = model._compiled.get(key)
    if fn is None:
        start = time.perf_counter()
        body = functools.partial(_per_device, model, opts, micro)
        mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("gen"), P()), out_specs=P("gen"))
        fn = jax.jit(mapped).lower(params, batch, scale).compile()
        logger.info("compiled %s/%s/%d steps for batch %s (micro-batch %d, %d devices) in %.1f s", opts.task,
                    opts.sampler, opts.num_steps, batch["ids"].shape[0], micro, mesh.size,
                    time.perf_counter() - start)
        model._compiled[key] = fn
    return fn


def _placed(model, params: PyTree, mesh: Mesh) -> PyTree:
    """`params` replicated on the generation mesh.

    Parameters sharded over several processes (a training run's FSDP state) are gathered to every host first,
    a collective: every process must call `generate` then. The placement of the model's own parameters is
    kept (per device set) and reused while those are the very arrays passed in.
    """
    key = tuple(d.id for d in mesh.devices.flat)
    leaves = jax.tree.leaves(params)
    source, placed = model._placements.get(key, ((), None))
    if len(source) == len(leaves) and all(a is b for a, b in zip(source, leaves)):
        return placed
    def to_host(a):  # only arrays sharded across processes are gathered (a collective); the rest are whole here
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return multihost_utils.process_allgather(a, tiled=True)
        return a

    params = jax.tree.map(to_host, params)
    placed = jax.device_put(params, NamedSharding(mesh, P()))
    if params["unet"] is model.unet_params:
        model._placements[key] = (tuple(leaves), placed)
    return placed


def host_inputs(model, prompts, negatives, n: int, seed: int, guided: bool, time_ids=None) -> dict:
    """Tokens and seeds per image (+ the micro-conditioning rows (positive, negative) of `time_ids`)."""
    te = model.text_encoder
    ids, attn = te.tokenize(prompts)
    total = len(prompts) * n
    inputs = {"ids": np.repeat(ids, n, 0), "attn": np.repeat(attn, n, 0),
              "seeds": (seed + np.arange(total)).astype(np.uint32)}
    if guided:
        uids, uattn = te.tokenize(negatives)
        inputs.update(uncond_ids=np.repeat(uids, n, 0), uncond_attn=np.repeat(uattn, n, 0))
    if time_ids is not None:
        inputs["time_ids"] = np.repeat(time_ids[0][None], total, 0)
        if guided:
            inputs["uncond_time_ids"] = np.repeat(time_ids[1][None], total, 0)
    return inputs


MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score",
                      "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
                      "negative_aesthetic_score")


def time_ids(model, height: int, width: int, micro: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """SDXL's micro-conditioning rows (positive, negative), float32, or None for a model without them.

    Base (6 numbers): original (h, w), crop top-left (top, left), target (h, w); the refiner (5): original size,
    crop, aesthetic score. Defaults as diffusers: original and target size = the output size, crop (0, 0),
    aesthetic score 6 (negative 2.5); each negative_* defaults to its positive value.
    """
    given = {k: v for k, v in micro.items() if v is not None}
    unknown = [k for k in given if k not in MICRO_CONDITIONING]
    if unknown:
        raise ConfigError(f"unknown micro-conditioning '{unknown[0]}'{nearest(unknown[0], MICRO_CONDITIONING)}")
    num = model.num_time_ids
    if not num:
        if given:
            raise ConfigError(f"{next(iter(given))}: this model takes no micro-conditioning (an SDXL U-Net does)")
        return None
    pairs = {"original_size": (height, width), "crops_coords_top_left": (0, 0), "target_size": (height, width)}
    for key, default in list(pairs.items()):
        pairs[key] = _number_pair(key, given.get(key, default))
        pairs["negative_" + key] = _number_pair("negative_" + key, given.get("negative_" + key, pairs[key]))
    if num == 5 and ("target_size" in given or "negative_target_size" in given):
        raise ConfigError("target_size: a refiner-style U-Net (5 time ids) takes an aesthetic score instead")
    if num == 6 and ("aesthetic_score" in given or "negative_aesthetic_score" in given):
        raise ConfigError("aesthetic_score: only a refiner-style U-Net (5 time ids) takes one")
    score = float(given.get("aesthetic_score", 6.0))
    neg_score = float(given.get("negative_aesthetic_score", 2.5))
    if num == 6:
        rows = [pairs[p + "original_size"] + pairs[p + "crops_coords_top_left"] + pairs[p + "target_size"]
                for p in ("", "negative_")]
    else:
        rows = [pairs[p + "original_size"] + pairs[p + "crops_coords_top_left"] + (s,)
                for p, s in (("", score), ("negative_", neg_score))]
    return np.asarray(rows[0], np.float32), np.asarray(rows[1], np.float32)


def _number_pair(name: str, value) -> tuple[float, float]:
    try:
        pair = tuple(float(v) for v in value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
        raise ConfigError(f"{name} must be a pair of numbers (height, width) / (top, left), got {value!r}")
    return pair


def _check_size(model, height: int, width: int) -> None:
    mult = max(8, model.downsample_factor)
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or v <= 0 or v % mult:
            raise ConfigError(f"{name}={v} must be a positive multiple of {mult}; resize the input image or pass "
                              f"another {name}")


def run(model, prompts, negative_prompt=None, *, task: str = "text", image=None, mask=None, latents=None,
        num_images_per_prompt: int = 1, height=None, width=None, seed: int = 0, noise=None, batch_size=None,
        micro_batch: int = 1, devices=None, params: PyTree, progress: bool = False, micro: dict | None = None,
        **settings) -> np.ndarray:
    """``LatentDiffusion.generate`` (see there): checks everything, then runs the batches."""
    prompts = _as_prompt_list(prompts)
    negatives = _per_prompt(negative_prompt, len(prompts), "negative_prompt")
    n = int(num_images_per_prompt)
    if n < 1:
        raise ConfigError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    if not isinstance(micro_batch, (int, np.integer)) or micro_batch < 1:
        raise ConfigError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
    if latents is not None and (image is not None or mask is not None):
        raise ConfigError("pass latents= or image= (and mask=), not both")
    if settings.get("denoising_start") is not None and latents is None:
        raise ConfigError("denoising_start continues a handoff: pass the latents an earlier generate(..., "
                          "denoising_end=..., output='latents') returned as latents=")
    zero_uncond = model.force_zeros_for_empty_prompt and negative_prompt is None
    opts = make_options(model, task=task, zero_uncond=zero_uncond, **settings)
    if latents is not None:
        latents = np.asarray(latents, np.float32)
        if latents.ndim != 4 or latents.shape[-1] != model.latent_channels:
            raise ConfigError(f"latents have shape {latents.shape}; pass (N, H/f, W/f, {model.latent_channels}) NHWC "
                              "latents, as generate(..., output='latents') returns them")
        height, width = (d * model.downsample_factor for d in latents.shape[1:3])
    if image is not None:
        image = imlib.as_image_batch(image)
        height, width = image.shape[1:3]
    if mask is not None:
        mask = imlib.as_mask_batch(mask)
        if mask.shape[1:3] != image.shape[1:3]:
            raise ConfigError(f"mask size {mask.shape[2]}x{mask.shape[1]} does not match the image size "
                              f"{image.shape[2]}x{image.shape[1]} (width x height)")
    elif model.is_inpainting_unet:
        raise ConfigError(f"this U-Net takes {model.unet_config.in_channels} input channels (an inpainting U-Net): "
                          "use the Inpaint pipeline (generate with an image and a mask)")
    height, width = height or model.size, width or model.size
    _check_size(model, height, width)
    total = len(prompts) * n
    if not isinstance(seed, (int, np.integer)) or seed < 0 or seed + total > 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2^32 - number of images), got {seed!r}")
    latent_shape = (height // model.downsample_factor, width // model.downsample_factor, model.latent_channels)
    inputs = host_inputs(model, prompts, negatives, n, seed, opts.guided, time_ids(model, height, width, micro or {}))
    if noise is not None:  # else drawn per batch from the seeds (`seeded_noise`)
        noise = np.asarray(noise, np.float32)
        if noise.shape != (total, *latent_shape):
            raise ConfigError(f"noise has shape {noise.shape}, expected {(total, *latent_shape)} (NHWC latents)")
        inputs["noise"] = noise
    if image is not None:
        inputs["image"] = imlib.to_model_range(_per_image(image, len(prompts), n, "number of images"))
    if latents is not None:
        inputs["latents"] = _per_image(latents, len(prompts), n, "number of latents")
    if mask is not None:
        inputs["mask"] = _per_image(mask, len(prompts), n, "number of masks")
    return _run_batches(model, opts, inputs, total, batch_size, int(micro_batch), latent_shape, devices, params,
                        settings["guidance_scale"], progress)


def _run_batches(model, opts, inputs, total, batch_size, micro, latent_shape, devices, params, guidance_scale,
                 progress):
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    devices = list(devices or jax.local_devices())
    bs = min(int(batch_size or total), total)
    num_dev = max(1, min(len(devices), -(-bs // micro)))
    mesh = Mesh(np.array(devices[:num_dev]), ("gen",))
    per_call = -(-bs // (micro * num_dev)) * micro * num_dev  # padded to whole micro-batches on every device
    params = _placed(model, params, mesh)
    data = NamedSharding(mesh, P("gen"))
    scale = jax.device_put(np.float32(guidance_scale), NamedSharding(mesh, P()))
    starts = range(0, total, bs)
    bar = tqdm(starts, desc=f"{opts.task} {opts.sampler} x{opts.num_steps}", unit="batch",
               disable=not progress or len(starts) < 2)
    pending = []
    for start in bar:  # batch k + 1 is dispatched before batch k is fetched, so the device never waits on the host
        idx = np.minimum(np.arange(start, start + per_call), min(start + bs, total) - 1)  # pad by repetition
        batch = {k: v[idx] for k, v in inputs.items()}
        if "noise" not in batch:  # drawn at the batch's shape: no compile beyond the generation function's shapes
            batch["noise"] = seeded_noise(batch["seeds"], latent_shape)
        batch = jax.device_put(batch, data)
        fn = _compiled(model, opts, micro, mesh, params, batch, scale)
        pending.append((fn(params, batch, scale), min(bs, total - start)))
        if len(pending) > 1:
            out, count = pending[-2]
            pending[-2] = (np.asarray(out)[:count], count)
    return np.concatenate([np.asarray(out)[:count] for out, count in pending], axis=0)
