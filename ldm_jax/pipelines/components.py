"""What a latent-diffusion pipeline is made of, and the model wrapper that joins them.

`Components` holds the U-Net, the VAE and the text encoder (configs and parameters), the noise schedule the
U-Net was trained with, its prediction kind and the sampling defaults its scheduler config asks for. The
loaders in `loading.py` build it from a diffusers folder, a CompVis single file or an ldm_jax workdir.

`UNetDenoiser` is the model wrapper: a pytree callable ``(x_t, t, context) -> output`` that maps the
framework's continuous time t in [0, 1] to the network's own timestep with ``schedule.timestep(t)``
(SD's discrete tables: timestep = 1000 t - 1, see ``ldm_jax.diffusion.schedules``) and, for SD's 9-channel
inpainting U-Nets, concatenates the extra input channels carried in the context. The VAE scaling factor is
applied by ``AutoencoderKL.latents`` / ``decode_latents``: latents = (z - shift) * scaling_factor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ldm_jax import diffusion
from ldm_jax.models.text_encoder import TextEncoder
from ldm_jax.models.unet import UNet, UNetConfig
from ldm_jax.models.vae import AutoencoderConfig, AutoencoderKL
from ldm_jax.types import Array, ConfigError, PyTree

PREDICTION_NAMES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "eps": "eps", "v": "v", "x0": "x0",
                    "flow": "flow"}


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """Grid settings a model's scheduler config asks for (diffusers' names in brackets).

    spacing [timestep_spacing]: leading / trailing / linspace for SD tables, uniform for continuous schedules;
    steps_offset [steps_offset]; final_ddim [set_alpha_to_one: True -> "zero", False -> "sigma_min"] is the
    target of DDIM's last step; final [final_sigmas_type] that of euler/heun/dpmpp/unipc.
    """

    spacing: str = "leading"
    steps_offset: int = 1
    final_ddim: str = "sigma_min"
    final: str = "zero"

    def final_for(self, sampler: str) -> str:
        if sampler == "ddim":
            return self.final_ddim
        return "zero" if sampler == "ddpm" else self.final


@dataclasses.dataclass(frozen=True, eq=False)
class Components:
    """Everything a pipeline needs; parameters are plain (unboxed) trees."""

    unet_config: UNetConfig
    unet_params: PyTree
    vae_config: AutoencoderConfig
    vae_params: PyTree
    text_encoder: TextEncoder
    schedule: diffusion.Schedule
    prediction: str = "eps"
    defaults: SamplingDefaults = SamplingDefaults()
    source: str = ""
    dtype: Any = None
    default_size: int | None = None  # image side when none is given (else U-Net sample_size x VAE factor)

    def __post_init__(self):
        if self.prediction not in diffusion.PREDICTIONS:
            raise ConfigError(f"prediction '{self.prediction}' is unknown; use one of {diffusion.PREDICTIONS}")
        if self.unet_config.cross_attention_dim != self.text_encoder.hidden_size:
            raise ConfigError(f"the U-Net attends to {self.unet_config.cross_attention_dim}-wide context but the "
                              f"text encoder gives {self.text_encoder.hidden_size}; pair matching models")
        lat = self.vae_config.latent_channels
        if self.unet_config.out_channels != lat or self.unet_config.in_channels not in (lat, 2 * lat + 1):
            raise ConfigError(f"U-Net channels in={self.unet_config.in_channels} out={self.unet_config.out_channels}"
                              f" do not fit a VAE with {lat} latent channels (expected in={lat} or "
                              f"{2 * lat + 1} for inpainting, out={lat})")

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

    def modules(self) -> tuple[UNet, AutoencoderKL]:
        return UNet(self.unet_config, dtype=self.dtype), AutoencoderKL(self.vae_config, dtype=self.dtype)

    def params(self) -> dict:
        """The traced inputs of a pipeline's jitted function (schedule included: it is a pytree)."""
        return {"unet": self.unet_params, "vae": self.vae_params, "text": self.text_encoder.params,
                "schedule": self.schedule}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UNetDenoiser:
    """``(x_t, t, context) -> network output`` for `diffusion.cfg` / `diffusion.sample`.

    t is the framework's (B,) time in [0, 1]; the U-Net gets ``schedule.timestep(t)``. `context` is the
    text encoder's hidden states, or ``{"text": hidden, "concat": extra}`` whose `extra` channels
    (mask, masked-image latents) are appended to x_t along the channel axis.
    """

    params: PyTree
    schedule: PyTree
    module: UNet = dataclasses.field(metadata=dict(static=True))

    def __call__(self, x: Array, t: Array, context: PyTree) -> Array:
        if isinstance(context, dict):
            x = jnp.concatenate([x, context["concat"].astype(x.dtype)], axis=-1)
            context = context["text"]
        timesteps = self.schedule.timestep(t)
        return self.module.apply({"params": self.params}, x, timesteps, context).astype(jnp.float32)
