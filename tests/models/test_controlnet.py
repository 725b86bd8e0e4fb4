"""ControlNet: parity with diffusers' ControlNetModel (plain and guess mode), the U-Net's residual inputs against
UNet2DConditionModel's, the converter round trip, ``from_unet`` and strictness."""

import jax
import numpy as np
import pytest
import torch

from ldm_jax import models
from ldm_jax.convert import controlnet as cconv
from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert.common import ConversionError
from ldm_jax.models.controlnet import scale_residuals
from ldm_jax.models.unet import num_skips
from ldm_jax.types import ConfigError
from tests.convert.test_diffusers import perturbed, tree_equal
from tests.models.test_unet import make_torch_unet, rel_err

ENCODER_KW = dict(  # SD1-like: conv projections, attention at the first level only
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=32,
    norm_num_groups=8,
)
CONTROLNET_KW = {**ENCODER_KW, "conditioning_embedding_out_channels": (8, 16)}  # control image = 2x latents
UNET_KW = {**ENCODER_KW, "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A random diffusers ControlNet (zero convs included: `perturbed` moves every weight), saved and loaded."""
    from diffusers import ControlNetModel

    model = perturbed(ControlNetModel(**CONTROLNET_KW))
    path = tmp_path_factory.mktemp("controlnet")
    model.save_pretrained(path)
    cfg, params = cconv.load_controlnet(path)
    return model, path, cfg, params


@pytest.fixture(scope="module")
def unet_case(tmp_path_factory):
    model = make_torch_unet(0, **UNET_KW)
    path = tmp_path_factory.mktemp("unet")
    model.save_pretrained(path)
    return (model, *dconv.load_unet(path))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    t = np.array([3.0, 801.5], np.float32)
    ctx = rng.normal(size=(2, 7, 32)).astype(np.float32)
    cond = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
    return x, t, ctx, cond


@pytest.fixture(scope="module")
def controlnet_fn():
    """One compiled program per config for both modes (the network is shared; only the scaling differs)."""

    def both_modes(cfg, p, scale, *a):
        net = models.ControlNet(cfg)
        return {g: net.apply({"params": p}, *a, conditioning_scale=scale, guess_mode=g) for g in (False, True)}

    return jax.jit(both_modes, static_argnums=0)


def torch_controlnet(model, x, t, ctx, cond, scale=1.0, guess=False):
    with torch.no_grad():
        down, mid = model(
            nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond),
            conditioning_scale=scale, guess_mode=guess, return_dict=False,
        )
    return [nhwc(d) for d in down], nhwc(mid)


@pytest.mark.parametrize("guess", [False, True], ids=["plain", "guess_mode"])
def test_residuals_match_diffusers(case, batch, controlnet_fn, guess):
    model, _, cfg, params = case
    assert cfg.conditioning_embedding_out_channels == (8, 16) and cfg.downscale == 2
    down, mid = controlnet_fn(cfg, params, 0.7, *batch)[guess]
    want_down, want_mid = torch_controlnet(model, *batch, scale=0.7, guess=guess)
    assert len(down) == len(want_down) == 1 + 2 * 1 + 1
    for k, (ours, want) in enumerate([*zip(down, want_down), (mid, want_mid)]):
        assert ours.shape == want.shape, k
        assert np.abs(want).max() > 1e-3, k  # the zero convs were randomised: a residual that is zero proves nothing
        assert rel_err(ours, want) < 1e-4, k


