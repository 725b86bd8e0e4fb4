"""The typed config sections of the model layer: every choice of the diffusion core reachable from a run config,
one-line errors before any step, EDM preconditioning in the one denoiser wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion
from ldm_jax.configlib import base_config
from ldm_jax.ldm import build
from ldm_jax.ldm.generate import UNetDenoiser
from ldm_jax.models import UNet, presets, unbox
from ldm_jax.types import ConfigError


def _cfg(**fields) -> build.DiffusionConfig:
    section = base_config().diffusion.to_dict()
    section.update(fields)
    return build.DiffusionConfig.from_config(section)


@pytest.mark.parametrize("weighting, options", [
    ("uniform", {}), ("snr", {}), ("x0", {}), ("v", {}), ("truncated_snr", {}), ("min_snr", {"gamma": 2.0}),
    ("p2", {"k": 2.0, "gamma": 0.5}), ("edm", {"sigma_data": 0.7}), ("sigmoid", {"bias": -1.0}), ("elbo", {}),
])
def test_every_weighting_and_its_constants_reach_the_loss(weighting, options):
    cfg = _cfg(weighting=weighting, weighting_options=options, prediction="v")
    schedule = cfg.make_schedule()
    cfg.check(schedule)
    t = jnp.linspace(0.1, 0.9, 5)
    got = diffusion.loss_weight(t, schedule=schedule, prediction="v", **cfg.loss_options())
    want = diffusion.loss_weight(t, schedule=schedule, prediction="v", weighting=weighting, **options)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_min_snr_gamma_field_and_option():
    assert _cfg(weighting="min_snr", min_snr_gamma=3.0).loss_options() == {"weighting": "min_snr", "gamma": 3.0}
    assert _cfg(weighting="min_snr", weighting_options={"gamma": 1.0}).loss_options()["gamma"] == 1.0


@pytest.mark.parametrize("name, options", [
    ("uniform", {"t_min": 0.2, "t_max": 0.4}), ("logit_normal", {"mean": 0.5, "std": 0.1}),
    ("lognormal_sigma", {"p_mean": -1.0, "p_std": 0.5}), ("low_discrepancy", {}),
])
def test_every_noise_sampler_and_its_options(name, options):
    cfg = _cfg(noise_sampling=name, noise_sampling_options=options, schedule="edm")
    schedule = cfg.make_schedule()
    cfg.check(schedule)
    t = diffusion.sample_t(name, jax.random.key(0), 256, schedule=schedule, **dict(cfg.noise_sampling_options))
    assert t.shape == (256,) and bool(jnp.all((t >= 0) & (t <= 1)))
    if name == "uniform":
        assert 0.2 <= float(t.min()) and float(t.max()) <= 0.4


def test_schedule_options_and_bounds():
    s = _cfg(schedule="sigmoid", schedule_options={"start": 0.0, "end": 3.0, "tau": 0.5}).make_schedule()
    ref = diffusion.get_schedule("sigmoid", start=0.0, end=3.0, tau=0.5)
    t = jnp.linspace(0.05, 0.95, 7)
    np.testing.assert_array_equal(np.asarray(s.logsnr(t)), np.asarray(ref.logsnr(t)))
    truncated = _cfg(schedule="cosine", logsnr_min=-10.0).make_schedule()
    assert float(truncated.logsnr(1.0)) == pytest.approx(-10.0, abs=1e-4)


@pytest.mark.parametrize("fields, match", [
    (dict(precondition="edm", prediction="eps"), "set diffusion.prediction='x0'"),
    (dict(schedule="learned"), "set diffusion.weighting=.elbo."),  # trained by loss variance: ELBO only
    (dict(weighting="p3"), "did you mean 'p2'"),
    (dict(noise_sampling="logit_norm"), "did you mean 'logit_normal'"),
    (dict(precondition="karras"), "unknown diffusion.precondition"),
    (dict(sigma_data=0.0), "sigma_data must be > 0"),
    (dict(shfit=2.0), "unknown field 'shfit'.*'shift'"),
])
def test_bad_sections_are_one_line(fields, match):
    with pytest.raises(ConfigError, match=match) as err:
        _cfg(**fields)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fields, match", [
    (dict(weighting="p2", weighting_options={"kk": 1.0}), "weighting 'p2' takes"),
    (dict(noise_sampling="logit_normal", noise_sampling_options={"sd": 1.0}), "has no option 'sd'"),
])
def test_wrong_options_fail_at_the_check(fields, match):
    cfg = _cfg(**fields)
    with pytest.raises(ConfigError, match=match):
        cfg.check(cfg.make_schedule())


def test_edm_preconditioning_in_the_denoiser():
    """x0 = c_skip x~ + c_out F(c_in x~, ln(sigma) / 4) with x~ = x / alpha (Karras et al. 2022, Table 1)."""
    cfg = presets.tiny_unet(cross_attention_dim=8, in_channels=4, out_channels=4, zero_init=False)
    unet = UNet(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 3, 8))
    params = unbox(unet.init(jax.random.key(2), x, jnp.zeros((2,)), ctx)["params"])
    schedule = diffusion.get_schedule("edm")
    t = jnp.array([0.2, 0.7])
    got = UNetDenoiser(params, schedule, unet, "edm", 0.5)(x, t, ctx)
    logsnr = schedule.logsnr(t)
    alpha, sigma = jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.exp(-0.5 * logsnr)
    c_skip, c_out, c_in, c_noise = diffusion.edm_coefficients(sigma, 0.5)
    e = lambda a: a[:, None, None, None]  # noqa: E731
    x_edm = x / e(alpha)
    want = e(c_skip) * x_edm + e(c_out) * unet.apply({"params": params}, e(c_in) * x_edm, c_noise, ctx)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    plain = UNetDenoiser(params, schedule, unet)(x, t, ctx)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(unet.apply({"params": params}, x, schedule.timestep(t),
                                                                          ctx)), rtol=1e-6, atol=1e-6)


def test_text_encoder_section():
    with pytest.raises(ConfigError, match="needs model.text_encoder.path"):
        build.TextEncoderConfig.from_config({"name": "clip"})
    with pytest.raises(ConfigError, match="did you mean 'minilm'"):
        build.TextEncoderConfig.from_config({"name": "minilml"})
    assert build.TextEncoderConfig.from_config(base_config().model.text_encoder).max_length == 16
