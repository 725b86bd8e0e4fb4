"""TextToImage / Img2Img / Inpaint against diffusers' PyTorch pipelines on a tiny random SD (same weights,
same initial latents, DDIM 10 steps, guidance 7.5), plus seeding, batching and the compile cache.

diffusers' img2img and inpaint pipelines sample the VAE posterior with a torch generator; ours use its mean.
The reference is therefore run with `retrieve_latents` in "argmax" mode (the posterior mean) and with its
`randn_tensor` returning our noise, so both sides start from the same latents.
"""

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_jax.ldm import LatentDiffusion
from ldm_jax.pipelines import Img2Img, Inpaint, TextToImage
from tests.pipelines.helpers import SIZE, smooth_image

STEPS, GUIDANCE = 10, 7.5
LATENT = (SIZE // 8, SIZE // 8, 4)


@pytest.fixture(scope="module")
def comps(sd_comps):
    return sd_comps


@pytest.fixture(scope="module")
def comps9(tiny_sd):
    return LatentDiffusion.from_pretrained(tiny_sd.sd_inpaint)


def noise_for(seed: int, batch: int) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), (batch, *LATENT)))


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def assert_matches(ours: np.ndarray, ref: np.ndarray) -> None:
    """uint8 ours vs diffusers' float [0, 1] output: mean |difference| within 1/255, on non-degenerate images."""
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    saturated = float(np.mean((ref < 0.02) | (ref > 0.98)))
    assert ref.std() > 0.05 and saturated < 0.3, (ref.std(), saturated)  # the comparison is not vacuous
    mad = float(np.mean(np.abs(ours / 255.0 - ref)))
    assert mad < 1.0 / 255.0, mad


def _mean_latents(module, monkeypatch, noise):
    """diffusers module: posterior mean instead of a sample, and our noise instead of torch's."""
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: nchw(noise).reshape(shape))


def test_text_to_image_matches_diffusers(tiny_sd, comps):
    prompts, negative = ["a red circle in the top left", "a blue square"], ["", "blurry, dark"]
    noise = noise_for(0, 2)
    pipe = TextToImage(comps, compilation_cache=False)
    compiled = pipe.num_compiled  # the model (a shared fixture) keeps what other tests compiled
    ours = pipe(prompts, negative, num_steps=STEPS, guidance_scale=GUIDANCE, guidance_rescale=0.7, noise=noise,
                height=SIZE, width=SIZE, progress=False)
    ref = tiny_sd.pipe(prompts, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       guidance_rescale=0.7, height=SIZE, width=SIZE, latents=nchw(noise), output_type="np").images
    assert_matches(ours, ref)
    assert np.abs(ours[0].astype(int) - ours[1]).mean() > 5  # prompts and noise differ -> images differ

    # Seeds: with no explicit noise, image i starts from N(0, I) drawn with jax.random.key(seed + i); the guidance
    # scale and the prompts are traced inputs, so none of these calls compiles again.
    seeded = pipe(prompts[::-1], num_steps=STEPS, guidance_scale=3.0, guidance_rescale=0.7, seed=41,
                  height=SIZE, width=SIZE, progress=False)
    explicit = pipe(prompts[::-1], num_steps=STEPS, guidance_scale=3.0, guidance_rescale=0.7,
                    noise=np.concatenate([noise_for(41, 1), noise_for(42, 1)]), height=SIZE, width=SIZE,
                    progress=False)
    np.testing.assert_array_equal(seeded, explicit)
    # Three prompts in batches of two: the last batch is padded, so the same compiled function serves, and an
    # image does not depend on the other images of its batch.
    three = pipe(prompts[::-1] + ["a green triangle"], num_steps=STEPS, guidance_scale=3.0, guidance_rescale=0.7,
                 seed=41, batch_size=2, height=SIZE, width=SIZE, progress=False)
    assert three.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_array_equal(three[:2], seeded)  # bit for bit: micro-batches make images batch-independent
    assert pipe.num_compiled == compiled + 1


def test_img2img_matches_diffusers(tiny_sd, comps, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    init, noise = smooth_image(1), noise_for(1, 2)
    _mean_latents(module, monkeypatch, noise)
    ref_pipe = StableDiffusionImg2ImgPipeline(**tiny_sd.pipe.components)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(["a watercolor painting"], image=Image.fromarray(init), strength=0.6, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, num_images_per_prompt=2, output_type="np").images
    ours = Img2Img(comps, compilation_cache=False)(["a watercolor painting"], init, strength=0.6, num_steps=STEPS,
                                                   guidance_scale=GUIDANCE, num_images_per_prompt=2, noise=noise,
                                                   progress=False)
    assert_matches(ours, ref)


def _mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    return mask


def test_inpaint_9_channel_unet_matches_diffusers(tiny_sd, comps9, monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    init, mask, noise = smooth_image(2), _mask(), noise_for(2, 2)
    _mean_latents(module, monkeypatch, noise)
    prompts = ["a cat", "a dog"]
    ref = tiny_sd.inpaint(prompts, image=Image.fromarray(init), mask_image=Image.fromarray(mask, "L"),
                          num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                          latents=nchw(noise), output_type="np").images
    pipe = Inpaint(comps9, compilation_cache=False)
    assert pipe.model.is_inpainting_unet
    ours = pipe(prompts, init, mask, num_steps=STEPS, guidance_scale=GUIDANCE, noise=noise, progress=False)
    assert_matches(ours, ref)


def test_inpaint_latent_blending_matches_diffusers(tiny_sd, comps, monkeypatch):
    """A 4-channel U-Net: after each step the kept region is reset to the input latents noised to the next
    time, and to the clean input latents at the end (diffusers' 4-channel inpainting path). strength < 1: the
    loop starts from the noised input latents, as img2img."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    init, mask, noise = smooth_image(3), _mask(), noise_for(3, 1)
    _mean_latents(module, monkeypatch, noise)
    ref_pipe = StableDiffusionInpaintPipeline(**tiny_sd.pipe.components)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe("a red apple", image=Image.fromarray(init), mask_image=Image.fromarray(mask, "L"), strength=0.75,
                   num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                   output_type="np").images
    pipe = Inpaint(comps, compilation_cache=False)
    assert not pipe.model.is_inpainting_unet
    ours = pipe("a red apple", init, mask, strength=0.75, num_steps=STEPS, guidance_scale=GUIDANCE, noise=noise,
                progress=False)
    assert_matches(ours, ref)
