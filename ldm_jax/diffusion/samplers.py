"""Sampler steps with one signature: ``step(ctx, i, x, state, key) -> (x_next, state)``.

x is always the variance-preserving sample x_t = alpha x0 + sigma eps at grid time t_i; a step moves it to
t_{i+1}. ``ctx.model(x, t, logsnr) -> (x0_hat, eps_hat)`` evaluates the network once. alpha, sigma come from
the grid's logSNR; the EDM view uses x~ = x / alpha and s = sigma / alpha = exp(-logsnr / 2).

    ddpm             ancestral step from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020), variance
                     "small" (posterior) or "large" (beta_t); no noise is added when stepping to sigma = 0.
    ddim             x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z,
                     c = eta sigma_s / sigma_t sqrt(1 - alpha_t^2 / alpha_s^2)            (Song et al. 2021)
    euler            x~_s = x~_t + (s_s - s_t) eps  (EDM Alg. 1 step; optional churn as in diffusers)
    euler_ancestral  s_up = min(s_s, eta s_s sqrt(s_t^2 - s_s^2) / s_t), s_down = sqrt(s_s^2 - s_up^2),
                     x~_s = x~_t + (s_down - s_t) eps + s_up z                               (k-diffusion)
    heun             EDM Algorithm 2 with churn: Euler to s_s, then the trapezoid correction unless s_s = 0
    dpmpp_2m         DPM-Solver++(2M), midpoint form (Lu et al. 2022), lambda = logsnr / 2,
                     h = lambda_s - lambda_t:
                     x_s = sigma_s/sigma_t x - alpha_s expm1(-h) (D0 + D1 / 2), D1 = (D0 - D_prev) h / h_prev
    dpmpp_2m_sde     SDE-DPM-Solver++(2M): x_s = sigma_s/sigma_t e^-h x + alpha_s (1 - e^-2h)(D0 + D1 / 2)
                     + sigma_s sqrt(1 - e^-2h) z
    unipc            UniPC-2 with the B(h) = expm1(-h) ("bh2") variant, x0 form (Zhao et al. 2023): a UniC
                     corrector on x_t from the new model output, then the UniP predictor; one evaluation
                     a step.

Order schedule (as diffusers): multistep methods start first order; dpmpp_2m(_sde) takes its last step first
order when the target is sigma = 0 or N < 15 (``lower_order_final``); unipc's predictor order is
min(2, N - i, steps taken + 1) and its corrector uses the previous predictor's order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ldm_jax.diffusion._util import alpha_sigma_from_logsnr
from ldm_jax.diffusion.grids import Grid
from ldm_jax.types import Array


@dataclasses.dataclass(frozen=True)
class Options:
    """Static sampler settings (hashable: part of the jit cache key)."""

    eta: float = 0.0
    churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    variance: str = "small"
    lower_order_final: bool = True


class Ctx(NamedTuple):
    model: Callable[[Array, Array, Array], tuple[Array, Array]]
    grid: Grid
    schedule: Any
    num_steps: int
    first: int
    opts: Options


def _normal(key, x):
    return jax.random.normal(key, x.shape, x.dtype)


def _at(ctx: Ctx, i):
    """(t, logsnr, alpha, sigma) at grid index i (clamped into the grid)."""
    i = jnp.clip(i, 0, ctx.num_steps)
    logsnr = ctx.grid.logsnr[i]
    alpha, sigma = alpha_sigma_from_logsnr(logsnr)
    return ctx.grid.t[i], logsnr, alpha, sigma


def _safe(den):
    return jnp.where(den == 0, 1.0, den)


# ---------------------------------------------------------------------------------------------- first order


def ddpm_step(ctx: Ctx, i, x, state, key):
    t, l, a, s = _at(ctx, i)
    _, l_n, a_n, s_n = _at(ctx, i + 1)
    x0, _ = ctx.model(x, t, l)
    frac = -jnp.expm1(l - l_n)  # beta_t / sigma_t^2 with beta_t = 1 - alpha_t^2 / alpha_s^2, no cancellation
    mean = a_n * frac * x0 + (a / a_n) * s_n**2 / s**2 * x
    var = s_n**2 * frac if ctx.opts.variance == "small" else s**2 * frac
    var = jnp.where(s_n > 0, jnp.maximum(var, 0.0), 0.0)
    return mean + jnp.sqrt(var) * _normal(key, x), state


def ddim_step(ctx: Ctx, i, x, state, key):
    t, l, _, _ = _at(ctx, i)
    _, l_n, a_n, s_n = _at(ctx, i + 1)
    x0, eps = ctx.model(x, t, l)
    if ctx.opts.eta == 0:
        return a_n * x0 + s_n * eps, state
    c = ctx.opts.eta * s_n * jnp.sqrt(jnp.maximum(-jnp.expm1(l - l_n), 0.0))
    direction = jnp.sqrt(jnp.maximum(s_n**2 - c**2, 0.0))
    return a_n * x0 + direction * eps + c * _normal(key, x), state


def _churn(ctx: Ctx, i, x_edm, key):
    """EDM Alg. 2 lines 4-6: raise the noise level to s_hat = s (1 + gamma) by adding fresh noise."""
    t, l, _, _ = _at(ctx, i)
    o = ctx.opts
    sig = jnp.exp(-0.5 * l)
    if o.churn == 0:
        return x_edm, t, l, sig
    inside = (sig >= o.s_tmin) & (sig <= o.s_tmax)
    gamma = jnp.where(inside, min(o.churn / ctx.num_steps, math.sqrt(2.0) - 1.0), 0.0)
    sig_max = jnp.exp(-0.5 * ctx.grid.logsnr[0])
    sig_hat = jnp.minimum(sig * (1.0 + gamma), jnp.maximum(sig_max, sig))
    x_edm = x_edm + jnp.sqrt(sig_hat**2 - sig**2) * o.s_noise * _normal(key, x_edm)
    churned = sig_hat > sig
    t_hat = jnp.where(churned, ctx.schedule.t_from_sigma(sig_hat), t)
    return x_edm, t_hat, jnp.where(churned, -2.0 * jnp.log(sig_hat), l), sig_hat


def _eps_edm(ctx: Ctx, x_edm, t, l):
    """Evaluates the network on an EDM-scale sample; returns eps = dx~/ds of the probability-flow ODE."""
    a, _ = alpha_sigma_from_logsnr(l)
    return ctx.model(x_edm * a, t, l)[1]


def euler_step(ctx: Ctx, i, x, state, key):
    _, _, a, _ = _at(ctx, i)
    _, l_n, a_n, _ = _at(ctx, i + 1)
    x_edm, t_hat, l_hat, sig_hat = _churn(ctx, i, x / a, key)
    eps = _eps_edm(ctx, x_edm, t_hat, l_hat)
    return (x_edm + (jnp.exp(-0.5 * l_n) - sig_hat) * eps) * a_n, state


def euler_ancestral_step(ctx: Ctx, i, x, state, key):
    t, l, a, _ = _at(ctx, i)
    _, l_n, a_n, _ = _at(ctx, i + 1)
    sig, sig_n = jnp.exp(-0.5 * l), jnp.exp(-0.5 * l_n)
    sig_up = jnp.minimum(sig_n, ctx.opts.eta * jnp.sqrt(sig_n**2 * (sig**2 - sig_n**2) / sig**2))
    sig_down = jnp.sqrt(sig_n**2 - sig_up**2)
    x_edm = x / a
    eps = _eps_edm(ctx, x_edm, t, l)
    return (x_edm + (sig_down - sig) * eps + sig_up * _normal(key, x)) * a_n, state


def heun_step(ctx: Ctx, i, x, state, key):
    _, _, a, _ = _at(ctx, i)
    t_n, l_n, a_n, _ = _at(ctx, i + 1)
    sig_n = jnp.exp(-0.5 * l_n)
    x_edm, t_hat, l_hat, sig_hat = _churn(ctx, i, x / a, key)
    d = _eps_edm(ctx, x_edm, t_hat, l_hat)
    x_euler = x_edm + (sig_n - sig_hat) * d

    def corrected(_):
        d_n = _eps_edm(ctx, x_euler, t_n, l_n)
        return x_edm + (sig_n - sig_hat) * 0.5 * (d + d_n)

    x_next = jax.lax.cond(sig_n > 0, corrected, lambda _: x_euler, None)
    return x_next * a_n, state


# ---------------------------------------------------------------------------------------------- multistep


def _use_second_order(ctx: Ctx, i):
    last = i == ctx.num_steps - 1
    return (i > ctx.first) & ~(last & ctx.opts.lower_order_final)


def _dpmpp(ctx: Ctx, i, x, state, key, sde: bool):
    t, l, _, s = _at(ctx, i)
    _, l_n, a_n, s_n = _at(ctx, i + 1)
    _, l_p, _, _ = _at(ctx, i - 1)
    x0, _ = ctx.model(x, t, l)
    h = 0.5 * (l_n - l)
    second = _use_second_order(ctx, i)
    r0 = jnp.where(second, 0.5 * (l - l_p) / _safe(h), 1.0)
    d1 = (x0 - state) / _safe(r0)
    if sde:
        k = -jnp.expm1(-2.0 * h)
        x_next = s_n / s * jnp.exp(-h) * x + a_n * k * x0 + s_n * jnp.sqrt(k) * _normal(key, x)
    else:
        k = -jnp.expm1(-h)
        x_next = s_n / s * x + a_n * k * x0
    return jnp.where(second, x_next + 0.5 * a_n * k * d1, x_next), x0


def dpmpp_2m_step(ctx: Ctx, i, x, state, key):
    return _dpmpp(ctx, i, x, state, key, sde=False)


def dpmpp_2m_sde_step(ctx: Ctx, i, x, state, key):
    return _dpmpp(ctx, i, x, state, key, sde=True)


def _unipc_b(h):
    """UniPC's (b1, b2) for order 2 with B(h) = expm1(-h) (x0 form, hh = -h)."""
    hh = -h
    phi = jnp.expm1(hh)
    k1 = phi / _safe(hh) - 1.0
    k2 = k1 / _safe(hh) - 0.5
    return phi, k1 / _safe(phi), 2.0 * k2 / _safe(phi)


