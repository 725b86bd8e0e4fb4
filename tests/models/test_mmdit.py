"""MMDiT (SD3 / SD3.5): shapes over sizes, adaLN-Zero init, the pooled=None convention, remat, FSDP axis names,
and the SD3-medium / SD3.5-medium parameter counts against diffusers' SD3Transformer2DModel."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax.models import mmdit as M
from ldm_jax.models.layers import count_params, unbox
from ldm_jax.models.transformer import modulate
from ldm_jax.models.weights import unflatten
from ldm_jax.training import sharding as shd
from ldm_jax.types import ConfigError

SD35_LIKE = dict(qk_norm="rms_norm", dual_attention_layers=(0,))  # tiny: block 0 dual, block 1 text-pre-only


def inputs(cfg, batch=2, h=6, w=10, seq_len=5, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, h, w, cfg.in_channels)), jnp.float32)
    t = jnp.asarray(np.resize([3.0, 871.5, 421.5], batch), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(batch, seq_len, cfg.joint_attention_dim)), jnp.float32)
    pooled = jnp.asarray(rng.normal(size=(batch, cfg.pooled_projection_dim)), jnp.float32)
    return x, t, ctx, pooled


def random_params(cfg, seed=0):
    """Random weights of every parameter (none at zero) drawn in numpy: no init program to compile."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in M.mmdit_param_shapes(cfg).items():
        if name.endswith("kernel"):
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif name.endswith("scale"):
            value = 1.0 + 0.1 * rng.normal(size=shape)
        else:
            value = 0.1 * rng.normal(size=shape)
        flat[name] = jnp.asarray(value, jnp.float32)
    return unflatten(flat)


# one compiled forward per (config, dtype, input shapes), shared by the tests
forward = jax.jit(lambda cfg, dtype, p, *a: M.MMDiT(cfg, dtype=dtype).apply({"params": p}, *a), static_argnums=(0, 1))


@pytest.mark.parametrize(
    "overrides,batch,h,w,seq_len",
    [({}, 2, 2, 2, 1), ({}, 1, 6, 10, 7), (SD35_LIKE, 3, 16, 4, 3), (dict(out_channels=8, patch_size=4), 2, 32, 64, 5)],
)
def test_output_shapes(overrides, batch, h, w, seq_len):
    cfg = M.tiny_mmdit(**overrides)
    args = inputs(cfg, batch, h, w, seq_len)
    out, _ = jax.eval_shape(lambda: M.MMDiT(cfg).init_with_output(jax.random.key(0), *args))
    assert out.shape == (batch, h, w, cfg.out_channels) and out.dtype == jnp.float32


def test_fresh_network_outputs_exactly_zero():
    """adaLN-Zero: every modulation Linear and proj_out start at 0 (so each block starts as the identity and the
    output is 0). Only these leaves and one other kernel come out of the init program: XLA drops the rest."""
    cfg = M.tiny_mmdit(**SD35_LIKE)
    zero_names = ("norm1", "norm1_context")

    def picks(p):
        blocks = [p[f"transformer_blocks_{i}"] for i in range(cfg.num_layers)]
        zeros = {f"transformer_blocks_{i}/{n}": b[n] for i, b in enumerate(blocks) for n in zero_names}
        return {**zeros, "norm_out": p["norm_out"], "proj_out": p["proj_out"]}, blocks[0]["attn"]["to_q"]["kernel"]

    zeros, to_q = jax.jit(lambda k: picks(unbox(M.init_mmdit(cfg, k))))(jax.random.key(0))
    for leaf in jax.tree.leaves(zeros):
        assert not np.any(np.asarray(leaf))
    assert 0.5 < float(np.std(to_q)) * np.sqrt(cfg.hidden) < 1.5  # lecun-normal elsewhere
    params = random_params(cfg)
    for name, value in zeros.items():
        *parents, leaf = name.split("/")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    assert not np.any(np.asarray(forward(cfg, None, params, *inputs(cfg))))


