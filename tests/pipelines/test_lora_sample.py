"""LoRA at inference: a LoRA that diffusers saved for the tiny SD (U-Net and CLIP text encoder adapters) merged by
`LatentDiffusion.with_lora` gives diffusers' images with that LoRA loaded, at full and half weight; the
command line's FILE:WEIGHT rule."""

import numpy as np
import pytest
import torch

from ldm_jax.commands.sample import lora_spec
from ldm_jax.pipelines import TextToImage
from tests.convert.test_lora import randomize_lora, transformers_accepts_installed_peft
from tests.pipelines.helpers import SIZE
from tests.pipelines.test_parity import GUIDANCE, STEPS, assert_matches, nchw, noise_for

PROMPTS = ["a red circle in the top left", "a blue square"]


@pytest.fixture(scope="module")
def lora_pipe(tiny_sd, tmp_path_factory):
    """diffusers' tiny SD with a random PEFT LoRA on the U-Net's attention and the text encoder, and its file."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd.sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with transformers_accepts_installed_peft():
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    randomize_lora(pipe.unet, 3)
    randomize_lora(pipe.text_encoder, 4)
    folder = tmp_path_factory.mktemp("sd_lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    return pipe, folder / "pytorch_lora_weights.safetensors"


def _images(pipe, noise):
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                    latents=nchw(noise), output_type="np").images


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_with_lora_gives_diffusers_images_with_the_lora_loaded(sd_comps, tiny_sd, lora_pipe, weight):
    pipe, path = lora_pipe
    from peft.tuners.lora import LoraLayer

    layers = [m for m in [*pipe.unet.modules(), *pipe.text_encoder.modules()] if isinstance(m, LoraLayer)]
    for layer in layers:  # an adapter weight scales every layer's update (diffusers' set_adapters)
        layer.scale_layer(weight)
    try:
        noise = noise_for(3, 2)
        ref = _images(pipe, noise)
        ours = TextToImage(sd_comps.with_lora((path, weight)), compilation_cache=False)(
            PROMPTS, num_steps=STEPS, guidance_scale=GUIDANCE, noise=noise, height=SIZE, width=SIZE, progress=False)
        assert_matches(ours, ref)
        base = TextToImage(sd_comps, compilation_cache=False)(
            PROMPTS, num_steps=STEPS, guidance_scale=GUIDANCE, noise=noise, height=SIZE, width=SIZE, progress=False)
        assert np.abs(ours.astype(int) - base).mean() > 2  # the LoRA changes the images
    finally:
        for layer in layers:
            layer.unscale_layer(weight)


def test_lora_flag_file_and_weight(tmp_path):
    (tmp_path / "a:b.safetensors").write_text("x")
    assert lora_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert lora_spec("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert lora_spec(str(tmp_path / "a:b.safetensors")) == (str(tmp_path / "a:b.safetensors"), 1.0)
