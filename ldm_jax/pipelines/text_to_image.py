"""Text-to-image: prompts (and negative prompts) -> uint8 images, the StableDiffusionPipeline equivalent."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ldm_jax.pipelines.base import Pipeline


class TextToImage(Pipeline):
    """``TextToImage.from_pretrained(path)(prompts, negative_prompt=None, ...) -> uint8 (B, H, W, 3)``.

    With the same weights, the same initial noise (``noise=``, NHWC latents) and the same scheduler settings,
    the images equal diffusers' StableDiffusionPipeline output (tests/pipelines check 1/255).
    """

    task = "text"

    def __call__(
        self,
        prompts: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
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
        progress: bool = True,
        **sampler_options,
    ) -> np.ndarray:
        """Generates ``len(prompts) * num_images_per_prompt`` images; image i uses seed + i.

        Args:
          prompts: one prompt or a list; negative_prompt: None (empty), one for all, or one per prompt.
          height, width: multiples of 8 (default: the U-Net's sample_size x the VAE factor).
          sampler: ddim, ddpm, euler, euler_ancestral, heun, dpmpp_2m, dpmpp_2m_sde, unipc; num_steps >= 1.
          guidance_scale: CFG weight w (<= 1: no unconditional pass); guidance_rescale: phi of Lin et al. 2023;
            guidance_interval: (t_lo, t_hi), guide only there (Kynkaanniemi et al. 2024).
          spacing: uniform, karras, logsnr, leading, trailing, linspace (default: the model's scheduler config).
          eta: DDIM / ancestral eta; final: "zero" or "sigma_min" (default from the scheduler config).
          noise: optional initial latents (N, H/f, W/f, C) instead of the seeded draws.
          batch_size: images per compiled call (default: all); the last batch is padded, so one compile serves.
          sampler_options: churn, s_tmin, s_tmax, s_noise, variance, rho, sigma_min, sigma_max, t_max.
        """
        height = height or self.default_size
        width = width or self.default_size
        opts = self._options(sampler=sampler, num_steps=num_steps, spacing=spacing, eta=eta, strength=1.0,
                             guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, final=final,
                             sampler_options=sampler_options, guidance_interval=guidance_interval)
        return self._generate(prompts, negative_prompt, num_images_per_prompt=num_images_per_prompt, height=height,
                              width=width, seed=seed, noise=noise, batch_size=batch_size, progress=progress,
                              opts=opts, guidance_scale=guidance_scale)
