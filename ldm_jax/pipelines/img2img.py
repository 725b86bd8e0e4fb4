"""Image-to-image (SDEdit, Meng et al. 2022): noise an input image to an intermediate time and denoise it.

As diffusers' StableDiffusionImg2ImgPipeline: of the N-step grid, the last int(N strength) steps run, from
x = alpha init + sigma noise at the first of them, with init the VAE latents of the image (posterior mean,
times the scaling factor). strength = 1 starts from (almost) pure noise, small strengths stay close to the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ldm_jax.pipelines import images as imlib
from ldm_jax.pipelines.base import Pipeline


class Img2Img(Pipeline):
    """``Img2Img.from_pretrained(path)(prompts, image, strength=0.8, ...) -> uint8 (B, H, W, 3)``."""

    task = "img2img"

    def __call__(
        self,
        prompts: str | Sequence[str],
        image,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        strength: float = 0.8,
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
        """`image`: a PIL image, path or uint8 array (H, W, 3) — one for all, one per prompt or one per output
        image; its size (multiple of 8) is the output size. `strength` in [0, 1]. Other arguments as
        `TextToImage.__call__`."""
        image = imlib.as_image_batch(image)
        opts = self._options(sampler=sampler, num_steps=num_steps, spacing=spacing, eta=eta, strength=strength,
                             guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, final=final,
                             sampler_options=sampler_options, guidance_interval=guidance_interval)
        return self._generate(prompts, negative_prompt, num_images_per_prompt=num_images_per_prompt,
                              height=image.shape[1], width=image.shape[2], seed=seed, noise=noise,
                              batch_size=batch_size, progress=progress, opts=opts, guidance_scale=guidance_scale,
                              image=image)