def test_unet_residual_inputs_match_diffusers(unet_case, case, batch, controlnet_fn):
    model, ucfg, uparams = unet_case
    x, t, ctx, _ = batch
    down, mid = jax.tree.map(np.asarray, controlnet_fn(case[2], case[3], 1.0, *batch)[False])
    apply = jax.jit(lambda p, *a, **kw: models.UNet(ucfg).apply({"params": p}, *a, **kw))
    ours = apply(uparams, x, t, ctx, down_residuals=down, mid_residual=mid)
    with torch.no_grad():
        plain = nhwc(model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
        want = model(
            nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
            down_block_additional_residuals=tuple(nchw(d) for d in down), mid_block_additional_residual=nchw(mid),
        ).sample
    want = nhwc(want)
    assert rel_err(ours, want) < 1e-4
    assert rel_err(plain, want) > 1e-2  # the residuals do change the output
    with pytest.raises(ValueError, match="3 down_residuals for 4 skip connections"):
        models.UNet(ucfg).apply({"params": uparams}, x, t, ctx, down_residuals=down[:3])
    assert num_skips(ucfg) == len(down) == 4


def test_state_dict_round_trip_and_export_to_diffusers(case, batch, tmp_path):
    from diffusers import ControlNetModel

    model, _, cfg, params = case
    sd = cconv.controlnet_state_dict_from_params(params, cfg)
    want = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sd.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(sd[k], want[k], err_msg=k)
    tree_equal(cconv.controlnet_params_from_state_dict(sd, cfg), params)

    cconv.save_controlnet(tmp_path, cfg, params)
    reloaded, info = ControlNetModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    got_down, got_mid = torch_controlnet(reloaded.eval(), *batch, scale=0.7, guess=True)
    want_down, want_mid = torch_controlnet(model, *batch, scale=0.7, guess=True)
    for got, exp in zip([*got_down, got_mid], [*want_down, want_mid]):
        np.testing.assert_array_equal(got, exp)
    assert cconv.load_controlnet(tmp_path)[0] == cfg


def test_from_unet_matches_diffusers_and_starts_as_a_no_op(unet_case, case, batch, controlnet_fn):
    from diffusers import ControlNetModel

    model, ucfg, uparams = unet_case
    torch_cn = ControlNetModel.from_unet(model, conditioning_embedding_out_channels=(8, 16))
    # A ControlNet config has no sample_size (the U-Net's only sizes its examples): the default 64 comes back.
    cfg = models.ControlNetConfig(unet=ucfg.replace(sample_size=64), conditioning_embedding_out_channels=(8, 16))
    assert cconv.controlnet_config_from_diffusers(dict(torch_cn.config)) == cfg == case[2]
    params = models.controlnet_from_unet(uparams, cfg)
    ours = cconv.controlnet_state_dict_from_params(params, cfg)
    want = {k: v.numpy() for k, v in torch_cn.state_dict().items()}
    assert ours.keys() == want.keys()
    copied = [k for k in want if not k.startswith("controlnet_")]
    assert any(k.startswith("mid_block.") for k in copied) and any(k.startswith("down_blocks.1.") for k in copied)
    for k in copied:
        np.testing.assert_array_equal(ours[k], want[k], err_msg=k)
    for down, mid in controlnet_fn(cfg, params, 1.0, *batch).values():
        assert all(not np.any(np.asarray(r)) for r in [*down, mid])
    broken = {**uparams, "conv_in": {"kernel": np.zeros((3, 3, 4, 16), np.float32), "bias": uparams["conv_in"]["bias"]}}
    with pytest.raises(ConversionError, match=r"conv_in/kernel: expected \(3, 3, 4, 32\)"):
        models.controlnet_from_unet(broken, cfg)


def test_bad_state_dict_and_config(case):
    model, path, cfg, params = case
    sd = cconv.controlnet_state_dict_from_params(params, cfg)
    with pytest.raises(ConversionError, match=r"unexpected 1: controlnet_down_blocks\.9\.weight"):
        cconv.controlnet_params_from_state_dict({**sd, "controlnet_down_blocks.9.weight": sd["conv_in.weight"]}, cfg)
    del sd["controlnet_cond_embedding.blocks.1.bias"]
    with pytest.raises(ConversionError, match=r"missing 1: controlnet_cond_embedding\.blocks\.1\.bias"):
        cconv.controlnet_params_from_state_dict(sd, cfg)
    base = dict(model.config)
    with pytest.raises(ConfigError, match="controlnet_conditioning_channel_order='bgr'"):
        cconv.controlnet_config_from_diffusers({**base, "controlnet_conditioning_channel_order": "bgr"})
    with pytest.raises(ConfigError, match="diffusers ControlNet config: unknown key 'not_a_key'"):
        cconv.controlnet_config_from_diffusers({**base, "not_a_key": 1})
    assert models.ControlNetConfig.from_config(cfg.to_dict()) == cfg


def test_sdxl_style_controlnet_converts():
    """text_time added embedding, linear projections, per-level transformer depth, pooled conditions: the
    strict converter accepts diffusers' weights, so every name and shape agrees."""
    from diffusers import ControlNetModel

    kw = {**CONTROLNET_KW, "use_linear_projection": True, "transformer_layers_per_block": (1, 2),
          "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
          "projection_class_embeddings_input_dim": 8 + 6 * 4, "global_pool_conditions": True}
    model = ControlNetModel(**kw)
    cfg = cconv.controlnet_config_from_diffusers(dict(model.config))
    assert cfg.global_pool_conditions and cfg.unet.addition_embed_type == "text_time"
    assert cfg.unet.transformer_layers() == (1, 2) and cfg.unet.use_linear_projection
    params = cconv.controlnet_params_from_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, cfg)
    assert "add_embedding" in params and "controlnet_mid_block" in params


def test_scaling_rules_and_input_checks(case, batch):
    ones = [np.ones((1, 2, 2, 1), np.float32) * (k + 1) for k in range(4)]
    ramp = torch.logspace(-1, 0, 4).numpy()
    down, mid = scale_residuals(ones[:3], ones[3], 2.0, guess_mode=True, global_pool=False)
    np.testing.assert_allclose([float(r[0, 0, 0, 0]) for r in [*down, mid]], 2.0 * ramp * [1, 2, 3, 4], rtol=1e-6)
    pooled = [np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1)] * 2
    down, mid = scale_residuals(pooled[:1], pooled[1], 0.5, guess_mode=True, global_pool=True)  # no ramp
    assert down[0].shape == mid.shape == (1, 1, 1, 1) and float(mid[0, 0, 0, 0]) == 0.75
    _, _, cfg, params = case
    x, t, ctx, cond = batch
    with pytest.raises(ValueError, match="resize the control image to 32 x 32"):
        models.ControlNet(cfg).apply({"params": params}, x, t, ctx, cond[:, :16, :16])
    with pytest.raises(ValueError, match=r"expected \(2, H, W, 3\) NHWC"):
        models.ControlNet(cfg).apply({"params": params}, x, t, ctx, cond[..., :1])
