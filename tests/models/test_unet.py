"""U-Net: parity with diffusers' UNet2DConditionModel (torch 2.13 CPU), SD parameter counts, bf16, remat."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax import models
from ldm_jax.convert import diffusers as dconv
from ldm_jax.types import ConfigError

SD1_LIKE = dict(  # conv projections, the same head count at every level
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=24,
    norm_num_groups=8,
)
SD2_LIKE = dict(  # linear projections, per-level heads, 2 transformer layers, class labels, 9 input channels
    in_channels=9,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    num_class_embeds=5,
    cross_attention_dim=16,
    norm_num_groups=8,
)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_torch_unet(seed: int, **kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(sample_size=8, out_channels=4, **kw).eval()
    with torch.no_grad():  # move every weight off its default (norms at 1/0, ...) so each one matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def torch_forward(model, x, t, ctx, y=None):
    with torch.no_grad():
        out = model(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(t),
            torch.from_numpy(ctx),
            class_labels=None if y is None else torch.from_numpy(y),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def inputs(cfg, batch, h, w, seed=0, y=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, h, w, cfg.in_channels)).astype(np.float32)
    t = np.array([3.0, 999.0, 421.5][:batch], np.float32)
    ctx = rng.normal(size=(batch, 7, cfg.cross_attention_dim)).astype(np.float32)
    labels = np.arange(batch, dtype=np.int64) + 2 if y else None
    return x, t, ctx, labels


@pytest.fixture(scope="module")
def apply_fn():
    # One jitted apply per (config, dtype): configs are hashable static arguments.
    return jax.jit(
        lambda cfg, dtype, p, *a: models.UNet(cfg, dtype=dtype).apply({"params": p}, *a), static_argnums=(0, 1)
    )


def _load_case(name, kw, tmp_path_factory):
    model = make_torch_unet(0, **kw)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    cfg, params = dconv.load_unet(path)
    return name, model, cfg, params


@pytest.fixture(scope="module")
def sd1_case(tmp_path_factory):
    return _load_case("sd1_like", SD1_LIKE, tmp_path_factory)


@pytest.fixture(scope="module")
def sd2_case(tmp_path_factory):
    return _load_case("sd2_like", SD2_LIKE, tmp_path_factory)


@pytest.fixture(params=["sd1_case", "sd2_case"])
def case(request):
    return request.getfixturevalue(request.param)


def test_loaded_config(case):
    name, _, cfg, _ = case
    if name == "sd1_like":
        assert cfg.attention_levels == (True, False) and cfg.heads_per_level() == (2, 2)
        assert not cfg.use_linear_projection and cfg.in_channels == 4 and cfg.num_class_embeds is None
    else:
        assert cfg.heads_per_level() == (2, 4) and cfg.transformer_layers() == (1, 2)
        assert cfg.use_linear_projection and cfg.in_channels == 9 and cfg.num_class_embeds == 5


def test_forward_matches_diffusers(case, apply_fn):
    name, model, cfg, params = case
    # SD2-like: odd, non-square input, so the up path must upsample to the skip sizes (7x10 -> 4x5 -> 7x10).
    x, t, ctx, y = inputs(cfg, 2, 8, 8) if name == "sd1_like" else inputs(cfg, 3, 7, 10, y=True)
    ours = apply_fn(cfg, None, params, x, t, ctx, None if y is None else y.astype(np.int32))
    want = torch_forward(model, x, t, ctx, y)
    assert ours.shape == want.shape
    assert rel_err(ours, want) < 1e-4


def test_bf16_forward_close_to_float32(sd2_case, apply_fn):
    """bfloat16 compute with float32 parameters (the SD2-like case has every block type): relative RMS
    error below 2% of the float32 output."""
    _, _, cfg, params = sd2_case
    x, t, ctx, y = inputs(cfg, 2, 8, 8, y=True)
    y = y.astype(np.int32)
    full = np.asarray(apply_fn(cfg, None, params, x, t, ctx, y))
    half = apply_fn(cfg, "bfloat16", params, x, t, ctx, y)
    assert half.dtype == jnp.bfloat16
    rms = np.sqrt(np.mean((np.asarray(half, np.float32) - full) ** 2) / np.mean(full**2))
    assert rms < 2e-2, rms


@pytest.mark.parametrize(
    "preset,count",
    [(models.sd15_unet, 859_520_964), (models.sd21_unet, 865_910_724)],
)
def test_stable_diffusion_parameter_counts(preset, count):
    assert models.count_params(models.unet_param_shapes(preset())) == count


def test_preset_architectures():
    assert models.sd21_unet().heads_per_level() == (5, 10, 20, 20)
    assert models.sd15_unet().heads_per_level() == (8, 8, 8, 8)
    assert models.sd15_inpaint_unet().in_channels == 9 and models.sd15_inpaint_unet().out_channels == 4


def test_init_is_boxed_with_logical_axes_and_zero_initialised_outputs():
    cfg = models.tiny_unet()
    init = lambda: models.init_unet(cfg, jax.random.key(0))
    specs = nn.get_partition_spec(jax.eval_shape(init))
    assert tuple(specs["conv_in"]["kernel"]) == (None, None, "conv_in", "conv_out")
    attn = specs["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn2"]
    assert tuple(attn["to_q"]["kernel"]) == ("embed", "heads")
    assert tuple(attn["to_out_0"]["kernel"]) == ("heads", "embed")
    # zero_init (LDM zero_module): the layers writing into every residual stream and conv_out start at 0,
    # so a fresh network predicts exactly 0. Only these leaves are returned: XLA drops the other initialisers.
    picks = lambda p: (
        p["conv_out"],
        p["up_blocks_0"]["resnets_0"]["conv2"],
        p["down_blocks_1"]["attentions_0"]["proj_out"],
        p["down_blocks_0"]["resnets_0"]["conv1"]["kernel"],
    )
    conv_out, conv2, proj_out, conv1 = jax.jit(lambda: picks(models.unbox(init())))()
    for leaf in jax.tree_util.tree_leaves((conv_out, conv2, proj_out)):
        assert not np.any(np.asarray(leaf))
    assert 0.5 < float(np.std(conv1)) * np.sqrt(3 * 3 * 32) < 1.5  # lecun-normal elsewhere


def test_remat_wraps_every_block():
    # the U-Net passes remat down to every residual block and transformer layer:
    # down 1 + (1 + 1), mid 1 + 1 + 1, up (2 + 2) + 2 = 12 checkpointed calls
    for remat, count in ((False, 0), (True, 12)):
        cfg = models.tiny_unet(remat=remat)
        example = models.unet_example_inputs(cfg)
        abstract = models.unbox(jax.eval_shape(lambda cfg=cfg: models.init_unet(cfg, jax.random.key(0))))
        loss = lambda p, cfg=cfg, example=example: jnp.sum(models.UNet(cfg).apply({"params": p}, *example))
        jaxpr = str(jax.make_jaxpr(loss)(abstract))
        assert len(re.findall(r"\b(?:remat\w*|checkpoint)\[", jaxpr)) == count


def test_bad_inputs_give_one_line_errors():
    cfg = models.tiny_unet()
    unet = models.UNet(cfg)
    x, t, ctx, _ = models.unet_example_inputs(cfg)
    with pytest.raises(ValueError, match=r"expected \(B, H, W, 4\) NHWC"):
        jax.eval_shape(lambda: unet.init(jax.random.key(0), x.transpose(0, 3, 1, 2), t, ctx))
    with pytest.raises(ValueError, match="context has shape"):
        jax.eval_shape(lambda: unet.init(jax.random.key(0), x, t, ctx[..., :5]))
    with pytest.raises(ValueError, match="drop y"):
        jax.eval_shape(lambda: unet.init(jax.random.key(0), x, t, ctx, jnp.zeros((1,), jnp.int32)))
    with pytest.raises(ConfigError, match="attention_levels has 1 entries for 2 levels"):
        models.tiny_unet(attention_levels=(True,))
    with pytest.raises(ConfigError, match="did you mean 'num_heads'"):
        models.UNetConfig.from_config({"num_head": 4})