def test_pooled_none_is_the_token_mean_of_context():
    cfg = M.tiny_mmdit(**SD35_LIKE)
    params = random_params(cfg)
    x, t, ctx, _ = inputs(cfg)
    without = np.asarray(jax.jit(lambda p, x, t, c: M.MMDiT(cfg).apply({"params": p}, x, t, c))(params, x, t, ctx))
    mean = jnp.mean(ctx, axis=1)
    np.testing.assert_allclose(without, forward(cfg, None, params, x, t, ctx, mean), rtol=1e-6, atol=1e-6)
    assert np.abs(without - np.asarray(forward(cfg, None, params, x, t, ctx, mean + 3.0))).max() > 1e-3
    wide = M.tiny_mmdit(pooled_projection_dim=24)
    with pytest.raises(ValueError, match="pooled=None takes the token mean"):
        jax.eval_shape(lambda: M.MMDiT(wide).init(jax.random.key(0), x, t, ctx))


def test_remat_gives_the_same_values_and_gradients():
    """remat checkpoints every block (counted in the jaxpr); values and gradients are unchanged. The gradients
    are compared on one block: XLA:CPU spends seconds per block compiling a backward pass."""
    cfg = M.tiny_mmdit()
    params, args = random_params(cfg), inputs(cfg)
    for remat in (False, True):
        loss = lambda p, c=cfg.replace(remat=remat): jnp.sum(M.MMDiT(c).apply({"params": p}, *args))
        jaxpr = str(jax.make_jaxpr(loss)(params))
        assert len(re.findall(r"\b(?:remat\w*|checkpoint)\[", jaxpr)) == (cfg.num_layers if remat else 0)
    cfg = M.tiny_mmdit(num_layers=1)
    params, results = random_params(cfg), []
    for remat in (False, True):
        loss = lambda p, c=cfg.replace(remat=remat): jnp.mean(jnp.square(M.MMDiT(c).apply({"params": p}, *args)))
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
    assert float(jnp.max(jnp.abs(g0["transformer_blocks_0"]["attn"]["add_k_proj"]["kernel"]))) > 0
    # the last block's text queries feed nothing (diffusers discards their attention rows): zero gradient
    assert not np.any(np.asarray(g0["transformer_blocks_0"]["attn"]["add_q_proj"]["kernel"]))


