"""Rectified flow in the diffusion core: SD3's time densities and weightings, the flow samplers' orders on
Gaussian data, and step-for-step parity with diffusers' FlowMatchEuler / FlowMatchHeun schedulers.

Gaussian data x0 ~ N(MU, S^2): on x_f = (1 - tau) x0 + tau eps the exact velocity is
u = E[eps - x0 | x_f] = (tau - (1 - tau) S^2) / V (x_f - (1 - tau) MU) - MU, V = (1 - tau)^2 S^2 + tau^2, and the
probability-flow ODE keeps z = (x_f - (1 - tau) MU) / sqrt(V) fixed: from pure noise x_f = z it lands on MU + S z.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion
from ldm_jax.types import ConfigError

MU, S = 1.5, 0.5
SHIFT = 3.0


def velocity(x_f, tau):
    """The exact velocity of Gaussian data (module doc); works for numpy, jax and torch arrays."""
    var = (1 - tau) ** 2 * S**2 + tau**2
    return (tau - (1 - tau) * S**2) / var * (x_f - (1 - tau) * MU) - MU


def flow_denoise_fn(schedule):
    """A "flow" network in the framework's VP terms, fed SD3-style (x_f, tau) as ldm.Denoiser does."""

    def fn(x, t):
        alpha, sigma = schedule.alpha_sigma(t)
        total = (alpha + sigma)[:, None]
        return velocity(x / total, (sigma / (alpha + sigma))[:, None])

    return fn


def sample(sampler, num_steps, z, spacing="flowmatch", shift=SHIFT):  # noqa: D103
    schedule = diffusion.get_schedule("flow", shift=shift)
    return diffusion.sample(flow_denoise_fn(schedule), z, schedule=schedule, prediction="flow", sampler=sampler,
                            num_steps=num_steps, spacing=spacing)


@pytest.fixture(scope="module")
def z():
    return jax.random.normal(jax.random.key(0), (512, 4))


# ------------------------------------------------------------------------------- diffusers parity
@pytest.mark.parametrize("name, atol", [("ddim", 2e-5), ("euler", 3e-4), ("flow_heun", 2e-5)])
def test_flowmatch_schedulers_step_for_step(name, atol, z):
    """ddim / flow_heun on the flowmatch grid equal diffusers' FlowMatchEuler / FlowMatchHeun (SD3's shift 3,
    10 steps): the same network times (1000 tau) and final samples within float32 rounding. euler is the same
    step in EDM coordinates, which start from the sigma/alpha <= 4096 floor instead of pure noise (as diffusers'
    EulerDiscrete does on zero-terminal-SNR schedules): 1.5e-4 off."""
    torch = pytest.importorskip("torch")
    schedulers = pytest.importorskip("diffusers.schedulers")
    heun = name == "flow_heun"
    cls = schedulers.FlowMatchHeunDiscreteScheduler if heun else schedulers.FlowMatchEulerDiscreteScheduler
    sch = cls(num_train_timesteps=1000, shift=SHIFT)
    steps = 10
    sch.set_timesteps(steps)
    x = torch.from_numpy(np.array(z))
    seen = []
    for ts in sch.timesteps:
        tau = ts / 1000.0
        seen.append(float(ts))
        x = sch.step(velocity(x, tau), ts, x).prev_sample
    ours = sample(name, steps, z)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=0, atol=atol)

    schedule = diffusion.get_schedule("flow", shift=SHIFT)
    grid = diffusion.time_grid(schedule, steps, "flowmatch", style="euler")
    alpha, sigma = schedule.alpha_sigma(grid.t[:-1])
    taus = np.asarray(1000.0 * sigma / (alpha + sigma))
    expected = taus if not heun else np.concatenate([taus[:1], np.repeat(taus[1:], 2)])
    np.testing.assert_allclose(expected, np.array(seen), rtol=1e-5)


