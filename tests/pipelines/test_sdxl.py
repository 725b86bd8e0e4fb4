"""SDXL through the one generation path, against diffusers' StableDiffusionXL pipelines on a tiny random
SDXL saved by diffusers: a base (CLIP-L-like + bigG-like text encoders with projection, text_time U-Net with 6
time ids, force_zeros_for_empty_prompt) and a refiner (bigG only, 5 time ids with the aesthetic score), SDXL's
Euler scheduler (scaled_linear, leading spacing, steps_offset 1). Same weights, same initial latents; images
within 1/255 mean absolute difference.
"""

import dataclasses
import types

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_jax.ldm import LatentDiffusion
from ldm_jax.models import TextEncoders
from ldm_jax.types import ConfigError
from tests.pipelines.helpers import SDXL_WIDTH as WIDTH
from tests.pipelines.helpers import SIZE, save_tiny_sdxl, smooth_image
from tests.pipelines.test_parity import assert_matches, nchw

STEPS, GUIDANCE = 10, 5.0
LATENT = (SIZE // 8, SIZE // 8, 4)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sdxl")
    base, refiner = save_tiny_sdxl(root)
    return types.SimpleNamespace(root=root, base=base, refiner=refiner,
                                 ours=LatentDiffusion.from_pretrained(root / "base"),
                                 ours_refiner=LatentDiffusion.from_pretrained(root / "refiner"))


def noise_for(seed: int, batch: int) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), (batch, *LATENT)))


def test_folders_load_as_sdxl(sdxl):
    base, refiner = sdxl.ours, sdxl.ours_refiner
    assert isinstance(base.text_encoder, TextEncoders) and base.text_encoder.hidden_size == 2 * WIDTH
    assert [e.hidden_layer for e in base.text_encoder.encoders] == [-2, -2]
    assert [e.tokenizer.pad_id for e in base.text_encoder.encoders] == [49407, 0]
    assert refiner.text_encoder.hidden_size == WIDTH and refiner.text_encoder.pooled_size == WIDTH
    assert (base.num_time_ids, refiner.num_time_ids) == (6, 5)
    assert base.force_zeros_for_empty_prompt and not refiner.force_zeros_for_empty_prompt
    assert base.vae_config.scaling_factor == 0.13025 and base.defaults.spacing == "leading"
    # the joined encoders equal diffusers' encode_prompt (penultimate states concatenated, bigG's pooled)
    ids, mask = base.text_encoder.tokenize(["a red circle", "a blue square"])
    hidden, pooled = jax.jit(base.text_encoder.encode_pooled_ids)(base.text_encoder.params, ids, mask)
    with torch.no_grad():
        ref_hidden, _, ref_pooled, _ = sdxl.base.encode_prompt(["a red circle", "a blue square"],
                                                               do_classifier_free_guidance=False)
    np.testing.assert_allclose(hidden, ref_hidden.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pooled, ref_pooled.numpy(), rtol=1e-4, atol=1e-5)