def test_every_parameter_has_logical_axes_and_fsdp_shards_them():
    cfg = M.tiny_mmdit(**SD35_LIKE)
    init = lambda k: M.init_mmdit(cfg, k)
    specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0)))
    flat = {"/".join(str(k.key) for k in path): spec
            for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda s: isinstance(s, P))}
    shapes = M.mmdit_param_shapes(cfg)
    assert set(flat) == set(shapes)
    for name, spec in flat.items():
        assert len(spec) == len(shapes[name]) and any(a is not None for a in spec), (name, spec)
        if name.endswith("kernel"):
            assert any(a in ("embed", "conv_out") for a in spec), (name, spec)
    block = specs["transformer_blocks_0"]
    assert tuple(block["attn"]["add_q_proj"]["kernel"]) == ("embed", "heads")
    assert tuple(block["attn"]["to_add_out"]["kernel"]) == ("heads", "embed")
    assert tuple(block["attn"]["norm_q"]["scale"]) == ("norm",)
    assert tuple(block["norm1"]["linear"]["kernel"]) == ("embed", "mlp")
    assert tuple(block["ff_context"]["net_2"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["pos_embed"]["proj"]["kernel"]) == (None, None, "conv_in", "conv_out")

    mesh = shd.make_mesh({"data": 4, "fsdp": 2})
    _, shardings = shd.sharded_abstract(init, mesh, shd.DEFAULT_RULES, jax.random.key(0))
    params = jax.device_put(random_params(cfg), shardings)
    assert params["transformer_blocks_0"]["attn"]["to_q"]["kernel"].sharding.spec == P("fsdp")
    assert params["context_embedder"]["kernel"].sharding.spec == P(None, "fsdp")
    args = inputs(cfg, batch=8)
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        out = forward(cfg, None, params, *args)
    assert out.shape == (8, 6, 10, cfg.out_channels)


@pytest.mark.parametrize(
    "preset,count,kw",
    [
        (M.sd3_medium, 2_028_328_000, dict(pos_embed_max_size=192)),
        (M.sd35_medium, 2_243_171_520,
         dict(pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    ],
    ids=["sd3_medium", "sd35_medium"],
)
def test_parameter_counts_match_diffusers(preset, count, kw):
    """The counts exclude diffusers' fixed position buffer (192^2 or 384^2 x 1536), which is not a parameter."""
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        ref = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                    caption_projection_dim=1536, pooled_projection_dim=2048, **kw)
    assert count_params(M.mmdit_param_shapes(preset())) == sum(p.numel() for p in ref.parameters()) == count


def test_positions_are_the_centred_crop_of_the_table():
    cfg = M.tiny_mmdit(pos_embed_max_size=7)
    table = M.pos_embed_table(cfg).reshape(7, 7, cfg.hidden)
    np.testing.assert_array_equal(np.asarray(M.cropped_positions(cfg, 3, 4)), table[2:5, 1:5].reshape(12, -1))
    # the first half encodes the column, the second the row; grid spacing base / max = 4 / 7
    col, row = table[0, 3, : cfg.hidden // 2], table[3, 0, cfg.hidden // 2 :]
    np.testing.assert_allclose(col, row)
    np.testing.assert_allclose(col[0], np.sin(3 * 4 / 7), rtol=1e-6)
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size=7"):
        M.cropped_positions(cfg, 8, 2)


def test_modulate_dtype_rule():
    # bfloat16 keeps 8 significant bits: 1 + 2^-9 rounds to 1, so (1 + 2^-9)(1 + 2^-9) - 1 survives only in float32
    x = jnp.full((1, 1, 1), 1 + 2.0**-9, jnp.float32)
    scale, shift = jnp.full((1, 1), 2.0**-9, jnp.bfloat16), jnp.full((1, 1), -1.0, jnp.bfloat16)
    mmdit = modulate(x, shift, scale, jnp.bfloat16)  # float32 arithmetic, one rounding at the end
    dit = modulate(x.astype(jnp.bfloat16), shift, scale)  # everything in x's dtype
    assert mmdit.dtype == dit.dtype == jnp.bfloat16
    assert float(mmdit[0, 0, 0]) == float(jnp.bfloat16(2.0**-8 + 2.0**-18)) and float(dit[0, 0, 0]) == 0.0


def test_bad_configs_and_inputs_give_one_line_errors():
    with pytest.raises(ConfigError, match="caption_projection_dim=12 must equal"):
        M.tiny_mmdit(caption_projection_dim=12)
    with pytest.raises(ConfigError, match="qk_norm='layer_norm'"):
        M.tiny_mmdit(qk_norm="layer_norm")
    with pytest.raises(ConfigError, match=r"dual_attention_layers=\(3,\)"):
        M.tiny_mmdit(dual_attention_layers=(3,))
    with pytest.raises(ConfigError, match="did you mean 'num_heads'"):
        M.MMDiTConfig.from_config({"num_head": 4})
    assert M.MMDiTConfig.from_config({"dual_attention_layers": [0, 1]}).dual_attention_layers == (0, 1)
    cfg = M.tiny_mmdit()
    x, t, ctx, pooled = inputs(cfg)
    init = lambda *a: jax.eval_shape(lambda: M.MMDiT(cfg).init(jax.random.key(0), *a))
    with pytest.raises(ValueError, match="not a multiple of patch_size=2"):
        init(x[:, :5], t, ctx, pooled)
    with pytest.raises(ValueError, match=r"expected \(B, H, W, 4\) NHWC"):
        init(x.transpose(0, 3, 1, 2), t, ctx, pooled)
    with pytest.raises(ValueError, match="context has shape"):
        init(x, t, ctx[..., :5], pooled)
    with pytest.raises(ValueError, match="pooled has shape"):
        init(x, t, ctx, pooled[:, :3])
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size"):
        init(jnp.zeros((1, 34, 2, 4)), t[:1], ctx[:1], pooled[:1])
