"""DiT: shapes over sizes and conditioning modes, adaLN-Zero init, remat, FSDP specs, DiT-XL/2's size."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax.models import dit as D
from ldm_jax.models.layers import count_params
from ldm_jax.models.weights import unflatten
from ldm_jax.training import sharding as shd
from ldm_jax.types import ConfigError

CASES = {  # name -> tiny_dit overrides
    "class": dict(num_classes=10),
    "cross": dict(cross_attention_dim=12),
    "concat_learned": dict(cross_attention_dim=12, text_conditioning="concat", positions="learned"),
    "class_cross_unpooled": dict(num_classes=3, cross_attention_dim=12, pooled_text=False, out_channels=8),
}


def inputs(cfg, batch=2, h=8, w=8, seq_len=5, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, h, w, cfg.in_channels)), jnp.float32)
    t = jnp.asarray(np.resize([3.0, 999.0, 421.5], batch), jnp.float32)
    ctx = None
    if cfg.cross_attention_dim is not None:
        ctx = jnp.asarray(rng.normal(size=(batch, seq_len, cfg.cross_attention_dim)), jnp.float32)
    y = None if cfg.num_classes is None else jnp.arange(batch, dtype=jnp.int32) % (cfg.num_classes + 1)
    return x, t, ctx, y


def random_params(cfg, seed=0):
    """Random parameters drawn in numpy from the abstract shapes (no init compile): kernels ~ N(0, 1 / fan_in),
    everything else (biases, norms, tables, modulation) ~ N(0, 0.1^2), so every layer matters."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in D.dit_param_shapes(cfg).items():
        std = 1 / np.sqrt(np.prod(shape[:-1])) if name.endswith("kernel") else 0.1
        flat[name] = jnp.asarray(rng.normal(size=shape) * std, jnp.float32)
    return unflatten(flat)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("size", [(8, 8), (12, 12), (8, 12), (4, 6)])
def test_output_shapes(name, size):
    cfg = D.tiny_dit(**CASES[name])
    if cfg.positions == "learned" and size != (8, 8):
        with pytest.raises(ValueError, match="learned positions exist for the trained 8x8 input only"):
            jax.eval_shape(lambda: D.DiT(cfg).init(jax.random.key(0), *inputs(cfg, 2, *size)))
        return
    out = jax.eval_shape(lambda: D.DiT(cfg).init_with_output(jax.random.key(0), *inputs(cfg, 2, *size))[0])
    assert out.shape == (2, *size, cfg.out_channels) and out.dtype == jnp.float32


def test_parameter_sets_follow_the_conditioning():
    names = {k: set(D.dit_param_shapes(D.tiny_dit(**kw))) for k, kw in CASES.items()}
    block = "transformer_blocks_0/"
    assert "class_embedder/embedding" in names["class"] and block + "attn2/to_k/kernel" not in names["class"]
    assert {block + "attn2/to_k/kernel", block + "norm2/scale", "pooled_text_embedder/kernel"} <= names["cross"]
    assert "context_embedder/kernel" in names["concat_learned"] and "pos_embed/positions" in names["concat_learned"]
    assert block + "attn2/to_k/kernel" not in names["concat_learned"]
    assert "pooled_text_embedder/kernel" not in names["class_cross_unpooled"]
    shapes = D.dit_param_shapes(D.tiny_dit(**CASES["class_cross_unpooled"]))
    assert shapes["class_embedder/embedding"] == (4, 64)  # num_classes + 1 rows: the last is the null label
    assert shapes[block + "attn2/to_k/kernel"] == (12, 64)
    assert shapes["proj_out_2/kernel"] == (64, 2 * 2 * 8)


@pytest.fixture(scope="module")
def apply_fn():
    return jax.jit(lambda cfg, p, x, t, ctx, y: D.DiT(cfg).apply({"params": p}, x, t, ctx, y), static_argnums=0)