def test_single_file_loads_as_the_folder_and_converts(sdxl, tmp_path, monkeypatch):
    """Stability's single-file layout of the same base (sgm conditioner keys, OpenCLIP bigG) loads into the same
    model: configs, every weight, the text encoders' options and the sampling defaults."""
    from ldm_jax.convert import compvis
    from ldm_jax.convert.common import write_safetensors
    from tests.convert.test_compvis import compvis_unet, compvis_vae, numpy_sd, tree_equal
    from tests.convert.test_sdxl import _openclip

    pipe, p0, p1 = sdxl.base, compvis.SDXL_PREFIX + "0.", compvis.SDXL_PREFIX + "1."
    write_safetensors(tmp_path / "base.safetensors", {
        **compvis_unet(pipe.unet), **compvis_vae(pipe.vae), **_openclip(pipe.text_encoder_2, p1 + "model."),
        **{f"{p0}transformer.text_model.{k}": v for k, v in numpy_sd(pipe.text_encoder).items()}})
    folder = sdxl.ours
    unet_fixed = {k: getattr(folder.unet_config, k) for k in ("num_heads", "head_dim", "norm_num_groups",
                                                              "addition_time_embed_dim", "sample_size")}
    text_fixed = {"num_heads": 4}
    single = LatentDiffusion.from_single_file(  # "auto" finds SDXL by its keys
        tmp_path / "base.safetensors", unet_config=unet_fixed, vae_config={"norm_num_groups": 8, "sample_size": SIZE},
        text_config=text_fixed, text_config_2=text_fixed)
    # the file tells the depth of attention levels only: 2 for level 1, where the folder says (1, 2) (level 0 has
    # no attention, so its 1 is never used)
    assert single.unet_config.transformer_layers_per_block == 2
    assert single.unet_config.replace(transformer_layers_per_block=(1, 2)) == folder.unet_config
    assert single.vae_config == folder.vae_config
    tree_equal(single.unet_params, folder.unet_params)
    tree_equal(single.vae_params, folder.vae_params)
    for ours, want in zip(single.text_encoder.encoders, folder.text_encoder.encoders, strict=True):
        # OpenCLIP pools at the largest id (eos_token_id=2, transformers' legacy rule), the folder's config at the
        # first 49407: the same token for both tokenizers (bigG's pads with "!" = 0, CLIP-L's with 49407 itself)
        assert ours.module.config.replace(eos_token_id=want.module.config.eos_token_id) == want.module.config
        assert (ours.hidden_layer, ours.final_norm, ours.tokenizer.pad_id) == (
            want.hidden_layer, want.final_norm, want.tokenizer.pad_id)
        tree_equal(ours.params, want.params)
    ids, mask = folder.text_encoder.tokenize(["a red circle", ""])
    for a, b in zip(single.text_encoder.encode_pooled_ids(single.text_encoder.params, ids, mask),
                    folder.text_encoder.encode_pooled_ids(folder.text_encoder.params, ids, mask), strict=True):
        np.testing.assert_array_equal(a, b)
    # the file gets SD's scheduler settings (SDXL's scheduler_config.json has set_alpha_to_one false; the tiny
    # folder's EulerDiscreteScheduler config has no such key): only DDIM's last step target differs
    assert single.force_zeros_for_empty_prompt
    assert dataclasses.replace(single.defaults, final_ddim="zero") == folder.defaults
    assert single.prediction == folder.prediction == "eps"

    # ldm-jax convert writes it as a StableDiffusionXLPipeline folder (the file's tiny head counts given as above:
    # the CLI infers SDXL's 64-wide heads); diffusers loads it, and so do we, to the same model
    import functools

    from diffusers import StableDiffusionXLPipeline

    from ldm_jax.pipelines import folders

    monkeypatch.setattr(compvis, "load_single_file", functools.partial(
        compvis.load_single_file, unet_config=unet_fixed, vae_config={"norm_num_groups": 8, "sample_size": SIZE},
        text_config=text_fixed, text_config_2=text_fixed))
    written = folders.from_single_file(str(tmp_path / "base.safetensors"), str(tmp_path / "folder"), "auto", None,
                                       False)
    assert sorted(written) == ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet",
                               "vae"]
    reloaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder")
    assert type(reloaded.scheduler).__name__ == "EulerDiscreteScheduler"
    assert reloaded.config.force_zeros_for_empty_prompt
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want = getattr(pipe, name).state_dict()
        for key, value in getattr(reloaded, name).state_dict().items():
            np.testing.assert_array_equal(value.numpy(), want[key].numpy(), err_msg=f"{name}.{key}")
    again = LatentDiffusion.from_pretrained(tmp_path / "folder")
    tree_equal(again.unet_params, folder.unet_params)
    assert again.force_zeros_for_empty_prompt and again.num_time_ids == 6
    assert [e.tokenizer.pad_id for e in again.text_encoder.encoders] == [49407, 0]


def test_text_to_image_with_micro_conditioning_matches_diffusers(sdxl):
    prompts = ["a red circle in the top left", "a blue square"]
    noise = noise_for(0, 2)
    micro = dict(original_size=(96, 128), crops_coords_top_left=(16, 8), target_size=(SIZE, SIZE))
    # no negative prompt: force_zeros_for_empty_prompt zeroes the negative text and pooled vector
    ours = sdxl.ours.generate(prompts, sampler="euler", num_steps=STEPS, guidance_scale=GUIDANCE, noise=noise,
                              height=SIZE, width=SIZE, **micro)
    ref = sdxl.base(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                    latents=nchw(noise), output_type="np", **micro).images
    assert_matches(ours, ref)
    # a negative prompt, negative micro-conditioning and guidance rescale, for one image: with several, diffusers
    # pairs its (2, 6) [negative, positive] time ids repeated B times with [B negatives, B positives] text, so
    # its images 1.. take the other side's ids (ours: each image its own rows)
    negative = dict(negative_original_size=(32, 48), negative_crops_coords_top_left=(0, 4),
                    negative_target_size=(SIZE, 2 * SIZE))
    ours_neg = sdxl.ours.generate(prompts[1], "blurry", sampler="euler", num_steps=STEPS, guidance_scale=GUIDANCE,
                                  guidance_rescale=0.7, noise=noise[1:], height=SIZE, width=SIZE, **micro, **negative)
    ref_neg = sdxl.base(prompts[1], negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        guidance_rescale=0.7, height=SIZE, width=SIZE, latents=nchw(noise[1:]), output_type="np",
                        **micro, **negative).images
    assert_matches(ours_neg, ref_neg)
    assert np.abs(ours_neg.astype(int) - ours[1:]).mean() > 2  # the negatives matter


