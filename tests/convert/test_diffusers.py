"""diffusers-folder converters: strictness, config translation, file variants, export back to diffusers."""

import json
import os

import numpy as np
import pytest
import torch

from ldm_jax import models
from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert.common import ConversionError, flatten
from ldm_jax.types import ConfigError

UNET_KW = dict(  # linear projections, per-level heads, class labels, 9 input channels
    sample_size=8,
    in_channels=9,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    num_class_embeds=3,
    cross_attention_dim=8,
    norm_num_groups=8,
)
SD1_UNET_KW = {
    **UNET_KW,
    "in_channels": 4,
    "attention_head_dim": 2,
    "use_linear_projection": False,
    "num_class_embeds": None,
}
VAE_KW = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
)


def perturbed(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tree_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def unet_out(model, in_channels, labels=True):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, in_channels, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    y = torch.tensor([0, 2]) if labels else None
    with torch.no_grad():
        return model(x, torch.tensor([5.0, 800.0]), ctx, class_labels=y).sample


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    model = perturbed(UNet2DConditionModel(**UNET_KW))
    path = tmp_path_factory.mktemp("unet")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    model = perturbed(AutoencoderKL(**VAE_KW))
    path = tmp_path_factory.mktemp("vae")
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("kw", [UNET_KW, SD1_UNET_KW], ids=["linear_proj", "conv_proj"])
def test_unet_export_loads_in_diffusers_and_reproduces_outputs(kw, tmp_path):
    from diffusers import UNet2DConditionModel

    original = perturbed(UNet2DConditionModel(**kw))
    original.save_pretrained(tmp_path / "in")
    cfg, params = dconv.load_unet(tmp_path / "in")
    dconv.save_unet(tmp_path / "out", cfg, params)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "out").eval()
    want, got = original.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    labels = kw["num_class_embeds"] is not None
    torch.testing.assert_close(
        unet_out(reloaded, kw["in_channels"], labels), unet_out(original, kw["in_channels"], labels)
    )
    assert dconv.load_unet(tmp_path / "out")[0] == cfg


def test_vae_export_loads_in_diffusers_and_reproduces_outputs(vae_dir, tmp_path):
    from diffusers import AutoencoderKL

    original, path = vae_dir
    cfg, params = dconv.load_vae(path)
    dconv.save_vae(tmp_path, cfg, params)
    reloaded = AutoencoderKL.from_pretrained(tmp_path).eval()
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).sample, original(x).sample, rtol=0, atol=0)
    assert reloaded.config.scaling_factor == original.config.scaling_factor


def test_fp16_variant_round_trip(unet_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    _, path = unet_dir
    cfg, params = dconv.load_unet(path)
    dconv.save_unet(tmp_path, cfg, params, dtype="float16")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    cfg16, params16 = dconv.load_unet(tmp_path)  # falls back to the fp16 variant
    halved = {k: np.asarray(v).astype(np.float16).astype(np.float32) for k, v in flatten(params).items()}
    tree_equal(params16, dconv.unflatten(halved))
    loaded = UNet2DConditionModel.from_pretrained(tmp_path, variant="fp16").state_dict()
    want = dconv.unet_state_dict_from_params(params16, cfg)
    assert loaded.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(loaded[k].float().numpy(), v, err_msg=k)


def test_pytorch_bin_and_pipeline_folder(unet_dir, tmp_path):
    model, path = unet_dir
    model.save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert "diffusion_pytorch_model.bin" in os.listdir(tmp_path / "unet")
    cfg_bin, params_bin = dconv.load_unet(tmp_path)  # an SD pipeline folder: finds unet/
    cfg, params = dconv.load_unet(path)
    assert cfg_bin == cfg
    tree_equal(params_bin, params)


def test_legacy_vae_attention_names(vae_dir):
    model, path = vae_dir
    cfg, params = dconv.load_vae(path)
    legacy = {}
    for k, v in model.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v.numpy()
    assert any(".query." in k for k in legacy)
    tree_equal(dconv.vae_params_from_state_dict(legacy, cfg), params)


def test_strict_conversion_lists_every_problem(unet_dir):
    model, path = unet_dir
    cfg, _ = dconv.load_unet(path)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    del sd["conv_in.bias"]
    sd["mid_block.resnets.0.conv1.weight"] = sd["mid_block.resnets.0.conv1.weight"][:, :, :1]
    sd["lora.up.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        dconv.unet_params_from_state_dict(sd, cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing 1: conv_in.bias" in msg and "unexpected 1: lora.up.weight" in msg
    assert "mid_block.resnets.0.conv1.weight: expected (32, 32, 3, 3), got (32, 32, 1, 3)" in msg


def test_config_translation_errors(unet_dir):
    _, path = unet_dir
    with open(path / "config.json") as f:
        base = json.load(f)
    assert dconv.unet_config_from_diffusers(base).num_class_embeds == 3
    with pytest.raises(ConfigError, match="addition_embed_type='text' is not supported"):
        dconv.unet_config_from_diffusers({**base, "addition_embed_type": "text"})
    with pytest.raises(ConfigError, match="unknown key 'not_a_field'"):
        dconv.unet_config_from_diffusers({**base, "not_a_field": 1})
    with pytest.raises(ConfigError, match="up_block_types must mirror"):
        dconv.unet_config_from_diffusers({**base, "up_block_types": ["UpBlock2D", "UpBlock2D"]})
    with pytest.raises(ConfigError, match="down_block_types"):
        dconv.unet_config_from_diffusers({**base, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(ConfigError, match="latents_mean"):
        dconv.vae_config_from_diffusers({"latents_mean": [0.1] * 4})


def test_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dconv.load_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dconv.unet_config_to_diffusers(models.tiny_unet())))
    with pytest.raises(FileNotFoundError, match="found: config.json"):
        dconv.load_unet(tmp_path)