def test_class_and_text_conditioning_change_the_output(apply_fn):
    cfg = D.tiny_dit(**CASES["class_cross_unpooled"])
    p = random_params(cfg)
    x, t, ctx, y = inputs(cfg)
    base = np.asarray(apply_fn(cfg, p, x, t, ctx, y))
    assert np.all(np.isfinite(base)) and np.std(base) > 1e-3
    other_label = np.asarray(apply_fn(cfg, p, x, t, ctx, y + 1))
    other_text = np.asarray(apply_fn(cfg, p, x, t, ctx[:, ::-1] * 2, y))
    other_time = np.asarray(apply_fn(cfg, p, x, t + 50, ctx, y))
    for changed in (other_label, other_text, other_time):
        assert np.max(np.abs(changed - base)) > 1e-4
    # each image depends on its own conditioning only
    single = np.asarray(apply_fn(cfg, p, x[:1], t[:1], ctx[:1], y[:1]))
    np.testing.assert_allclose(single, base[:1], rtol=1e-5, atol=1e-5)


def test_bfloat16_close_to_float32(apply_fn):
    """bfloat16 compute with float32 parameters: relative RMS error below 2% of the float32 output."""
    cfg = D.tiny_dit(**CASES["class_cross_unpooled"])
    p = random_params(cfg)
    full = np.asarray(apply_fn(cfg, p, *inputs(cfg)))
    half = apply_fn(cfg.replace(dtype="bfloat16"), p, *inputs(cfg))
    assert half.dtype == jnp.bfloat16
    assert np.sqrt(np.mean((np.asarray(half, np.float32) - full) ** 2) / np.mean(full**2)) < 2e-2


def test_concat_text_tokens_are_dropped_before_the_output(apply_fn):
    cfg = D.tiny_dit(**CASES["concat_learned"])
    p = random_params(cfg)
    x, t, ctx, y = inputs(cfg, seq_len=3)
    out = np.asarray(apply_fn(cfg, p, x, t, ctx, y))
    assert out.shape == x.shape
    longer = np.asarray(apply_fn(cfg, p, x, t, jnp.concatenate([ctx, ctx[:, :2] + 1], axis=1), y))
    assert np.max(np.abs(longer - out)) > 1e-4  # the text tokens take part in self-attention


def test_remat_gives_the_same_output_and_gradients():
    base = D.tiny_dit(**CASES["cross"], zero_init=False)
    p = random_params(base)
    x, t, ctx, _ = inputs(base)

    def loss(cfg, p):
        return jnp.mean(jnp.square(D.DiT(cfg).apply({"params": p}, x, t, ctx)))

    remat = base.replace(remat=True)
    jaxpr = str(jax.make_jaxpr(lambda p: loss(remat, p))(p))
    assert len(re.findall(r"\b(?:remat\w*|checkpoint)\[", jaxpr)) == remat.depth  # one per block
    (v0, g0), (v1, g1) = (jax.jit(jax.value_and_grad(lambda p, cfg=cfg: loss(cfg, p)))(p) for cfg in (base, remat))
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
    assert float(jnp.max(jnp.abs(g0["transformer_blocks_1"]["attn2"]["to_k"]["kernel"]))) > 0


