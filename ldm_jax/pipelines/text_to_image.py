"""Text-to-image: prompts -> uint8 images, the StableDiffusionPipeline equivalent."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ldm_jax.pipelines.base import Pipeline


class TextToImage(Pipeline):
    """``TextToImage.from_pretrained(path)(prompts, negative_prompt=None, ...) -> uint8 (B, H, W, 3)``.

    With the same weights, the same initial noise (``noise=``, NHWC latents) and the same scheduler settings,
    the images equal diffusers' StableDiffusionPipeline output (tests/pipelines check 1/255). Arguments as
    `LatentDiffusion.generate` (SD's defaults: 50 steps, guidance 7.5); image i uses seed + i.
    """

    task = "text"

    def __call__(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 num_steps: int = 50, guidance_scale: float = 7.5, progress: bool = True, **kwargs) -> np.ndarray:
        return self.model.generate(prompts, negative_prompt, num_steps=num_steps, guidance_scale=guidance_scale,
                                   progress=progress, **kwargs)
