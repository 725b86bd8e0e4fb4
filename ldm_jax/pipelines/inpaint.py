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

from ldm_jax.pipelines.base import Pipeline
from ldm_jax.types import ConfigError


class Inpaint(Pipeline):
    """``Inpaint.from_pretrained(path)(prompts, image, mask, ...) -> uint8 (B, H, W, 3)``.

    `image` as in `Img2Img`; `mask`: a PIL image, path or array of the same height and width (white / >= 0.5:
    repaint), one for all, per prompt or per image. Other arguments as `LatentDiffusion.generate`.
    """

    task = "inpaint"

    def __call__(self, prompts: str | Sequence[str], image, mask, negative_prompt: str | Sequence[str] | None = None,
                 *, strength: float = 1.0, num_steps: int = 50, guidance_scale: float = 7.5, progress: bool = True,
                 **kwargs) -> np.ndarray:
        if mask is None:
            raise ConfigError("Inpaint needs a mask (white = repaint); use Img2Img without one")
        return self.model.generate(prompts, negative_prompt, image=image, mask=mask, strength=strength,
                                   num_steps=num_steps, guidance_scale=guidance_scale, progress=progress, **kwargs)
