"""Parametrization round trips, EDM preconditioning, weightings' special cases and the loss."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion
from ldm_jax.types import ConfigError

RNG = np.random.default_rng(0)
X0 = jnp.asarray(RNG.standard_normal((5, 3, 3, 2)), jnp.float32)
EPS = jnp.asarray(RNG.standard_normal((5, 3, 3, 2)), jnp.float32)
T = jnp.array([0.05, 0.3, 0.5, 0.7, 0.95])
SCHEDULE = diffusion.get_schedule("cosine", logsnr_min=-10.0, logsnr_max=10.0)


def test_round_trip_every_parametrization():
    alpha, sigma = SCHEDULE.alpha_sigma(T)
    x_t = diffusion.q_sample(SCHEDULE, X0, T, EPS)
    for prediction in diffusion.PREDICTIONS:
        out = diffusion.from_x0_eps(X0, EPS, alpha, sigma, prediction)
        x0, eps = diffusion.to_x0_eps(out, x_t, alpha, sigma, prediction)
        np.testing.assert_allclose(x0, X0, atol=2e-4, err_msg=prediction)
        np.testing.assert_allclose(eps, EPS, atol=2e-5, err_msg=prediction)
    for source, target in itertools.permutations(diffusion.PREDICTIONS, 2):
        out = diffusion.from_x0_eps(X0, EPS, alpha, sigma, source)
        converted = diffusion.convert(out, x_t, T, schedule=SCHEDULE, source=source, target=target)
        np.testing.assert_allclose(converted, diffusion.from_x0_eps(X0, EPS, alpha, sigma, target), atol=2e-4)


def test_v_and_flow_definitions():
    alpha, sigma = SCHEDULE.alpha_sigma(T)
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    np.testing.assert_allclose(diffusion.from_x0_eps(X0, EPS, alpha, sigma, "v"), a * EPS - s * X0, atol=1e-6)
    np.testing.assert_allclose(diffusion.from_x0_eps(X0, EPS, alpha, sigma, "flow"), EPS - X0, atol=1e-6)


def test_prediction_scale_is_the_error_ratio():
    alpha, sigma = SCHEDULE.alpha_sigma(T)
    logsnr = SCHEDULE.logsnr(T)
    x_t = diffusion.q_sample(SCHEDULE, X0, T, EPS)
    delta = jnp.asarray(RNG.standard_normal(X0.shape), jnp.float32) * 1e-2
    for prediction in diffusion.PREDICTIONS:
        out = diffusion.from_x0_eps(X0, EPS, alpha, sigma, prediction)
        _, eps_hat = diffusion.to_x0_eps(out + delta, x_t, alpha, sigma, prediction)
        ratio = jnp.sum(delta**2, axis=(1, 2, 3)) / jnp.sum((eps_hat - EPS) ** 2, axis=(1, 2, 3))
        np.testing.assert_allclose(ratio, diffusion.prediction_scale(logsnr, prediction), rtol=2e-3)


def test_edm_preconditioning():
    c_skip, c_out, c_in, c_noise = diffusion.edm_coefficients(jnp.asarray(0.5), 0.5)
    np.testing.assert_allclose(
        [c_skip, c_out, c_in, c_noise],
        [0.5, 0.5 / math.sqrt(2), 1 / math.sqrt(0.5), 0.25 * math.log(0.5)],
        rtol=1e-6,
    )
    w = jnp.asarray(RNG.standard_normal((2, 2)), jnp.float32)
    net = lambda x, c: x @ w + c[:, None, None, None]
    schedule = diffusion.get_schedule("edm")
    denoiser = diffusion.edm_precondition(net, schedule)
    x_t = diffusion.q_sample(schedule, X0, T, EPS)
    sig = schedule.sigma(T)
    alpha = schedule.alpha_sigma(T)[0][:, None, None, None]
    c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in diffusion.edm_coefficients(sig, 0.5))
    expected = c_skip * x_t / alpha + c_out * ((c_in * x_t / alpha) @ w + c_noise)
    np.testing.assert_allclose(denoiser(x_t, T), expected, rtol=1e-5, atol=1e-5)
    # A pytree: its arrays cross jit as traced leaves.
    np.testing.assert_allclose(
        jax.jit(lambda d, x: d(x, T))(diffusion.EDMPrecond(net, schedule), x_t),
        expected,
        rtol=1e-5,
        atol=1e-5,
    )


def test_weightings_reduce_to_special_cases():
    logsnr = jnp.linspace(-12.0, 12.0, 49)
    w = lambda name, **kw: np.asarray(diffusion.weight(name, logsnr, **kw))
    np.testing.assert_allclose(w("snr"), w("uniform"))
    np.testing.assert_allclose(w("min_snr", gamma=1e12), w("uniform"))
    np.testing.assert_allclose(w("p2", gamma=0.0), w("uniform"))
    np.testing.assert_allclose(w("edm", sigma_data=1.0), w("v"), rtol=1e-6)
    np.testing.assert_allclose(w("sigmoid", bias=60.0), w("uniform"), rtol=1e-6)
    np.testing.assert_allclose(w("truncated_snr"), np.maximum(w("uniform"), w("x0")), rtol=1e-6)
    snr = np.exp(np.asarray(logsnr, np.float64))
    np.testing.assert_allclose(w("min_snr", gamma=5.0), np.minimum(snr, 5.0) / snr, rtol=1e-5)
    np.testing.assert_allclose(w("p2", k=1.0, gamma=0.5), (1 + snr) ** -0.5, rtol=1e-5)
    assert np.all(np.isfinite(w("x0"))) and np.all(np.isfinite(diffusion.weight("v", jnp.array([-jnp.inf]))))


def mse(a, b):
    return jnp.mean((a - b) ** 2, axis=(1, 2, 3))


def test_loss_equals_the_classic_objectives():
    alpha, sigma = SCHEDULE.alpha_sigma(T)
    logsnr = SCHEDULE.logsnr(T)
    snr = jnp.exp(logsnr)
    out = {
        p: diffusion.from_x0_eps(X0, EPS, alpha, sigma, p) + 0.1 * EPS[::-1] for p in diffusion.PREDICTIONS
    }
    target = {p: diffusion.from_x0_eps(X0, EPS, alpha, sigma, p) for p in diffusion.PREDICTIONS}
    loss = lambda p, w, **kw: diffusion.loss(
        out[p], X0, EPS, T, schedule=SCHEDULE, prediction=p, weighting=w, **kw
    )
    # Native-space MSEs.
    np.testing.assert_allclose(loss("eps", "uniform"), mse(out["eps"], target["eps"]), rtol=1e-5)
    np.testing.assert_allclose(loss("x0", "x0"), mse(out["x0"], target["x0"]), rtol=1e-5)
    np.testing.assert_allclose(loss("v", "v"), mse(out["v"], target["v"]), rtol=1e-5)
    # min-SNR-gamma for a v-model, as in Hang et al. 2023 / diffusers' training scripts.
    np.testing.assert_allclose(
        loss("v", "min_snr", gamma=5.0),
        jnp.minimum(snr, 5.0) / (snr + 1) * mse(out["v"], target["v"]),
        rtol=1e-5,
    )
    # EDM: lambda(sigma) ||D - x0||^2 with lambda = (s^2 + sd^2) / (s sd)^2.
    sig = jnp.exp(-0.5 * logsnr)
    np.testing.assert_allclose(
        loss("x0", "edm", sigma_data=0.5),
        (sig**2 + 0.25) / (sig * 0.5) ** 2 * mse(out["x0"], target["x0"]),
        rtol=1e-5,
    )
    # Any weighting is the same loss whichever parametrization the network uses, for the same eps error.
    x_t = diffusion.q_sample(SCHEDULE, X0, T, EPS)
    eps_hat = EPS + 0.1 * EPS[::-1]
    x0_hat = diffusion.to_x0_eps(eps_hat, x_t, alpha, sigma, "eps")[0]
    for p in diffusion.PREDICTIONS:
        same = diffusion.from_x0_eps(x0_hat, eps_hat, alpha, sigma, p)
        got = diffusion.loss(
            same, X0, EPS, T, schedule=SCHEDULE, prediction=p, weighting="p2", k=1.0, gamma=1.0
        )
        np.testing.assert_allclose(got, mse(eps_hat, EPS) / (1 + snr), rtol=2e-3, err_msg=p)


def test_elbo_weight_is_minus_half_dlogsnr_dt():
    h = 1e-3
    dl = (SCHEDULE.logsnr(T + h) - SCHEDULE.logsnr(T - h)) / (2 * h)
    np.testing.assert_allclose(
        diffusion.loss_weight(T, schedule=SCHEDULE, weighting="elbo"), -0.5 * dl, rtol=1e-3
    )


def test_noise_level_samplers():
    key = jax.random.key(0, impl="rbg")
    n = 20000
    t = diffusion.sample_t("uniform", key, n)
    assert 0 <= float(t.min()) and float(t.max()) <= 1 and abs(float(t.mean()) - 0.5) < 0.01
    t = diffusion.sample_t("logit_normal", key, n, mean=0.5, std=0.8)
    logit = jnp.log(t) - jnp.log1p(-t)
    assert abs(float(logit.mean()) - 0.5) < 0.02 and abs(float(logit.std()) - 0.8) < 0.02
    edm = diffusion.get_schedule("edm")
    t = diffusion.sample_t("lognormal_sigma", key, n, schedule=edm, p_mean=-1.2, p_std=1.2)
    log_sigma = jnp.log(edm.sigma(t))
    inside = (log_sigma > math.log(0.0021)) & (log_sigma < math.log(79.0))  # clipped to the schedule's range
    assert abs(float(jnp.median(log_sigma)) + 1.2) < 0.03 and float(inside.mean()) > 0.99
    t = diffusion.sample_t("low_discrepancy", key, 8)
    np.testing.assert_allclose(np.diff(np.sort(np.asarray(t))), 1 / 8, atol=1e-6)
    sd = diffusion.get_schedule("scaled_linear")
    t = diffusion.sample_t("uniform", key, n, schedule=sd, discrete=True)
    timesteps = np.asarray(sd.timestep(t))
    np.testing.assert_allclose(timesteps, np.round(timesteps), atol=1e-3)
    assert timesteps.min() >= 0 and timesteps.max() <= 999


def test_loss_and_sampler_errors_are_one_line():
    with pytest.raises(ConfigError, match="did you mean 'min_snr'"):
        diffusion.loss(X0, X0, EPS, T, schedule=SCHEDULE, weighting="minsnr")
    with pytest.raises(ConfigError, match="takes .*gamma"):
        diffusion.loss(X0, X0, EPS, T, schedule=SCHEDULE, weighting="min_snr", gama=5.0)
    with pytest.raises(ConfigError, match="prediction"):
        diffusion.loss(X0, X0, EPS, T, schedule=SCHEDULE, prediction="epsilon")
    with pytest.raises(ConfigError, match="shape"):
        diffusion.loss(X0, X0, EPS, T[:2], schedule=SCHEDULE)
    with pytest.raises(ConfigError, match="needs schedule"):
        diffusion.sample_t("lognormal_sigma", jax.random.key(0), 4)
    with pytest.raises(ConfigError, match="discrete schedule"):
        diffusion.sample_t("uniform", jax.random.key(0), 4, schedule=SCHEDULE, discrete=True)
