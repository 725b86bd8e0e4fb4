"""SDXL converters: diffusers text_time U-Nets (base- and refiner-style) and transformers'
CLIPTextModelWithProjection, both ways, with output parity against the PyTorch models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ldm_jax import models
from ldm_jax.convert import compvis, hf
from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert.common import ConversionError, flatten, write_safetensors
from ldm_jax.models import text
from ldm_jax.types import ConfigError

POOLED, TIME_DIM = 12, 8
BASE_KW = dict(  # SDXL base layout in small: no attention at level 0, per-level depths, 6 time ids
    sample_size=8,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 2, 4),
    transformer_layers_per_block=(1, 1, 2),
    use_linear_projection=True,
    cross_attention_dim=24,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
)
REFINER_KW = {  # the refiner's: attention only in the middle levels, one depth everywhere, 5 time ids
    **BASE_KW,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 2,
    "transformer_layers_per_block": 2,
    "projection_class_embeddings_input_dim": POOLED + 5 * TIME_DIM,
}
TIME_IDS = {  # (original h, w, crop top, left, target h, w) / (original h, w, crop top, left, aesthetic score)
    6: [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 64.0, 32.0, 1024.0, 1024.0]],
    5: [[1024.0, 1024.0, 0.0, 0.0, 6.0], [768.0, 1344.0, 64.0, 32.0, 2.5]],
}


def _perturbed(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _unet_inputs(num_ids):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([5.0, 800.0])
    ctx = torch.randn(2, 3, 24, generator=g)
    added = {"text_embeds": torch.randn(2, POOLED, generator=g), "time_ids": torch.tensor(TIME_IDS[num_ids])}
    return x, t, ctx, added


def _torch_unet(model, num_ids):
    x, t, ctx, added = _unet_inputs(num_ids)
    with torch.no_grad():
        return model(x, t, ctx, added_cond_kwargs=added).sample.numpy()


def _ours_unet(cfg, params, num_ids):
    x, t, ctx, added = _unet_inputs(num_ids)
    out = jax.jit(lambda p, *a: models.UNet(cfg).apply({"params": p}, *a[:3], added=a[3]))(
        params,
        jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
        jnp.asarray(t.numpy()),
        jnp.asarray(ctx.numpy()),
        {k: jnp.asarray(v.numpy()) for k, v in added.items()},
    )
    return np.asarray(out).transpose(0, 3, 1, 2)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("kw,num_ids", [(BASE_KW, 6), (REFINER_KW, 5)], ids=["base", "refiner"])
def test_text_time_unet_matches_diffusers_both_ways(kw, num_ids, tmp_path):
    from diffusers import UNet2DConditionModel

    original = _perturbed(UNet2DConditionModel(**kw))
    original.save_pretrained(tmp_path / "in")
    cfg, params = dconv.load_unet(tmp_path / "in")
    assert cfg.addition_embed_type == "text_time"
    assert (cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) == (
        TIME_DIM, POOLED + num_ids * TIME_DIM)
    assert params["add_embedding"]["linear_1"]["kernel"].shape == (POOLED + num_ids * TIME_DIM, 64)
    want = _torch_unet(original, num_ids)
    rel = _rel(_ours_unet(cfg, params, num_ids), want)
    assert rel < 1e-4, rel

    dconv.save_unet(tmp_path / "out", cfg, params)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "out").eval()
    ref_sd, got_sd = original.state_dict(), reloaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(got_sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    np.testing.assert_array_equal(_torch_unet(reloaded, num_ids), want)
    assert dconv.load_unet(tmp_path / "out")[0] == cfg


def test_config_translation():
    d = {**BASE_KW}
    cfg = dconv.unet_config_from_diffusers(d)
    assert cfg.attention_levels == (False, True, True) and cfg.transformer_layers() == (1, 1, 2)
    back = dconv.unet_config_to_diffusers(cfg)
    assert back["addition_embed_type"] == "text_time"
    assert back["projection_class_embeddings_input_dim"] == POOLED + 6 * TIME_DIM
    assert dconv.unet_config_from_diffusers(back) == cfg
    # without an addition_embed_type diffusers ignores the widths; so do we
    plain = dconv.unet_config_from_diffusers({**d, "addition_embed_type": None})
    assert plain.addition_embed_type is None and plain.projection_class_embeddings_input_dim is None
    with pytest.raises(ConfigError, match="addition_embed_type='image' is not supported"):
        dconv.unet_config_from_diffusers({**d, "addition_embed_type": "image"})
    sdxl = dconv.unet_config_to_diffusers(models.presets.sdxl_unet())
    assert sdxl["attention_head_dim"] == [5, 10, 20] and sdxl["transformer_layers_per_block"] == [1, 2, 10]
    assert sdxl["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]


# ---------------------------------------------------------------------------- CLIPTextModelWithProjection
def _tiny_hf_clip(eos_token_id):
    # eos_token_id=2 is the legacy config (SDXL's text_encoder_2): the pooled token is the largest id
    return transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=8, hidden_act="gelu", projection_dim=12, eos_token_id=eos_token_id,
        bos_token_id=62, pad_token_id=1,
    )


IDS = np.array([[62, 5, 9, 63, 0, 0, 0, 0], [62, 1, 2, 3, 4, 5, 6, 63]], np.int32)


def _torch_clip(model):
    with torch.no_grad():
        out = model(torch.from_numpy(IDS.astype(np.int64)), output_hidden_states=True)
    return out.hidden_states[-2].numpy(), out.text_embeds.numpy()


@pytest.mark.parametrize("eos", [63, 2], ids=["eos_id", "legacy_argmax"])
def test_clip_with_projection_matches_transformers_both_ways(eos, tmp_path):
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(_tiny_hf_clip(eos)).eval()
    model.save_pretrained(tmp_path / "in")
    cfg, params = hf.load_clip_text(tmp_path / "in")
    assert cfg.projection_dim == 12 and cfg.eos_token_id == eos and cfg.hidden_act == "gelu"
    hidden, embeds = text.CLIPTextEncoder(cfg).apply(
        {"params": params}, jnp.asarray(IDS), hidden_layer=-2, final_norm=False, return_pooled=True)
    want_hidden, want_embeds = _torch_clip(model)
    assert _rel(np.asarray(hidden), want_hidden) < 1e-4
    assert _rel(np.asarray(embeds), want_embeds) < 1e-4

    hf.save_clip_text(tmp_path / "out", cfg, params)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModelWithProjection"] and config["projection_dim"] == 12
    again, info = transformers.CLIPTextModelWithProjection.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True)
    assert not any(info.values()), info
    ref_sd, got_sd = model.state_dict(), again.eval().state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(got_sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    assert hf.load_clip_text(tmp_path / "out")[0] == cfg


def test_projection_is_strict(tmp_path):
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(_tiny_hf_clip(63)).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = hf.load_clip_text(_saved(model, tmp_path))[0]
    with pytest.raises(ConversionError, match="unexpected 1: text_projection.weight"):
        hf.clip_text_params_from_state_dict(sd, cfg.replace(projection_dim=None))
    del sd["text_projection.weight"]
    with pytest.raises(ConversionError, match="missing 1: text_projection/kernel"):
        hf.clip_text_params_from_state_dict(sd, cfg)


def _saved(model, tmp_path):
    model.save_pretrained(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------- single files (Stability's sgm layout)
def _numpy_sd(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _compvis_unet(model):
    cfg = dconv.unet_config_from_diffusers(dict(model.config))
    return {compvis.UNET_PREFIX + compvis.unet_compvis_name(k, cfg): v for k, v in _numpy_sd(model).items()}


def _openclip(model, prefix):
    """HF CLIPTextModelWithProjection -> OpenCLIP text-tower keys (fused in_proj, x @ P projection)."""
    sd = {k.removeprefix("text_model."): v for k, v in _numpy_sd(model).items()}
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.copy(),
        "logit_scale": np.array(4.6, np.float32),
    }
    for i in range(model.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"ln_1.{leaf}"] = sd[src + f"layer_norm1.{leaf}"]
            out[dst + f"ln_2.{leaf}"] = sd[src + f"layer_norm2.{leaf}"]
            out[dst + f"attn.in_proj_{leaf}"] = np.concatenate([sd[src + f"self_attn.{q}_proj.{leaf}"] for q in "qkv"])
            out[dst + f"attn.out_proj.{leaf}"] = sd[src + f"self_attn.out_proj.{leaf}"]
            out[dst + f"mlp.c_fc.{leaf}"] = sd[src + f"mlp.fc1.{leaf}"]
            out[dst + f"mlp.c_proj.{leaf}"] = sd[src + f"mlp.fc2.{leaf}"]
    return {prefix + k: v for k, v in out.items()}


def _tree_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture(scope="module")
def sdxl_parts():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8)).eval()
    bigg = transformers.CLIPTextModelWithProjection(_tiny_hf_clip(2)).eval()
    return _perturbed(UNet2DConditionModel(**BASE_KW)), _perturbed(UNet2DConditionModel(**REFINER_KW), 1), clip_l, bigg


def test_single_file_key_maps_agree_with_diffusers(sdxl_parts):
    from diffusers.loaders import single_file_utils as sfu

    base, refiner, _, bigg = sdxl_parts
    for unet in (base, refiner):
        _tree_equal(sfu.convert_ldm_unet_checkpoint(_compvis_unet(unet), dict(unet.config)), _numpy_sd(unet))
    prefix = compvis.SDXL_PREFIX + "1.model."
    ckpt = {k: torch.from_numpy(np.asarray(v)) for k, v in _openclip(bigg, prefix).items()}
    reference = {k: v.numpy() for k, v in sfu.convert_open_clip_checkpoint(bigg, ckpt, prefix=prefix).items()}
    ours = compvis.openclip_to_hf_clip(compvis._strip(_openclip(bigg, prefix), prefix), projection=True)
    _tree_equal(ours, reference)


def test_sdxl_base_and_refiner_single_files(sdxl_parts, tmp_path):
    base, refiner, clip_l, bigg = sdxl_parts
    p0, p1 = compvis.SDXL_PREFIX + "0.", compvis.SDXL_PREFIX + "1."
    files = {
        "base": {**_compvis_unet(base), **{f"{p0}transformer.text_model.{k}": v for k, v in _numpy_sd(clip_l).items()},
                 **_openclip(bigg, p1 + "model.")},
        "refiner": {**_compvis_unet(refiner), **_openclip(bigg, p0 + "model.")},
    }
    unet_fixed = {"head_dim": None, "norm_num_groups": 8, "addition_time_embed_dim": TIME_DIM, "sample_size": 8}
    for name, unet in (("base", base), ("refiner", refiner)):
        write_safetensors(tmp_path / f"{name}.safetensors", files[name])
        assert compvis.detect_kind(files[name]) == "sdxl"
        heads = dict(unet.config)["attention_head_dim"]
        out = compvis.load_single_file(
            tmp_path / f"{name}.safetensors", "sdxl", unet_config={**unet_fixed, "num_heads": heads},
            text_config={"num_heads": 2}, text_config_2={"num_heads": 2})
        want_cfg = dconv.unet_config_from_diffusers(dict(unet.config))
        got_cfg, got = out["unet"]
        assert got_cfg == want_cfg, name  # depths, levels and the added embedding inferred from shapes
        _tree_equal(got, dconv.unet_params_from_state_dict(_numpy_sd(unet), want_cfg))
        te2_cfg, te2 = out["text_encoder_2"]
        assert te2_cfg == hf.clip_text_config_from_hf(bigg.config.to_dict()).replace(projection_dim=12)
        _tree_equal(te2, hf.clip_text_params_from_state_dict(_numpy_sd(bigg), te2_cfg))
        assert ("text_encoder" in out) == (name == "base")
        if name == "base":  # CLIP-L: HF keys, no projection, quick_gelu
            te_cfg, te = out["text_encoder"]
            assert te_cfg.projection_dim is None and te_cfg.hidden_act == "quick_gelu"
            _tree_equal(te, hf.clip_text_params_from_state_dict(_numpy_sd(clip_l), te_cfg))
    auto = compvis.load_single_file(tmp_path / "base.safetensors", unet_config={**unet_fixed, "num_heads": (2, 2, 4)},
                                    text_config={"num_heads": 2}, text_config_2={"num_heads": 2})
    assert auto["kind"] == "sdxl" and set(auto) >= {"unet", "text_encoder", "text_encoder_2"}  # found by its keys
