"""CompVis single-file checkpoints: key maps checked against diffusers' own single-file conversion, then
whole files (.safetensors SD1-style, .ckpt SD2-style with EMA) loaded and compared with the diffusers/HF
converters' results."""

import numpy as np
import pytest
import torch

from ldm_jax.convert import compvis, hf
from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert.common import ConversionError, flatten, write_safetensors
from ldm_jax.types import ConfigError

SD1_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=8,
)
SD2_UNET = dict(
    SD1_UNET,
    layers_per_block=1,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    cross_attention_dim=32,
    transformer_layers_per_block=(2, 1),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    num_class_embeds=4,
)
VAE = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    norm_num_groups=8,
)
TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
)


def perturbed(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def numpy_sd(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def tree_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def compvis_unet(model):
    cfg = dconv.unet_config_from_diffusers(dict(model.config))
    return {compvis.UNET_PREFIX + compvis.unet_compvis_name(k, cfg): v for k, v in numpy_sd(model).items()}


def compvis_vae(model):
    cfg = dconv.vae_config_from_diffusers(dict(model.config))
    out = {}
    for k, v in numpy_sd(model).items():
        name = compvis.vae_compvis_name(k, cfg)
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # CompVis stores these as 1x1 convs
        out[compvis.VAE_PREFIX + name] = v
    return out


def openclip_text(model, extra_layer=True):
    """HF CLIPTextModel -> OpenCLIP text-tower keys (fused in_proj), with one more (unused) last layer."""
    sd, p = numpy_sd(model), compvis.OPENCLIP_PREFIX
    out = {
        p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["final_layer_norm.weight"],
        p + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    n = model.config.num_hidden_layers
    for i in range(n + extra_layer):
        src, dst = f"encoder.layers.{min(i, n - 1)}.", f"{p}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"ln_1.{leaf}"] = sd[src + f"layer_norm1.{leaf}"]
            out[dst + f"ln_2.{leaf}"] = sd[src + f"layer_norm2.{leaf}"]
            out[dst + f"attn.in_proj_{leaf}"] = np.concatenate(
                [sd[src + f"self_attn.{q}_proj.{leaf}"] for q in "qkv"], axis=0
            )
            out[dst + f"attn.out_proj.{leaf}"] = sd[src + f"self_attn.out_proj.{leaf}"]
            out[dst + f"mlp.c_fc.{leaf}"] = sd[src + f"mlp.fc1.{leaf}"]
            out[dst + f"mlp.c_proj.{leaf}"] = sd[src + f"mlp.fc2.{leaf}"]
        if i == n:  # make the extra layer differ from the last real one
            out = {k: (v * 2 if k.startswith(dst) else v) for k, v in out.items()}
    width = model.config.hidden_size
    out[p + "text_projection"] = np.random.default_rng(0).normal(size=(width, width)).astype(np.float32)
    out[p + "logit_scale"] = np.array(4.6, np.float32)
    return out


@pytest.fixture(scope="module")
def sd1():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return (
        perturbed(UNet2DConditionModel(**SD1_UNET)),
        perturbed(AutoencoderKL(**VAE), 1),
        perturbed(CLIPTextModel(CLIPTextConfig(**TEXT)), 2),
    )


@pytest.fixture(scope="module")
def sd2():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return (
        perturbed(UNet2DConditionModel(**SD2_UNET), 3),
        perturbed(CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act="gelu")), 4),
    )


def test_key_maps_agree_with_diffusers_single_file_conversion(sd1, sd2):
    from diffusers.loaders import single_file_utils as sfu

    for unet in (sd1[0], sd2[0]):
        back = sfu.convert_ldm_unet_checkpoint(compvis_unet(unet), dict(unet.config))
        tree_equal(back, numpy_sd(unet))
    vae = sd1[1]
    tree_equal(sfu.convert_ldm_vae_checkpoint(compvis_vae(vae), dict(vae.config)), numpy_sd(vae))
    text = sd2[1]
    ckpt = {k: torch.from_numpy(np.asarray(v)) for k, v in openclip_text(text).items()}
    reference = sfu.convert_open_clip_checkpoint(text, ckpt)
    ours = compvis.openclip_to_hf_clip(compvis._strip(openclip_text(text), compvis.OPENCLIP_PREFIX), 2)
    reference = {k: v.numpy() for k, v in reference.items() if ".layers.2." not in k and k != "text_projection.weight"}
    tree_equal(ours, reference)


def test_sd1_safetensors_file(sd1, tmp_path):
    unet, vae, text = sd1
    ckpt = {
        **compvis_unet(unet),
        **compvis_vae(vae),
        **{compvis.CLIP_PREFIX + "text_model." + k: v for k, v in numpy_sd(text).items()},
        compvis.CLIP_PREFIX + "text_model.embeddings.position_ids": np.arange(16, dtype=np.int64)[None],
        "alphas_cumprod": np.linspace(1, 0, 1000, dtype=np.float32),  # ignored: outside the three parts
        "first_stage_model.loss.logvar": np.zeros((), np.float32),
    }
    write_safetensors(tmp_path / "sd1.safetensors", ckpt)
    out = compvis.load_single_file(
        tmp_path / "sd1.safetensors",
        unet_config={"norm_num_groups": 8},
        vae_config={"norm_num_groups": 8},
        text_config={"num_heads": 4},
    )
    assert out["kind"] == "sd15"

    unet_cfg = dconv.unet_config_from_diffusers(dict(unet.config))
    got_cfg, got = out["unet"]
    assert got_cfg.replace(sample_size=8) == unet_cfg  # 8 heads per level: SD1's rule, as in this model
    tree_equal(got, dconv.unet_params_from_state_dict(numpy_sd(unet), unet_cfg))

    vae_cfg = dconv.vae_config_from_diffusers(dict(vae.config))
    got_cfg, got = out["vae"]
    assert got_cfg.replace(sample_size=vae_cfg.sample_size) == vae_cfg
    tree_equal(got, dconv.vae_params_from_state_dict(numpy_sd(vae), vae_cfg))

    text_cfg = hf.clip_text_config_from_hf(text.config.to_dict())
    got_cfg, got = out["text_encoder"]
    assert got_cfg.replace(eos_token_id=text_cfg.eos_token_id) == text_cfg
    tree_equal(got, hf.clip_text_params_from_state_dict(numpy_sd(text), text_cfg))


def test_sd2_ckpt_with_ema(sd2, tmp_path):
    unet, text = sd2
    ckpt = {**compvis_unet(unet), **openclip_text(text)}
    rng = np.random.default_rng(5)
    ema = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in compvis_unet(unet).items()}
    ckpt.update({"model_ema." + "".join(k.split(".")[1:]): v for k, v in ema.items()})
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in ckpt.items()}}, tmp_path / "sd2.ckpt")
    heads = {"head_dim": None, "num_heads": (2, 4), "norm_num_groups": 8}
    out = compvis.load_single_file(tmp_path / "sd2.ckpt", unet_config=heads, text_config={"num_heads": 4}, use_ema=True)
    assert out["kind"] == "sd21" and "vae" not in out

    unet_cfg = dconv.unet_config_from_diffusers(dict(unet.config))
    got_cfg, got = out["unet"]
    assert got_cfg.replace(sample_size=8) == unet_cfg
    tree_equal(got, compvis.unet_params_from_compvis(ema, unet_cfg))
    with pytest.raises(AssertionError):  # the EMA copy, not the raw weights
        tree_equal(got, dconv.unet_params_from_state_dict(numpy_sd(unet), unet_cfg))

    text_cfg = hf.clip_text_config_from_hf(text.config.to_dict())
    got_cfg, got = out["text_encoder"]
    assert got_cfg.num_layers == 2 and got_cfg.hidden_act == "gelu"  # the 3rd OpenCLIP layer is dropped
    assert got_cfg.replace(eos_token_id=text_cfg.eos_token_id) == text_cfg
    tree_equal(got, hf.clip_text_params_from_state_dict(numpy_sd(text), text_cfg))


def test_strict_errors_name_compvis_keys(sd1, tmp_path):
    unet = sd1[0]
    cfg = dconv.unet_config_from_diffusers(dict(unet.config))
    sd = compvis_unet(unet)
    del sd["model.diffusion_model.out.2.bias"]
    sd["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    with pytest.raises(ConversionError) as err:
        compvis.unet_params_from_compvis(sd, cfg)
    msg = str(err.value)
    assert "missing 1: out.2.bias" in msg
    assert "input_blocks.1.0.in_layers.2.weight: expected (16, 16, 3, 3), got (16, 16, 1, 1)" in msg
    with pytest.raises(ConfigError, match="use 'sd15', 'sd21', 'sdxl' or 'auto'"):
        compvis.load_single_file(tmp_path / "x.safetensors", kind="sd3")
    write_safetensors(tmp_path / "other.safetensors", {"weight": np.zeros(2, np.float32)})
    with pytest.raises(ConversionError, match="not an original Stable-Diffusion checkpoint"):
        compvis.load_single_file(tmp_path / "other.safetensors")
