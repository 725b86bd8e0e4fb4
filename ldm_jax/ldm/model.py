"""`LatentDiffusion`: the one latent-diffusion model object.

A `LatentDiffusion` holds the denoiser network (U-Net config and parameters), the KL autoencoder, the text
encoder (module, parameters, tokenizer), the noise schedule the network was trained with, its prediction kind
(eps / v / x0 / flow), the latent scaling (in the VAE config: latents = (z - shift) * scaling_factor) and the
sampling defaults its scheduler config asks for. It is built from a training workdir, a diffusers folder, a
CompVis/SD single file, a model id in the local Hugging Face cache (`from_pretrained` dispatches; see
``ldm_jax.ldm.loading``) or from a run config plus parameters (`from_config`, what training holds), and it owns
the one `generate` every command uses (training grids, evaluation callbacks, ``ldm-jax evaluate``, sweeps, the
demo, ``ldm-jax sample`` and the pipelines); see ``ldm_jax.ldm.generate`` for the seeding rule.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ldm_jax import diffusion
from ldm_jax.ldm import generate as gen
from ldm_jax.ldm import loading
from ldm_jax.ldm.generate import Denoiser, SampleConfig
from ldm_jax.ldm.loading import SamplingDefaults
from ldm_jax.models import backbones
from ldm_jax.models.layers import canonical_dtype
from ldm_jax.models.text_encoder import TextEncoder
from ldm_jax.models.vae import AutoencoderConfig, AutoencoderKL
from ldm_jax.types import ConfigError, PyTree


@dataclasses.dataclass(frozen=True, eq=False)
class LatentDiffusion:
    """Autoencoder + denoiser + text encoder + schedule + prediction (module doc); parameters are plain trees.

    ``unet_config`` / ``unet_params`` are the denoiser network's, whichever backbone it is (a `UNetConfig`,
    `DiTConfig` or `MMDiTConfig`; the names predate the transformer backbones).
    ``unet_params`` may be None (a model being trained from scratch); `generate` then needs ``unet_params=``.
    """

    unet_config: backbones.BackboneConfig
    unet_params: PyTree
    vae_config: AutoencoderConfig
    vae_params: PyTree
    text_encoder: TextEncoder
    schedule: diffusion.Schedule
    prediction: str = "eps"
    precondition: str = "none"  # "edm": EDM's preconditioning around the network (x0 prediction)
    sigma_data: float = 0.5
    network_input: str = "vp"  # "flow": the network sees SD3's x_flow and 1000 tau (generate.Denoiser)
    defaults: SamplingDefaults = SamplingDefaults()
    source: str = ""
    dtype: Any = None
    default_size: int | None = None  # image side when none is given (else U-Net sample_size x VAE factor)
    sample: SampleConfig | None = None  # the training run's `sample` section (workdirs), the commands' defaults
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt -> zero negative text (diffusers' name)
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)  # see `replace`
    _placements: dict = dataclasses.field(default_factory=dict, repr=False)  # devices -> placed own parameters

    def __post_init__(self):
        if self.prediction not in diffusion.PREDICTIONS:
            raise ConfigError(f"prediction '{self.prediction}' is unknown; use one of {diffusion.PREDICTIONS}")
        width = backbones.context_dim(self.unet_config)
        if width != self.text_encoder.hidden_size:
            raise ConfigError(f"the {self.backbone} attends to {width}-wide context but the text encoder gives "
                              f"{self.text_encoder.hidden_size}; pair matching models")
        lat = self.vae_config.latent_channels
        c_in, c_out = backbones.channels(self.unet_config)
        if c_out != lat or c_in not in (lat, 2 * lat + 1):
            raise ConfigError(f"{self.backbone} channels in={c_in} out={c_out} do not fit a VAE with {lat} latent "
                              f"channels (expected in={lat} or {2 * lat + 1} for inpainting, out={lat})")
        self.num_time_ids  # noqa: B018  (checks an SDXL U-Net's added conditioning against the text encoder)

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, prediction: str | None = None,
                        ema: bool = True, kind: str = "auto", step: int | None = None,
                        cache_dir=None) -> LatentDiffusion:
        """From a training workdir, a diffusers SD folder, a CompVis/SD single file or a model id ("org/name")
        in the local Hugging Face cache (never downloaded). `prediction` overrides the prediction kind; `ema`
        and `step` pick a workdir's weights; `kind` is a single file's "sd15" / "sd21" / "sdxl" / "auto"."""
        dtype = canonical_dtype(dtype) if dtype is not None else None
        return cls(**loading.pretrained_parts(path, dtype=dtype, prediction=prediction, ema=ema, kind=kind,
                                              step=step, cache_dir=cache_dir))

    @classmethod
    def from_workdir(cls, path: str | os.PathLike, *, step: int | None = None, ema: bool = True,
                     dtype=None) -> LatentDiffusion:
        """From a stage-2 training workdir (its saved config, EMA parameters of the newest or `step` checkpoint)."""
        return cls(**loading.workdir_parts(path, step=step, ema=ema, dtype=dtype))

    @classmethod
    def from_diffusers(cls, path: str | os.PathLike, *, dtype=None, variant: str | None = None) -> LatentDiffusion:
        """From a diffusers StableDiffusionPipeline folder (its scheduler config honoured)."""
        return cls(**loading.diffusers_parts(path, dtype=dtype, variant=variant))

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, **kwargs) -> LatentDiffusion:
        """From a CompVis/SD/SDXL single file (``loading.single_file_parts``: kind, prediction, use_ema, dtype,
        configs)."""
        return cls(**loading.single_file_parts(path, **kwargs))

    @classmethod
    def from_config(cls, config, unet_params: PyTree = None, schedule_params: PyTree = None) -> LatentDiffusion:
        """From a run config (model, diffusion and data sections, read as training reads them) and U-Net
        parameters (None: a model to be trained, or a ``model.unet.pretrained`` folder's weights); a learned
        schedule's parameters (default: its initial ones)."""
        return cls(**loading.config_parts(config, unet_params, schedule_params))

    def replace(self, **changes) -> LatentDiffusion:
        """A copy with `changes`. A copy with other parameters only (e.g. ``unet_params=ema``) shares the compiled
        generation functions; any other change (configs, modules, schedule, defaults) starts a new cache."""
        copy = dataclasses.replace(self, **changes)
        params_only = set(changes) <= {"unet_params", "vae_params", "source"}
        object.__setattr__(copy, "_compiled", self._compiled if params_only else {})
        object.__setattr__(copy, "_placements", {})
        return copy

    # ------------------------------------------------------------------------------------------ properties
    @property
    def downsample_factor(self) -> int:
        return self.vae_config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.vae_config.latent_channels

    @property
    def is_inpainting_unet(self) -> bool:
        """SD's inpainting U-Nets take [latents, mask, masked-image latents] (2 c + 1 channels)."""
        return self.unet_config.in_channels == 2 * self.latent_channels + 1

    @property
    def backbone(self) -> str:
        """The denoiser's kind: "unet", "dit" or "mmdit"."""
        return backbones.kind(self.unet_config)

    @property
    def unet(self):
        """The denoiser network module (any backbone; see `backbone`)."""
        return backbones.network(self.unet_config, self.dtype)

    @property
    def num_time_ids(self) -> int:
        """Micro-conditioning numbers the U-Net's added embedding takes: SDXL base 6 (original size, crop,
        target size), the refiner 5 (the target size replaced by an aesthetic score); 0 for other networks."""
        cfg = self.unet_config
        if getattr(cfg, "addition_embed_type", None) != "text_time":
            return 0
        pooled = self.text_encoder.pooled_size
        if pooled is None:
            raise ConfigError("this U-Net adds pooled text (SDXL's text_time embedding) but the text encoder has no "
                              "pooled output: pair it with CLIP encoders")
        rest = cfg.projection_class_embeddings_input_dim - pooled
        num, left = divmod(rest, cfg.addition_time_embed_dim)
        if left or num not in (5, 6):
            raise ConfigError(f"the U-Net's added embedding takes {cfg.projection_class_embeddings_input_dim} numbers; "
                              f"{pooled} pooled text + {rest} is not 5 or 6 time ids of width "
                              f"{cfg.addition_time_embed_dim} (SDXL's refiner / base)")
        return num

    @property
    def vae(self) -> AutoencoderKL:
        return AutoencoderKL(self.vae_config, dtype=self.dtype)

    @property
    def size(self) -> int:
        """Image side when none is given."""
        return self.default_size or self.unet_config.sample_size * self.downsample_factor

    def with_lora(self, *files: str | os.PathLike | tuple[str | os.PathLike, float]) -> LatentDiffusion:
        """A copy with LoRA files merged into the U-Net's and the CLIP text encoder's weights: each item is a path
        or (path, weight); diffusers/PEFT and kohya safetensors (``ldm_jax.convert.lora``). Weights add up, as
        diffusers' ``set_adapters``; a key that fits no layer stops with one line naming it."""
        unet_params, text_encoder = loading.merged_lora(self, [f if isinstance(f, tuple) else (f, 1.0) for f in files])
        if text_encoder is self.text_encoder:  # U-Net weights only: the compiled generation functions are reused
            return self.replace(unet_params=unet_params)
        return self.replace(unet_params=unet_params, text_encoder=text_encoder)

    def denoiser(self, unet_params: PyTree = None, schedule=None) -> Denoiser:
        """The model wrapper over these (or the given) denoiser parameters and schedule."""
        return Denoiser(self.unet_params if unet_params is None else unet_params,
                        self.schedule if schedule is None else schedule, self.unet, self.precondition,
                        self.sigma_data, self.network_input)

    def params(self, unet_params: PyTree = None, schedule=None) -> dict:
        """The traced inputs of the jitted generation function (schedule included: it is a pytree)."""
        unet_params = self.unet_params if unet_params is None else unet_params
        if unet_params is None:
            raise ConfigError("this model has no U-Net parameters yet: pass unet_params=...")
        return {"unet": unet_params, "vae": self.vae_params, "text": self.text_encoder.params,
                "schedule": self.schedule if schedule is None else schedule}

    # ------------------------------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        image=None,
        mask=None,
        latents=None,
        strength: float | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        sampler: str = "ddim",
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        seed: int = 0,
        spacing: str | None = None,
        eta: float | None = None,
        final: str | None = None,
        noise=None,
        batch_size: int | None = None,
        micro_batch: int = 1,
        devices: Sequence | None = None,
        unet_params: PyTree = None,
        schedule=None,
        progress: bool = False,
        output: str = "images",
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        negative_aesthetic_score: float | None = None,
        **sampler_options,
    ) -> np.ndarray:
        """Text-to-image, img2img (`image`) or inpainting (`image` + `mask`): ``len(prompts) *
        num_images_per_prompt`` uint8 images (N, H, W, 3), prompt by prompt.

        Seeds: image i of the call uses seed + i for its initial noise and its step noise (see
        ``ldm_jax.ldm.generate``), so any image is reproduced alone, in any batch and on any number of devices,
        bit for bit, by every command.

        Args:
          prompts: one prompt or a list; negative_prompt: None (empty), one for all, or one per prompt.
          image: img2img / inpainting input (PIL image, path, uint8 array (H, W, 3) or a batch: one for all,
            per prompt or per image); its size is the output size. mask: same size, white / >= 0.5 = repaint.
          strength: img2img / inpainting strength in [0, 1] (default 0.8 / 1.0; 1 starts from pure noise).
          height, width: text-to-image size, multiples of the VAE factor (default `size`).
          sampler: one of ``diffusion.SAMPLERS``; num_steps >= 1.
          guidance_scale: CFG weight w (<= 1: no unconditional pass); guidance_rescale: phi of Lin et al. 2023;
            guidance_interval: (t_lo, t_hi), guide only there (Kynkaanniemi et al. 2024).
          spacing, final: the time grid (default: the model's scheduler config); eta: DDIM / ancestral eta.
          noise: optional initial latents (N, H/f, W/f, C) instead of the seeded draws.
          batch_size: images per compiled call (memory); micro_batch: images the network sees at once on a
            device. Results depend on micro_batch only (floating-point sums change with it), never on
            batch_size, the number of devices or the image's neighbours.
          devices: the devices the batch is spread over (default: all local devices).
          unet_params: other U-Net parameters (e.g. a training run's EMA) with the same compiled function;
            schedule: another schedule of the same kind (a learned schedule's current parameters).
          output: "images" (uint8) or "latents": float32 (N, H/f, W/f, C) latents, not decoded, in the VP scale
            the samplers use (x_t = alpha x0 + sigma eps; x0 itself after the last step).
          denoising_end: stop at that fraction of the denoising (SDXL's base -> refiner handoff; use with
            output="latents"); denoising_start: continue from `latents` (another model's denoising_end output)
            at that fraction, without adding noise. The grid point is `generate.handoff_step`'s.
          latents: img2img from latents instead of an image (noised to `strength` unless denoising_start).
          original_size, crops_coords_top_left, target_size ((height, width) / (top, left)), aesthetic_score and
            their negative_* counterparts: SDXL's micro-conditioning (`generate.time_ids`), for U-Nets with
            the text_time embedding only.
          sampler_options: ``diffusion.SAMPLER_OPTIONS`` and grid options (rho, sigma_min, sigma_max, t_max).

        SDXL models (`num_time_ids` > 0) also condition on the pooled text; with no negative prompt and
        `force_zeros_for_empty_prompt`, the negative text and pooled vector are zeros (diffusers' rule).
        """
        if image is None and latents is None:
            task = "text"
        else:
            task = "img2img" if mask is None else "inpaint"
        micro = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                     target_size=target_size, aesthetic_score=aesthetic_score,
                     negative_original_size=negative_original_size,
                     negative_crops_coords_top_left=negative_crops_coords_top_left,
                     negative_target_size=negative_target_size, negative_aesthetic_score=negative_aesthetic_score)
        if strength is None:
            strength = {"text": 1.0, "img2img": 0.8, "inpaint": 1.0}[task]
        return gen.run(self, prompts, negative_prompt, task=task, image=image, mask=mask, latents=latents, micro=micro,
                       output=output, denoising_start=denoising_start, denoising_end=denoising_end,
                       num_images_per_prompt=num_images_per_prompt, height=height, width=width, seed=seed,
                       noise=noise, batch_size=batch_size, micro_batch=micro_batch, devices=devices,
                       params=self.params(unet_params, schedule), progress=progress, sampler=sampler,
                       num_steps=num_steps, spacing=spacing, eta=eta, strength=strength, guidance_scale=guidance_scale,
                       guidance_rescale=guidance_rescale, guidance_interval=guidance_interval, final=final,
                       sampler_options=sampler_options)
