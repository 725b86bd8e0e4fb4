"""SD3 / SD3.5 transformer converter: parity with diffusers' SD3Transformer2DModel (torch 2.13 CPU), export back to
diffusers, exact round trips, sharded and pipeline folders, strictness."""

import json

import jax
import numpy as np
import pytest
import torch

from ldm_jax.convert import sd3
from ldm_jax.convert.common import ConversionError, flatten, unflatten
from ldm_jax.models import mmdit as M
from ldm_jax.types import ConfigError
from tests.convert.transformer_helpers import rel_err, tree_equal

TINY = dict(  # 3 blocks of 2 heads x 8, an odd pos grid, context and pooled widths of their own
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    pos_embed_max_size=11,
)
CASES = {
    "sd3": TINY,
    # SD3.5-like: QK RMSNorm, dual attention in a joint block and in the text-pre-only last block, 5 out channels
    "sd35": {**TINY, "qk_norm": "rms_norm", "dual_attention_layers": (0, 2), "out_channels": 5},
}


def make_torch_model(kw, seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**kw).eval()
    with torch.no_grad():  # every weight random (norm scales off 1, biases off 0), so each one matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(kw, batch=2, h=6, w=10, seq_len=5, seed=0):
    """NHWC latents (a 3 x 5 patch grid, cropped off-centre of the 11 x 11 table), times, context, pooled."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, h, w, kw["in_channels"])).astype(np.float32)
    t = np.array([3.0, 871.5, 421.5][:batch], np.float32)
    ctx = rng.normal(size=(batch, seq_len, kw["joint_attention_dim"])).astype(np.float32)
    pooled = rng.normal(size=(batch, kw["pooled_projection_dim"])).astype(np.float32)
    return x, t, ctx, pooled


def torch_forward(model, x, t, ctx, pooled):
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2)),
            encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(t),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, torch model, its saved folder, loaded cfg, loaded params); the sd35 case is saved in shards."""
    name = request.param
    model = make_torch_model(CASES[name])
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, max_shard_size="20KB" if name == "sd35" else "10GB")
    cfg, params = sd3.load_sd3_transformer(path)
    return name, model, path, cfg, params


def test_loaded_config(case):
    name, _, path, cfg, _ = case
    assert cfg.hidden == 16 and cfg.num_layers == 3 and cfg.pos_embed_max_size == 11
    assert cfg.joint_attention_dim == 12 and cfg.pooled_projection_dim == 10
    if name == "sd35":
        assert cfg.qk_norm == "rms_norm" and cfg.dual_attention_layers == (0, 2) and cfg.out_channels == 5
        assert (path / "diffusion_pytorch_model.safetensors.index.json").exists()
    else:
        assert cfg.qk_norm is None and cfg.dual_attention_layers == ()


def test_forward_matches_diffusers(case):
    name, model, _, cfg, params = case
    x, t, ctx, pooled = inputs(CASES[name])
    ours = jax.jit(lambda p, *a: M.MMDiT(cfg).apply({"params": p}, *a))(params, x, t, ctx, pooled)
    want = torch_forward(model, x, t, ctx, pooled)
    assert ours.shape == want.shape == (2, 6, 10, cfg.out_channels)
    err = rel_err(ours, want)
    print(f"{name}: max |ours - diffusers| / max |diffusers| = {err:.2e}")
    assert err < 1e-4


def test_export_loads_in_diffusers_and_reproduces_outputs(case, tmp_path):
    from diffusers import SD3Transformer2DModel

    name, model, _, cfg, params = case
    sd3.save_sd3_transformer(tmp_path, cfg, params)
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path).eval()
    want, got = model.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)  # the position buffer included
    args = inputs(CASES[name], batch=1, h=4, w=8)
    # equal weights; torch's CPU kernels may still differ in the last bit between two module instances
    np.testing.assert_allclose(torch_forward(reloaded, *args), torch_forward(model, *args), rtol=1e-6, atol=1e-6)
    assert sd3.load_sd3_transformer(tmp_path)[0] == cfg


def test_load_save_load_is_exact(case, tmp_path):
    _, _, _, cfg, params = case
    sd3.save_sd3_transformer(tmp_path, cfg, params)
    cfg2, params2 = sd3.load_sd3_transformer(tmp_path)
    assert cfg2 == cfg
    tree_equal(params2, params)
    assert set(flatten(params)) == set(M.mmdit_param_shapes(cfg))


def test_pipeline_folder_and_fp16_variant(case, tmp_path):
    _, _, _, cfg, params = case
    sd3.save_sd3_transformer(tmp_path / "transformer", cfg, params, dtype="float16")
    assert sorted(p.name for p in (tmp_path / "transformer").iterdir()) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors"]
    cfg16, params16 = sd3.load_sd3_transformer(tmp_path)  # an SD3 pipeline folder; falls back to fp16
    assert cfg16 == cfg
    halved = {k: np.asarray(v).astype(np.float16).astype(np.float32) for k, v in flatten(params).items()}
    tree_equal(params16, unflatten(halved))


def test_strict_conversion_and_position_check(case):
    name, model, _, cfg, _ = case
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    del sd["context_embedder.bias"]
    sd["proj_out.weight"] = sd["proj_out.weight"][:3]
    sd["transformer_blocks.9.attn.to_q.weight"] = np.zeros((16, 16), np.float32)
    with pytest.raises(ConversionError) as err:
        sd3.sd3_params_from_state_dict(sd, cfg)
    msg = str(err.value)
    assert "\n" not in msg and "missing 1: context_embedder.bias" in msg
    assert "unexpected 1: transformer_blocks.9.attn.to_q.weight" in msg
    assert f"proj_out.weight: expected ({4 * cfg.out_channels}, 16), got (3, 16)" in msg

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match="pos_embed.pos_embed differs from the sin-cos table of sample_size=12"):
        sd3.sd3_params_from_state_dict(sd, cfg.replace(sample_size=12))  # another grid spacing
    np.testing.assert_allclose(sd[sd3.POS_KEY][0], M.pos_embed_table(cfg), rtol=0, atol=1e-6)


def test_config_translation_errors(case):
    _, _, path, _, _ = case
    base = json.loads((path / "config.json").read_text())
    assert sd3.sd3_config_from_diffusers({**base, "out_channels": None}).out_channels == 4
    with pytest.raises(ConfigError, match="qk_norm='layer_norm'"):
        sd3.sd3_config_from_diffusers({**base, "qk_norm": "layer_norm"})
    with pytest.raises(ConfigError, match="unknown key 'not_a_field'"):
        sd3.sd3_config_from_diffusers({**base, "not_a_field": 1})
    with pytest.raises(ConfigError, match="expected 'SD3Transformer2DModel'"):
        sd3.sd3_config_from_diffusers({**base, "_class_name": "FluxTransformer2DModel"})
    with pytest.raises(ConfigError, match="caption_projection_dim=24 must equal"):
        sd3.sd3_config_from_diffusers({**base, "caption_projection_dim": 24})


def test_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        sd3.load_sd3_transformer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(sd3.sd3_config_to_diffusers(M.tiny_mmdit())))
    with pytest.raises(FileNotFoundError, match="found: config.json"):
        sd3.load_sd3_transformer(tmp_path)
