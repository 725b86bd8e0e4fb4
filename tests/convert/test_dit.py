"""DiT converter: parity with diffusers' DiTTransformer2DModel (torch 2.13 CPU) both ways, exact round trips,
the shared time/label embedding, legacy Transformer2DModel configs and the export refusals."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch

from ldm_jax.convert import dit as dconv
from ldm_jax.convert.common import ConversionError, flatten
from ldm_jax.models import dit as D
from ldm_jax.types import ConfigError
from tests.convert.transformer_helpers import rel_err, tree_equal

TINY = dict(  # learned-sigma outputs (8 = 2 x in_channels), 10 classes (+1 null row)
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)


def make_torch_dit(seed=0):
    """A random tiny diffusers DiT, every weight moved off its init (adaLN-Zero's zeros included), with every
    block's time/label embedding a copy of block 0's as in real checkpoints."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def inputs(size, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, size, size, TINY["in_channels"])).astype(np.float32)
    t = np.array([3.0, 999.0, 421.5], np.float32)[:batch]
    y = np.array([0, 9, 10], np.int64)[:batch]  # 10 = the null label
    return x, t, y


def torch_forward(model, x, t, y):
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(y)).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def apply_fn():
    return jax.jit(lambda cfg, p, x, t, y: D.DiT(cfg).apply({"params": p}, x, t, None, y), static_argnums=0)


@pytest.fixture(scope="module")
def torch_case(tmp_path_factory):
    model = make_torch_dit()
    path = tmp_path_factory.mktemp("dit")
    model.save_pretrained(path)
    return model, path


def test_loaded_config(torch_case):
    _, path = torch_case
    cfg, _ = dconv.load_dit(path)
    assert cfg == D.DiTConfig(in_channels=4, out_channels=8, patch_size=2, sample_size=8, hidden_size=16, depth=2,
                              num_heads=2, num_classes=10, mlp_norm_eps=1e-5)
    assert D.dit_xl_2() == dconv.dit_config_from_diffusers(dconv.dit_config_to_diffusers(D.dit_xl_2()))


@pytest.mark.parametrize("size", [8, 12], ids=["trained_size", "interpolated_positions"])
def test_forward_matches_diffusers(torch_case, apply_fn, size):
    model, path = torch_case
    cfg, params = dconv.load_dit(path)
    x, t, y = inputs(size)
    want = torch_forward(model, x, t, y)
    ours = apply_fn(cfg, params, x, t, y.astype(np.int32))
    assert ours.shape == want.shape == (3, size, size, 8)
    assert rel_err(ours, want) < 1e-4


def test_sincos_positions_match_diffusers_on_non_square_grids():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for grid, base, scale in (((4, 4), 4, 1.0), ((3, 5), 4, 1.0), ((6, 2), 4, 2.0)):
        want = get_2d_sincos_pos_embed(16, grid, base_size=base, interpolation_scale=scale).float().numpy()
        ours = D.dit_positions(D.tiny_dit(hidden_size=16, sample_size=2 * base, interpolation_scale=scale), grid)
        np.testing.assert_allclose(ours, want, atol=1e-6)


def test_our_parameters_export_to_diffusers_with_the_same_outputs(apply_fn, tmp_path):
    cfg = dconv.dit_config_from_diffusers(TINY)
    # random weights, no zeros (adaLN-Zero's included), so every layer and the final (shift, scale) order count
    rng = np.random.default_rng(1)
    params = dconv.unflatten({k: (rng.normal(size=s) * 0.2).astype(np.float32)
                              for k, s in D.dit_param_shapes(cfg).items()})
    dconv.save_dit(tmp_path, cfg, params)
    from diffusers import DiTTransformer2DModel

    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    x, t, y = inputs(8, seed=1)
    want = torch_forward(reloaded, x, t, y)
    ours = apply_fn(cfg, params, x, t, y.astype(np.int32))
    assert np.std(want) > 1e-2 and rel_err(ours, want) < 1e-4
    emb = [b.norm1.emb.state_dict() for b in reloaded.transformer_blocks]
    for k in emb[0]:  # the shared embedding is written into every block
        torch.testing.assert_close(emb[1][k], emb[0][k], rtol=0, atol=0)


def test_round_trip_is_exact(torch_case, tmp_path):
    model, path = torch_case
    cfg, params = dconv.load_dit(path)
    dconv.save_dit(tmp_path / "out", cfg, params)
    cfg2, params2 = dconv.load_dit(tmp_path / "out")
    assert cfg2 == cfg
    tree_equal(params2, params)
    from diffusers import DiTTransformer2DModel

    want, got = model.state_dict(), DiTTransformer2DModel.from_pretrained(tmp_path / "out").state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    dconv.save_dit(tmp_path / "fp16", cfg, params, dtype="float16")
    _, half = dconv.load_dit(tmp_path / "fp16")  # falls back to the fp16 variant
    halved = {k: np.asarray(v).astype(np.float16).astype(np.float32) for k, v in flatten(params).items()}
    tree_equal(half, dconv.unflatten(halved))


def test_pipeline_folder_and_legacy_transformer2d_config(torch_case, tmp_path):
    _, path = torch_case
    shutil.copytree(path, tmp_path / "transformer")
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    # facebook/DiT-XL-2-256 was saved as a Transformer2DModel, with that class's extra keys
    config.update(_class_name="Transformer2DModel", cross_attention_dim=None, num_vector_embeds=None,
                  only_cross_attention=False, use_linear_projection=False, double_self_attention=False)
    del config["norm_eps"]
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    cfg, params = dconv.load_dit(tmp_path)
    ref_cfg, ref_params = dconv.load_dit(path)
    assert cfg == ref_cfg
    tree_equal(params, ref_params)
    with pytest.raises(ConfigError, match="cross_attention_dim=768 is not supported"):
        dconv.dit_config_from_diffusers({**config, "cross_attention_dim": 768})
    with pytest.raises(ConfigError, match="unknown key 'caption_projection_dim'"):
        dconv.dit_config_from_diffusers({**config, "caption_projection_dim": 8})


def test_diverging_embedding_copies_are_refused_or_replaced(torch_case):
    model, path = torch_case
    cfg, params = dconv.load_dit(path)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
    sd[key] = sd[key] + 0.5
    with pytest.raises(ConversionError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder\.linear_2\.bias "
                                              r"differs from transformer_blocks\.0.*\(max \|diff\| 0\.5\)"):
        dconv.dit_params_from_state_dict(sd, cfg)
    with pytest.warns(UserWarning, match="using block 0's copy"):
        tree_equal(dconv.dit_params_from_state_dict(sd, cfg, strict_embeddings=False), params)
    del sd["proj_out_1.bias"]
    with pytest.raises(ConversionError, match="missing 1: proj_out_1.bias"):
        dconv.dit_params_from_state_dict(sd, cfg)


@pytest.mark.parametrize(
    "overrides,why",
    [
        (dict(num_classes=None), "num_classes is None"),
        (dict(cross_attention_dim=16), "text conditioning"),
        (dict(positions="learned"), "positions='learned'"),
        (dict(mlp_ratio=2.0, freq_shift=0.0), "mlp_ratio=2.0 .*; freq_shift=0.0"),
    ],
)
def test_export_refuses_what_diffusers_cannot_hold(overrides, why, tmp_path):
    cfg = D.tiny_dit(num_classes=10).replace(**overrides)
    with pytest.raises(ConfigError, match=f"cannot export this DiT to diffusers: {why}") as err:
        dconv.save_dit(tmp_path, cfg, {})
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())