# ------------------------------------------------------------------------------- orders on Gaussian data
# Fitted order between 32 and 128 steps on the karras grid (sigma 80 -> 0.002), shift 3, from pure noise, where
# the grid is smooth at both ends. Measured: ddim/euler 0.97, heun 2.11, flow_heun 1.85, dpmpp_2m 2.16,
# unipc 3.05. (On a grid uniform in t the multistep solvers' two ends cancel erratically, as in
# test_sampler_matrix.py, and on the flowmatch grid the last level stays at tau = 0.009 whatever N, so the final
# first-order jump caps every sampler there.)
ORDERS = {"ddim": 1, "euler": 1, "heun": 2, "flow_heun": 2, "dpmpp_2m": 2, "unipc": 3}


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_flow_samplers_reach_their_order(name, z):
    exact = MU + S * z
    errors = [float(jnp.mean(jnp.abs(sample(name, n, z, spacing="karras") - exact))) for n in (32, 128)]
    order = math.log(errors[0] / errors[1]) / math.log(4)
    assert order > ORDERS[name] - 0.3, (name, errors, order)


# ------------------------------------------------------------------------------- SD3's time densities
def test_mode_and_cosmap_samplers_follow_their_closed_form_laws():
    n = 200_000
    grid = np.linspace(0.05, 0.95, 19)
    # cosmap: u = (2 / pi) atan(t / (1 - t)) is uniform
    t = np.asarray(diffusion.sample_t("cosmap", jax.random.key(1), n))
    cdf = (2 / np.pi) * np.arctan(grid / (1 - grid))
    assert np.max(np.abs((t[:, None] <= grid).mean(0) - cdf)) < 4 / math.sqrt(n)
    # mode(s): t = f(u) decreasing, so P(t <= x) = 1 - f^-1(x)
    scale = 1.29
    t = np.asarray(diffusion.sample_t("mode", jax.random.key(2), n, scale=scale))
    f = lambda u: 1 - u - scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)  # noqa: E731
    u = np.linspace(0, 1, 200_001)
    inverse = np.interp(grid, f(u)[::-1], u[::-1])
    assert np.max(np.abs((t[:, None] <= grid).mean(0) - (1 - inverse))) < 4 / math.sqrt(n)
    assert (t >= 0).all() and (t <= 1).all()
    # scale 0 is uniform
    t0 = diffusion.sample_t("mode", jax.random.key(3), 8, scale=0.0)
    u0 = jax.random.uniform(jax.random.key(3), (8,))
    np.testing.assert_allclose(np.asarray(t0), 1 - np.asarray(u0), atol=1e-7)
    with pytest.raises(ConfigError, match="scale"):
        diffusion.sample_t("mode", jax.random.key(0), 4, scale=2.0)


def test_flow_weighting_is_the_velocity_mse():
    """prediction="flow" with weighting="flow" is exactly mean((u_hat - (eps - x0))^2)."""
    schedule = diffusion.get_schedule("flow", shift=SHIFT)
    k = jax.random.split(jax.random.key(4), 4)
    x0, noise, out = (jax.random.normal(key, (6, 3, 3, 2)) for key in k[:3])
    t = jax.random.uniform(k[3], (6,), minval=0.01, maxval=0.99)
    got = diffusion.loss(out, x0, noise, t, schedule=schedule, prediction="flow", weighting="flow")
    want = jnp.mean((out - (noise - x0)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6)
    # the same loss from an eps network: weighted in eps units, (1 + sigma/alpha)^2 = 1 / (1 - tau)^2 times eps-MSE
    got_eps = diffusion.loss(noise + 0.1, x0, noise, t, schedule=schedule, prediction="eps", weighting="flow")
    alpha, sigma = schedule.alpha_sigma(t)
    tau = sigma / (alpha + sigma)
    np.testing.assert_allclose(np.asarray(got_eps), np.asarray(0.01 / (1 - tau) ** 2), rtol=1e-4)


@pytest.mark.parametrize("name, options", [("logit_normal", {}), ("logit_normal", {"mean": 0.5, "std": 0.7}),
                                           ("cosmap", {})])
def test_density_weightings_are_velocity_mse_times_a_density(name, options):
    """w / w_flow is a probability density on flow time (integrates to 1), equal to the sampler's law."""
    tau = np.linspace(1e-6, 1 - 1e-6, 400_001)
    logsnr = 2 * (np.log1p(-tau) - np.log(tau))
    ratio = np.asarray(diffusion.weight(name, logsnr, **options) / diffusion.weight("flow", logsnr))
    assert abs(np.trapezoid(ratio, tau) - 1.0) < 1e-3
    draws = np.asarray(diffusion.sample_t(name, jax.random.key(5), 200_000, **options))
    cdf = np.cumsum(ratio) * (tau[1] - tau[0])
    at = np.array([0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose((draws[:, None] <= at).mean(0), np.interp(at, tau, cdf), atol=0.006)
