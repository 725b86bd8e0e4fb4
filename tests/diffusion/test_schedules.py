"""Schedules: closed-form values at known t, monotonicity, inverses, wrappers, the discrete timestep map."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion
from ldm_jax.types import ConfigError

TS = np.array([0.1, 0.25, 0.5, 0.75, 0.9])


def logsnr_of_abar(abar):
    return np.log(abar) - np.log1p(-abar)


def test_cosine_matches_iddpm_formula():
    s = 0.008
    f = lambda t: np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    ours = diffusion.get_schedule("cosine")
    np.testing.assert_allclose(ours.logsnr(TS), logsnr_of_abar(f(TS) / f(0.0)), rtol=1e-5)
    assert float(ours.logsnr(0.0)) == np.inf and float(ours.logsnr(1.0)) == -np.inf
    # s = 0: abar(1/2) = cos^2(pi / 4) = 1/2, logsnr = 0.
    assert abs(float(diffusion.get_schedule("cosine", s=0.0).logsnr(0.5))) < 1e-6


def test_sigmoid_matches_chen_2023():
    start, end, tau = 0.0, 3.0, 0.5
    sig = lambda z: 1 / (1 + np.exp(-z))
    v_start, v_end = sig(start / tau), sig(end / tau)
    abar = (v_end - sig((TS * (end - start) + start) / tau)) / (v_end - v_start)
    ours = diffusion.get_schedule("sigmoid", start=start, end=end, tau=tau)
    np.testing.assert_allclose(ours.logsnr(TS), logsnr_of_abar(abar), rtol=1e-5, atol=1e-6)
    assert (
        abs(float(diffusion.get_schedule("sigmoid").logsnr(0.5))) < 1e-6
    )  # symmetric default: logsnr(1/2) = 0


def test_laplace_edm_flow_closed_forms():
    lap = diffusion.get_schedule("laplace", mu=0.5, b=2.0)
    np.testing.assert_allclose(
        lap.logsnr([0.25, 0.5, 0.75]), [0.5 - 2 * math.log(0.5), 0.5, 0.5 + 2 * math.log(0.5)], rtol=1e-6
    )
    edm = diffusion.get_schedule("edm")
    mid = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    np.testing.assert_allclose(edm.sigma([0.0, 0.5, 1.0]), [0.002, mid, 80.0], rtol=1e-5)
    flow = diffusion.get_schedule("flow")
    np.testing.assert_allclose(flow.logsnr(TS), 2 * np.log((1 - TS) / TS), rtol=1e-6, atol=1e-6)
    alpha, sigma = flow.alpha_sigma(TS)
    np.testing.assert_allclose(sigma / (alpha + sigma), TS, rtol=1e-6)  # flow time = sigma / (alpha + sigma)


def test_discrete_tables_and_timestep_map():
    s = diffusion.get_schedule("scaled_linear")
    assert s.num_train_timesteps == 1000 and s.t_min == 1e-3
    np.testing.assert_allclose(float(s.alphas_cumprod[0]), 1 - 0.00085, rtol=1e-7)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(float(s.alphas_cumprod[-1]), np.prod(1 - betas), rtol=1e-5)
    n = jnp.arange(1000.0)
    np.testing.assert_allclose(s.timestep(s.t_of_timestep(n)), n, atol=1e-3)
    assert float(s.timestep(1.0)) == 999.0 and float(s.logsnr(0.0)) == np.inf  # t = 0 is the clean sample
    # Between table entries sigma/alpha is linear in the timestep.
    sig = np.exp(-0.5 * np.asarray(s.logsnr_table))
    np.testing.assert_allclose(s.sigma(s.t_of_timestep(10.25)), 0.75 * sig[10] + 0.25 * sig[11], rtol=1e-5)
    linear = diffusion.get_schedule("linear")
    np.testing.assert_allclose(
        float(linear.alphas_cumprod[1]), (1 - 1e-4) * (1 - (1e-4 + 0.0199 / 999)), rtol=1e-7
    )


ALL = {
    "linear": {},
    "scaled_linear": {},
    "cosine": {},
    "sigmoid": dict(start=0.0, end=3.0, tau=0.7),
    "laplace": {},
    "edm": {},
    "flow": {},
    "cosine_truncated": dict(logsnr_min=-12.0, logsnr_max=9.0),
}


def make(name):
    return diffusion.get_schedule(name.replace("_truncated", ""), **ALL[name])


@jax.jit
def views(s, t):
    """Everything a schedule offers at t, in one compiled call (schedules are pytrees)."""
    logsnr = s.logsnr(t)
    return logsnr, s.t_from_logsnr(logsnr), s.t_from_sigma(s.sigma(t)), s.alpha_sigma(t)


@pytest.mark.parametrize("name", list(ALL))
def test_monotone_and_invertible(name):
    t = jnp.linspace(0.002, 0.998, 499)
    logsnr, t_back, t_back_sigma, (alpha, sigma) = views(make(name), t)
    assert bool(jnp.all(jnp.diff(logsnr) < 0)), "logSNR must decrease strictly in t"
    np.testing.assert_allclose(t_back, t, atol=2e-5)
    np.testing.assert_allclose(t_back_sigma, t, atol=2e-5)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)


def test_truncation_hits_the_bounds():
    s = make("cosine_truncated")
    np.testing.assert_allclose(s.logsnr([0.0, 1.0]), [9.0, -12.0], rtol=1e-5)


def test_shift():
    base = diffusion.get_schedule("cosine")
    s = diffusion.get_schedule("cosine", shift=2.0)
    np.testing.assert_allclose(s.logsnr(TS), base.logsnr(TS) - 2 * math.log(2.0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.t_from_logsnr(s.logsnr(TS)), TS, atol=1e-6)
    # On rectified flow the shift is SD3's time shift t' = s t / (1 + (s - 1) t).
    flow = diffusion.shifted(diffusion.get_schedule("flow"), 3.0)
    alpha, sigma = flow.alpha_sigma(TS)
    np.testing.assert_allclose(sigma / (alpha + sigma), 3 * TS / (1 + 2 * TS), rtol=1e-6)
    assert diffusion.shifted(base, 1.0) is base


def test_zero_terminal_snr_continuous():
    base = diffusion.get_schedule("cosine", logsnr_min=-8.0, logsnr_max=8.0)
    s = diffusion.zero_terminal_snr(base)
    a0, _ = base.alpha_sigma(0.0)
    a1, _ = base.alpha_sigma(1.0)
    alpha, _ = s.alpha_sigma(TS)
    np.testing.assert_allclose(alpha, (base.alpha_sigma(TS)[0] - a1) * a0 / (a0 - a1), rtol=1e-5)
    assert float(s.logsnr(1.0)) == -np.inf
    np.testing.assert_allclose(float(s.logsnr(0.0)), 8.0, rtol=1e-4)
    t = jnp.linspace(0.01, 0.99, 50)
    np.testing.assert_allclose(s.t_from_logsnr(s.logsnr(t)), t, atol=1e-4)


def test_zero_snr_discrete_logsnr_and_sampler_floor():
    s = diffusion.get_schedule("scaled_linear", zero_snr=True)
    assert float(s.logsnr(1.0)) == -np.inf and np.isfinite(float(s.logsnr(0.999)))
    grid = diffusion.time_grid(s, 10, "trailing")
    assert float(grid.logsnr[0]) == -np.inf


def test_q_sample_broadcasts_per_example():
    s = diffusion.get_schedule("cosine")
    x0, noise = jnp.ones((3, 2, 2, 1)), jnp.full((3, 2, 2, 1), 2.0)
    t = jnp.array([0.0, 0.5, 1.0])
    x_t = diffusion.q_sample(s, x0, t, noise)
    alpha, sigma = s.alpha_sigma(t)
    np.testing.assert_allclose(x_t[:, 0, 0, 0], alpha + 2 * sigma, rtol=1e-6)
    np.testing.assert_allclose(x_t[0], x0[0])  # t = 0 is clean
    np.testing.assert_allclose(x_t[2], noise[2], atol=1e-6)  # t = 1 is pure noise


def test_learned_schedule_monotone_invertible_and_trainable():
    params = diffusion.learned_schedule_init(
        jax.random.key(0, impl="rbg"), hidden=16, logsnr_min=-6.0, logsnr_max=7.0
    )
    rng = np.random.default_rng(0)
    params = {k: v + 0.5 * rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    s = diffusion.get_schedule("learned", params=params)
    t = jnp.linspace(0.0, 1.0, 101)
    logsnr, t_back, _, _ = views(s, t)
    np.testing.assert_allclose(
        logsnr[jnp.array([0, -1])], [params["logsnr_max"], params["logsnr_min"]], rtol=1e-5
    )
    assert bool(jnp.all(jnp.diff(logsnr) < 0))
    np.testing.assert_allclose(t_back, t, atol=1e-5)

    def total(p):
        sched = diffusion.LearnedSchedule(p)
        x0 = jnp.ones((4, 3))
        noise = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
        tt = jnp.array([0.1, 0.4, 0.6, 0.9])
        out = diffusion.q_sample(sched, x0, tt, noise) * 0.5
        return jnp.mean(diffusion.loss(out, x0, noise, tt, schedule=sched, prediction="x0", weighting="elbo"))

    grads = jax.jit(jax.grad(total))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["w2"]).sum()) > 0 and float(jnp.abs(grads["logsnr_min"])) > 0


def test_schedule_errors_are_one_line():
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        diffusion.get_schedule("cosin")
    with pytest.raises(ConfigError, match="schedule 'cosine'"):
        diffusion.get_schedule("cosine", tau=1.0)
    with pytest.raises(ConfigError, match="learned_schedule_init"):
        diffusion.get_schedule("learned")
    with pytest.raises(ConfigError, match="shift"):
        diffusion.get_schedule("cosine", shift=0.0)
    with pytest.raises(ConfigError, match="decreasing"):
        diffusion.DiscreteSchedule.from_alphas_cumprod([0.5, 0.9])
