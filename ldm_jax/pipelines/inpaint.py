"""Inpainting: regenerate the masked region of an image (mask = 1, white) and keep the rest (mask = 0).

Two methods, chosen by the U-Net:

* SD's inpainting U-Nets (2 c + 1 input channels, e.g. sd-1.5-inpainting): the network sees
  concat[x_t, mask, latents of the masked image] (mask downsampled to the latent grid, nearest; masked image
  = image where mask = 0, gray where mask = 1), as diffusers' StableDiffusionInpaintPipeline.
* any other U-Net: latent blending (Avrahami et al. 2023, "Blended Latent Diffusion"; diffusers' 4-channel
  path): after every step x = m x + (1 - m) (alpha_next known + sigma_next noise), and the kept region is set
  to the input's latents exactly at the end.

`strength` < 1 starts, as img2img, from the noised input latents instead of pure noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ldm_jax.pipelines import images as imlib
from ldm_jax.pipelines.base import Pipeline
from ldm_jax.types import ConfigError


class Inpaint(Pipeline):
    """``Inpaint.from_pretrained(path)(prompts, image, mask, ...) -> uint8 (B, H, W, 3)``."""

    task = "inpaint"

    def __call__(
        self,
        prompts: str | Sequence[str],
        image,
        mask,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        strength: float = 1.0,
        num_images_per_prompt: int = 1,
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
        """`image` as in `Img2Img`; `mask`: a PIL image, path or array of the same height and width (white /
        >= 0.5: repaint), one for all, per prompt or per image. Other arguments as `TextToImage.__call__`."""
        image = imlib.as_image_batch(image)
        mask = imlib.as_mask_batch(mask)
        if mask.shape[1:3] != image.shape[1:3]:
            raise ConfigError(f"mask size {mask.shape[2]}x{mask.shape[1]} does not match the image size "
                              f"{image.shape[2]}x{image.shape[1]} (width x height)")
        opts = self._options(sampler=sampler, num_steps=num_steps, spacing=spacing, eta=eta, strength=strength,
                             guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, final=final,
                             sampler_options=sampler_options, guidance_interval=guidance_interval)
        return self._generate(prompts, negative_prompt, num_images_per_prompt=num_images_per_prompt,
                              height=image.shape[1], width=image.shape[2], seed=seed, noise=noise,
                              batch_size=batch_size, progress=progress, opts=opts, guidance_scale=guidance_scale,
                              image=image, mask=mask)