def test_every_parameter_has_logical_axes_and_fsdp_shards_them_and_adaln_zero_predicts_zero():
    cfg = D.tiny_dit(**CASES["class_cross_unpooled"])
    specs = nn.get_partition_spec(jax.eval_shape(lambda: D.init_dit(cfg, jax.random.key(0))))
    flat = {"/".join(str(k.key) for k in path): spec
            for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda s: isinstance(s, P))}
    assert set(flat) == set(D.dit_param_shapes(cfg))
    for name, spec in flat.items():
        assert len(spec) > 0 and any(a is not None for a in spec), name
        if name.endswith(("kernel", "embedding")):
            assert any(a in ("embed", "conv_out") for a in spec), (name, spec)
    block = specs["transformer_blocks_0"]
    assert tuple(block["attn1"]["to_q"]["kernel"]) == ("embed", "heads")
    assert tuple(block["norm1"]["linear"]["kernel"]) == ("embed", "mlp")
    assert tuple(block["ff"]["net_2"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["pos_embed"]["proj"]["kernel"]) == (None, None, "conv_in", "conv_out")

    mesh = shd.make_mesh({"data": 4, "fsdp": 2})
    params, _ = shd.create_sharded(lambda k: D.init_dit(cfg, k), mesh, shd.DEFAULT_RULES, jax.random.key(0))
    assert params["transformer_blocks_0"]["attn1"]["to_q"]["kernel"].sharding.spec == P("fsdp")
    assert params["class_embedder"]["embedding"].sharding.spec == P(None, "fsdp")
    x, t, ctx, y = inputs(cfg, batch=8)
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        out = jax.jit(lambda p, *a: D.DiT(cfg).apply({"params": p}, *a))(params, x, t, ctx, y)
    assert out.shape == x.shape[:3] + (cfg.out_channels,)
    # adaLN-Zero: every modulation and the final projection start at 0, so a fresh network predicts exactly 0
    assert not np.any(np.asarray(out))
    for leaf in jax.tree_util.tree_leaves((params["proj_out_1"], params["proj_out_2"],
                                           params["transformer_blocks_1"]["norm1"])):
        assert not np.any(np.asarray(leaf))
    assert np.std(np.asarray(params["transformer_blocks_0"]["attn1"]["to_q"]["kernel"])) > 0


def test_dit_xl_2_parameter_count_matches_diffusers():
    """diffusers' DiT-XL/2 keeps a copy of the time/label embedding in each of its 28 blocks; ours shares one.
    The published 675,129,632 also counts the fixed sincos table (a frozen nn.Parameter in the DiT code)."""
    import torch
    from diffusers import DiTTransformer2DModel

    cfg = D.dit_xl_2()
    with torch.device("meta"):
        ref = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                    num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    total = sum(p.numel() for p in ref.parameters())
    per_copy = sum(p.numel() for p in ref.transformer_blocks[0].norm1.emb.parameters())
    ours = count_params(D.dit_param_shapes(cfg))
    assert ours == total - 27 * per_copy == 674_834_720
    assert count_params(D.dit_param_shapes(D.dit_xl_2(positions="learned"))) == 675_129_632
    assert ref.pos_embed.pos_embed.numel() == 675_129_632 - ours


def test_sincos_positions_at_the_base_grid_are_the_patch_indices():
    pos = np.asarray(D.dit_positions(D.tiny_dit(hidden_size=8, num_heads=2, sample_size=4), (2, 3)))
    # token (i, j) = 3 i + j; the first half encodes the column, the second the row, each as
    # [sin(u), sin(u / 100), cos(u), cos(u / 100)] (dim 8: frequencies 1e4^(-k/2), k = 0, 1)
    feats = lambda u: [np.sin(u), np.sin(u / 100), np.cos(u), np.cos(u / 100)]
    col, row = pos[:, :4], pos[:, 4:]
    np.testing.assert_allclose(row[4], feats(1.0), rtol=1e-6)  # 2 rows = the base grid: integer coordinates
    np.testing.assert_allclose(col[4], feats(2 / 3), rtol=1e-6)  # 3 columns span the base's 2: j * 2 / 3
    np.testing.assert_allclose(col[5], feats(4 / 3), rtol=1e-6)


def test_bad_configs_and_inputs_give_one_line_errors():
    with pytest.raises(ConfigError, match="not divisible by 3 heads"):
        D.tiny_dit(num_heads=3)
    with pytest.raises(ConfigError, match="text_conditioning='prefix'"):
        D.tiny_dit(text_conditioning="prefix")
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        D.DiTConfig.from_config({"hidden": 64})
    cfg = D.tiny_dit(num_classes=4)
    x, t, _, y = inputs(cfg)
    init = lambda *a: jax.eval_shape(lambda: D.DiT(cfg).init(jax.random.key(0), *a))
    with pytest.raises(ValueError, match="not a multiple of patch_size=2"):
        init(x[:, :7], t, None, y)
    with pytest.raises(ValueError, match="pass y="):
        init(x, t, None, None)
    with pytest.raises(ValueError, match="drop context"):
        init(x, t, jnp.zeros((2, 3, 5)), y)
    with pytest.raises(ValueError, match=r"expected \(B, H, W, 4\) NHWC"):
        init(x.transpose(0, 3, 1, 2), t, None, y)
