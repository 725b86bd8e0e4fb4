"""Image-to-image (SDEdit, Meng et al. 2022): noise an input image to an intermediate time and denoise it.

As diffusers' StableDiffusionImg2ImgPipeline: of the N-step grid, the last int(N strength) steps run, from
x = alpha init + sigma noise at the first of them, with init the VAE latents of the image (posterior mean,
times the scaling factor). strength = 1 starts from (almost) pure noise, small strengths stay close to the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ldm_jax.pipelines.base import Pipeline


class Img2Img(Pipeline):
    """``Img2Img.from_pretrained(path)(prompts, image, strength=0.8, ...) -> uint8 (B, H, W, 3)``.

    `image`: a PIL image, path or uint8 array (H, W, 3) — one for all, one per prompt or one per output image;
    its size (multiple of 8) is the output size. Other arguments as `LatentDiffusion.generate`.
    """

    task = "img2img"

    def __call__(self, prompts: str | Sequence[str], image, negative_prompt: str | Sequence[str] | None = None, *,
                 strength: float = 0.8, num_steps: int = 50, guidance_scale: float = 7.5, progress: bool = True,
                 **kwargs) -> np.ndarray:
        return self.model.generate(prompts, negative_prompt, image=image, strength=strength, num_steps=num_steps,
                                   guidance_scale=guidance_scale, progress=progress, **kwargs)
