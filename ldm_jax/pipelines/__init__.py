"""Inference pipelines: text-to-image, img2img and inpainting, thin wrappers over `LatentDiffusion.generate`.

    from ldm_jax.pipelines import TextToImage, Img2Img, Inpaint
    pipe = TextToImage.from_pretrained("path/to/sd15")       # diffusers folder, .safetensors/.ckpt, workdir, or
                                                              # a model id in the local Hugging Face cache
    images = pipe(["a red apple"], negative_prompt=None, sampler="ddim", num_steps=30,
                  guidance_scale=7.5, seed=0)                 # uint8 (B, H, W, 3); image i uses seed + i
    edit = Img2Img(pipe.model)(["a green apple"], images[0], strength=0.6)
    fill = Inpaint(pipe.model)(["a pear"], images[0], mask)   # mask: white = repaint

Everything (seeding, batching, compilation, the jitted loop) is the model's (``ldm_jax.ldm``); JAX's persistent
compilation cache keeps compiled loops across processes. Command line: ``ldm-jax sample``.
"""

from ldm_jax.ldm import LatentDiffusion, SamplingDefaults, scheduler_from_config
from ldm_jax.pipelines.base import Pipeline
from ldm_jax.pipelines.img2img import Img2Img
from ldm_jax.pipelines.inpaint import Inpaint
from ldm_jax.pipelines.text_to_image import TextToImage

__all__ = ["Img2Img", "Inpaint", "LatentDiffusion", "Pipeline", "SamplingDefaults", "TextToImage",
           "scheduler_from_config"]
