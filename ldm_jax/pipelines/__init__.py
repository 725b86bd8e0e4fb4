"""Inference pipelines: text-to-image, img2img and inpainting from diffusers folders, single files or workdirs.

    from ldm_jax.pipelines import TextToImage, Img2Img, Inpaint
    pipe = TextToImage.from_pretrained("path/to/sd15")       # diffusers folder, .safetensors/.ckpt, or workdir
    images = pipe(["a red apple"], negative_prompt=None, sampler="ddim", num_steps=30,
                  guidance_scale=7.5, seed=0)                 # uint8 (B, H, W, 3); image i uses seed + i
    edit = Img2Img(pipe.components)(["a green apple"], images[0], strength=0.6)
    fill = Inpaint(pipe.components)(["a pear"], images[0], mask)   # mask: white = repaint

Each call runs text encoding, the whole denoising loop and VAE decoding in one jit, compiled once per
(options, batch shape) and cached on the pipeline object; JAX's persistent compilation cache keeps the
compiled loop across processes (`compile_cache`). Command line: ``ldm-jax sample``.
"""

from ldm_jax.pipelines.base import Options, Pipeline
from ldm_jax.pipelines.compile_cache import default_cache_dir, enable_compilation_cache
from ldm_jax.pipelines.components import Components, SamplingDefaults, UNetDenoiser
from ldm_jax.pipelines.img2img import Img2Img
from ldm_jax.pipelines.inpaint import Inpaint
from ldm_jax.pipelines.loading import (
    load_components,
    load_diffusers,
    load_single_file,
    load_workdir,
    scheduler_from_config,
)
from ldm_jax.pipelines.text_to_image import TextToImage

__all__ = [
    "Components", "Img2Img", "Inpaint", "Options", "Pipeline", "SamplingDefaults", "TextToImage", "UNetDenoiser",
    "default_cache_dir", "enable_compilation_cache", "load_components", "load_diffusers", "load_single_file",
    "load_workdir", "scheduler_from_config",
]