def test_base_to_refiner_handoff_matches_diffusers(sdxl):
    prompts, noise, split = ["a green triangle"], noise_for(3, 1), 0.7
    latents = sdxl.ours.generate(prompts, sampler="euler", num_steps=STEPS, guidance_scale=GUIDANCE, noise=noise,
                                 height=SIZE, width=SIZE, denoising_end=split, output="latents")
    ref_latents = sdxl.base(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                            latents=nchw(noise), denoising_end=split, output_type="latent").images
    # diffusers' Euler state is x0 + sigma eps; ours the VP x_t = that / sqrt(1 + sigma^2) at the same grid point
    sigma = float(sdxl.base.scheduler.sigmas[sdxl.base.scheduler.step_index])
    np.testing.assert_allclose(latents, ref_latents.numpy().transpose(0, 2, 3, 1) / np.sqrt(1 + sigma**2),
                               rtol=1e-3, atol=1e-3)
    ours = sdxl.ours_refiner.generate(prompts, latents=latents, denoising_start=split, sampler="euler",
                                      num_steps=STEPS, guidance_scale=GUIDANCE, aesthetic_score=7.0,
                                      negative_aesthetic_score=2.0)
    ref = sdxl.refiner(prompts, image=ref_latents, denoising_start=split, num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE, aesthetic_score=7.0, negative_aesthetic_score=2.0,
                       output_type="np").images
    assert_matches(ours, ref)


def test_refiner_img2img_matches_diffusers(sdxl, monkeypatch):
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

    init, noise = smooth_image(1), noise_for(1, 2)
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: nchw(noise).reshape(shape))
    ours = sdxl.ours_refiner.generate(["a watercolor painting"], image=init, strength=0.6, sampler="euler",
                                      num_steps=STEPS, guidance_scale=GUIDANCE, num_images_per_prompt=2, noise=noise)
    ref = sdxl.refiner(["a watercolor painting"], image=Image.fromarray(init), strength=0.6,
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, num_images_per_prompt=2,
                       output_type="np").images
    assert_matches(ours, ref)


def test_inpaint_matches_diffusers(sdxl, monkeypatch):
    """SDXL's inpainting pipeline on the base (4-channel U-Net: latent blending), strength < 1, micro-conditioning
    and a negative prompt."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as module

    init, noise = smooth_image(3), noise_for(3, 1)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 8:40] = 255
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: nchw(noise).reshape(shape))
    ref_pipe = StableDiffusionXLInpaintPipeline(**sdxl.base.components)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe("a red apple", negative_prompt="blurry", image=Image.fromarray(init),
                   mask_image=Image.fromarray(mask, "L"), strength=0.75, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, height=SIZE, width=SIZE, original_size=(128, 96),
                   output_type="np").images
    ours = sdxl.ours.generate("a red apple", "blurry", image=init, mask=mask, strength=0.75, sampler="euler",
                              num_steps=STEPS, guidance_scale=GUIDANCE, noise=noise, original_size=(128, 96))
    assert_matches(ours, ref)


def test_sdxl_input_errors(sdxl, sd_comps):
    with pytest.raises(ConfigError, match="takes no micro-conditioning"):
        sd_comps.generate("a", original_size=(64, 64), num_steps=2)
    with pytest.raises(ConfigError, match="takes an aesthetic score instead"):
        sdxl.ours_refiner.generate("a", target_size=(64, 64), num_steps=2)
    with pytest.raises(ConfigError, match="only a refiner-style"):
        sdxl.ours.generate("a", aesthetic_score=6.0, num_steps=2)
    with pytest.raises(ConfigError, match="pair of numbers"):
        sdxl.ours.generate("a", original_size=64, num_steps=2)
    with pytest.raises(ConfigError, match="pass the latents"):
        sdxl.ours_refiner.generate("a", image=smooth_image(1), denoising_start=0.5, num_steps=4)
    with pytest.raises(ConfigError, match="denoising_end must be a fraction"):
        sdxl.ours.generate("a", denoising_end=1.5, num_steps=4)
    with pytest.raises(ConfigError, match="stops before the first step"):
        sdxl.ours.generate("a", denoising_end=0.01, num_steps=4)