def _unipc_correct(ctx: Ctx, i, x, m, state):
    """UniC: recompute x_i from x_{i-1} with the new model output m at x_i (order of the last predictor)."""
    last_x, m_prev, m_prev2, order_prev = state
    _, l, a, s = _at(ctx, i)
    _, l_p, _, s_p = _at(ctx, i - 1)
    _, l_pp, _, _ = _at(ctx, i - 2)
    h = 0.5 * (l - l_p)
    phi, b1, b2 = _unipc_b(h)
    base = s / s_p * last_x - a * phi * m_prev
    first_order = base - a * phi * 0.5 * (m - m_prev)
    two = order_prev == 2
    rk = jnp.where(two, (l_pp - l_p) / _safe(l - l_p), 0.0)
    d1 = (m_prev2 - m_prev) / _safe(rk)
    rho0, rho1 = (b1 - b2) / _safe(1.0 - rk), (b2 - rk * b1) / _safe(1.0 - rk)
    second_order = base - a * phi * (rho0 * d1 + rho1 * (m - m_prev))
    corrected = jnp.where(two, second_order, first_order)
    return jnp.where(i > ctx.first, corrected, x)


def unipc_step(ctx: Ctx, i, x, state, key):
    t, l, _, s = _at(ctx, i)
    _, l_n, a_n, s_n = _at(ctx, i + 1)
    _, l_p, _, _ = _at(ctx, i - 1)
    m, _ = ctx.model(x, t, l)
    x = _unipc_correct(ctx, i, x, m, state)
    steps_taken = i - ctx.first
    order = jnp.minimum(jnp.minimum(2, ctx.num_steps - i), steps_taken + 1)
    if not ctx.opts.lower_order_final:
        order = jnp.minimum(2, steps_taken + 1)
    h = 0.5 * (l_n - l)
    phi = jnp.expm1(-h)
    x_next = s_n / s * x - a_n * phi * m
    rk = jnp.where(order == 2, (l_p - l) / _safe(l_n - l), 1.0)
    d1 = (state[1] - m) / _safe(rk)
    x_next = jnp.where(order == 2, x_next - a_n * phi * 0.5 * d1, x_next)
    return x_next, (x, m, state[1], order.astype(jnp.int32))


def init_state(sampler: str, x: Array):
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        return jnp.zeros_like(x)
    if sampler == "unipc":
        return (x, jnp.zeros_like(x), jnp.zeros_like(x), jnp.zeros((), jnp.int32))
    return ()


STEPS = {
    "ddpm": ddpm_step,
    "ddim": ddim_step,
    "euler": euler_step,
    "euler_ancestral": euler_ancestral_step,
    "heun": heun_step,
    "dpmpp_2m": dpmpp_2m_step,
    "dpmpp_2m_sde": dpmpp_2m_sde_step,
    "unipc": unipc_step,
}
SAMPLERS = tuple(STEPS)
STYLE = {
    "ddpm": "ddim",
    "ddim": "ddim",
    "euler": "euler",
    "euler_ancestral": "euler",
    "heun": "euler",
    "dpmpp_2m": "multistep",
    "dpmpp_2m_sde": "multistep",
    "unipc": "multistep",
}
