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
    heun             EDM Algorithm 2 with churn: Euler to s_s, then the trapezoid correction unless s_s = 0;
                     out of pure noise (the logSNR floor) the trapezoid on d(x~/s)/d(1/s) = x0 instead
    flow_heun        Heun in rectified-flow coordinates x_f = x / (alpha + sigma), tau = sigma / (alpha + sigma), where
                     the probability-flow ODE of any VP schedule reads dx_f/dtau = eps - x0 = u (the velocity):
                     Euler to tau_s, then the trapezoid (u + u_s) / 2 unless tau_s = 0 (diffusers'
                     FlowMatchHeunDiscreteScheduler). tau stays in [0, 1], so pure noise needs no special case.
    dpmpp_2m         DPM-Solver++(2M), midpoint form (Lu et al. 2022), lambda = logsnr / 2,
                     h = lambda_s - lambda_t:
                     x_s = sigma_s/sigma_t x - alpha_s expm1(-h) (D0 + D1 / 2), D1 = (D0 - D_prev) h / h_prev
    dpmpp_2m_sde     SDE-DPM-Solver++(2M): x_s = sigma_s/sigma_t e^-h x + alpha_s (1 - e^-2h)(D0 + D1 / 2)
                     + sigma_s sqrt(1 - e^-2h) z
    unipc            UniPC-2 with the B(h) = expm1(-h) ("bh2") variant, x0 form (Zhao et al. 2023): a UniC
                     corrector on x_t from the new model output, then the UniP predictor; one evaluation
                     a step.

Rectified flow (Esser et al. 2024): ddim and euler are the flow Euler step x_f + (tau_s - tau) u exactly (with
x0, eps read from the same output, all three land on (1 - tau_s) x0 + tau_s eps); dpmpp_2m, dpmpp_2m_sde and
unipc depend on the sample only through sigma_s / sigma_t and alpha_s, so they are the same in the flow scale
(diffusers' use_flow_sigmas); heun works in the EDM coordinates s = sigma / alpha, flow_heun in flow time.

Each sampler has one `SamplerSpec` in `SAMPLER_SPECS` (`sampler_spec(name)`): its step, initial state, grid
style, order, noise (always_stochastic, eta, churn), the keywords it takes, its network evaluations per step
(``nfe``, ``steps_for_nfe``), its lower-order-final rule and logSNR floor; `sampling.py` asks only the spec.
`SAMPLER_OPTIONS` are the sampler-specific keywords of `sample`, `GRID_OPTIONS` those of the time grid.

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
from ldm_jax.diffusion.grids import FINALS, LOGSNR_FLOOR, STYLES, Grid
from ldm_jax.diffusion.grids import GRID_OPTIONS as GRID_OPTIONS  # re-exported beside SAMPLER_OPTIONS
from ldm_jax.types import Array, ConfigError, check_choice, nearest


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


# A grid point at (or, by rounding, a hair above) the logSNR floor is a pure-noise start.
FLOOR_LEVEL = LOGSNR_FLOOR + 1e-3


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


def _model_edm(ctx: Ctx, x_edm, t, l):
    """Evaluates the network on an EDM-scale sample; returns (x0, eps), eps = dx~/ds of the probability-flow ODE."""
    a, _ = alpha_sigma_from_logsnr(l)
    return ctx.model(x_edm * a, t, l)


def _eps_edm(ctx: Ctx, x_edm, t, l):
    return _model_edm(ctx, x_edm, t, l)[1]


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
    """EDM Heun: the trapezoid rule on dx~/ds = eps. Out of pure noise (s at the logSNR floor, the start of a
    zero-terminal-SNR grid) it takes the trapezoid on the same ODE written as d(x~/s)/d(1/s) = x0 instead,
    x~_n = r x~ + (1 - r)(x0 + x0_n) / 2 with r = s_n / s: the s-form weighs the slope at s = 4096 over the
    whole interval (an error of order s), the 1/s form stays second order (its interval 1/s_n is small)."""
    _, _, a, _ = _at(ctx, i)
    t_n, l_n, a_n, _ = _at(ctx, i + 1)
    sig_n = jnp.exp(-0.5 * l_n)
    x_edm, t_hat, l_hat, sig_hat = _churn(ctx, i, x / a, key)
    x0, d = _model_edm(ctx, x_edm, t_hat, l_hat)
    x_euler = x_edm + (sig_n - sig_hat) * d
    from_noise = l_hat <= FLOOR_LEVEL

    def corrected(_):
        x0_n, d_n = _model_edm(ctx, x_euler, t_n, l_n)
        ratio = sig_n / sig_hat
        data_form = ratio * x_edm + (1.0 - ratio) * 0.5 * (x0 + x0_n)
        return jnp.where(from_noise, data_form, x_edm + (sig_n - sig_hat) * 0.5 * (d + d_n))

    x_next = jax.lax.cond(sig_n > 0, corrected, lambda _: x_euler, None)
    return x_next * a_n, state


def flow_heun_step(ctx: Ctx, i, x, state, key):
    """Heun's trapezoid on dx_f/dtau = u = eps - x0 in flow coordinates (module doc)."""
    del key
    t, l, a, s = _at(ctx, i)
    t_n, l_n, a_n, s_n = _at(ctx, i + 1)
    tau, tau_n = s / (a + s), s_n / (a_n + s_n)
    x_f = x / (a + s)
    x0, eps = ctx.model(x, t, l)
    u = eps - x0
    x_euler = x_f + (tau_n - tau) * u

    def corrected(_):
        x0_n, eps_n = ctx.model(x_euler * (a_n + s_n), t_n, l_n)
        return x_f + (tau_n - tau) * 0.5 * (u + eps_n - x0_n)

    x_next = jax.lax.cond(tau_n > 0, corrected, lambda _: x_euler, None)
    return x_next * (a_n + s_n), state


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


# ---------------------------------------------------------------------------------------------- specs


def _no_state(x: Array):
    return ()


def _previous_x0(x: Array):
    """DPM-Solver++(2M)'s state: the previous step's x0 estimate (unused by its first-order first step)."""
    return jnp.zeros_like(x)


def _unipc_state(x: Array):
    """(x before the last predictor, last model output, the one before it, the last predictor's order)."""
    return (x, jnp.zeros_like(x), jnp.zeros_like(x), jnp.zeros((), jnp.int32))


# The sampler-specific keywords of `sample`, with the value that leaves every sampler as it is (Options').
_NEUTRAL = {f.name: f.default for f in dataclasses.fields(Options) if f.name != "lower_order_final"}
_DIFFUSERS_FINALS = ("set_alpha_to_one", "zero", "final_sigmas_type")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Everything the package knows about one sampler; `SAMPLER_SPECS` holds one per name.

    Attributes:
      name: the `sampler=` name.
      step: ``step(ctx, i, x, state, key) -> (x_next, state)``, one grid step.
      init_state: ``x -> state`` that the first step gets (a pytree; ``()`` for single-step samplers).
      grid_style: the diffusers scheduler family whose SD timesteps `time_grid(style=...)` reproduces.
      order: the solver's order (diffusers' ``solver_order`` for multistep ones; UniPC-2's corrector raises
        its measured order to 3).
      always_stochastic: draws noise whatever the options (ddpm, euler_ancestral, dpmpp_2m_sde).
      options: the sampler-specific keywords of `sample` it takes, among `SAMPLER_OPTIONS`.
      default_eta: eta when `sample` gets ``eta=None``.
      evals_per_step: network evaluations of one step.
      final_step_evals: evaluations of a step that lands on sigma = 0 when that differs (heun: 1, it skips
        its correction there); None: evals_per_step.
      lower_order_final_below: multistep methods take their last step first order when the target is
        sigma = 0 or num_steps is below this (DPM-Solver++, as diffusers); None: always (UniPC; single-step
        samplers ignore the setting).
      floor_eps_only: the logSNR floor (`grids.LOGSNR_FLOOR`) is applied only under eps prediction; ddim and
        ddpm use alpha = 0 exactly otherwise, as they never divide by alpha then.
      diffusers_final: what picks the sampler's default target in a diffusers scheduler config:
        "set_alpha_to_one" (DDIM: True -> final="zero", False -> "sigma_min"), "zero" (DDPM always ends at the
        clean sample) or "final_sigmas_type" (Euler, Heun, DPM-Solver, UniPC).
    """

    name: str
    step: Callable
    init_state: Callable
    grid_style: str
    order: int
    always_stochastic: bool = False
    options: tuple[str, ...] = ()
    default_eta: float = 0.0
    evals_per_step: int = 1
    final_step_evals: int | None = None
    lower_order_final_below: int | None = None
    floor_eps_only: bool = False
    diffusers_final: str = "final_sigmas_type"

    def __post_init__(self):
        check_choice("grid style", self.grid_style, STYLES)
        check_choice("diffusers final setting", self.diffusers_final, _DIFFUSERS_FINALS)
        for option in self.options:
            check_choice("sampler option", option, _NEUTRAL)
        if self.default_eta and "eta" not in self.options:
            raise ConfigError(f"sampler '{self.name}' has default_eta={self.default_eta} but takes no eta")

    def eta(self, eta: float | None = None) -> float:
        """The eta a run uses: `default_eta` when none is given."""
        return self.default_eta if eta is None else float(eta)

    def is_stochastic(self, eta: float | None = None, churn: float = 0.0) -> bool:
        """Whether a run draws noise (and so needs rng=) with these options (eta=None: default_eta)."""
        return self.always_stochastic or self.eta(eta) > 0 or churn > 0

    def lower_order_final(self, final: str, num_steps: int) -> bool:
        """Whether a multistep method takes its last step at lower order (`Options.lower_order_final`)."""
        if self.lower_order_final_below is None:
            return True
        return final == "zero" or num_steps < self.lower_order_final_below

    def floors_logsnr(self, prediction: str) -> bool:
        """Whether the grid's logSNR is clamped to `grids.LOGSNR_FLOOR` for this prediction type."""
        return prediction == "eps" or not self.floor_eps_only

    def _last_step_evals(self, final: str) -> int:
        check_choice("final", final, FINALS)
        if final == "zero" and self.final_step_evals is not None:
            return self.final_step_evals
        return self.evals_per_step

    def nfe(self, num_steps: int, final: str = "zero") -> int:
        """Network evaluations of a run of `num_steps` steps (img2img: the steps actually run).

        final="sigma_min" assumes a target noise level above 0 (the default for discrete schedules).
        """
        n = int(num_steps)
        if n < 1:
            raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
        return self.evals_per_step * (n - 1) + self._last_step_evals(final)

    def steps_for_nfe(self, nfe: int, final: str = "zero") -> int:
        """The most steps a budget of `nfe` network evaluations pays for (at least 1): heun (nfe + 1) // 2."""
        budget = int(nfe)
        if budget < 1:
            raise ConfigError(f"an NFE budget must be >= 1, got {nfe}")
        return max(1, (budget - self._last_step_evals(final)) // self.evals_per_step + 1)


_CHURN = ("churn", "s_tmin", "s_tmax", "s_noise")

SAMPLER_SPECS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec(
            "ddpm", ddpm_step, _no_state, "ddim", 1, always_stochastic=True, options=("variance",),
            floor_eps_only=True, diffusers_final="zero",
        ),
        SamplerSpec(
            "ddim", ddim_step, _no_state, "ddim", 1, options=("eta",), floor_eps_only=True,
            diffusers_final="set_alpha_to_one",
        ),
        SamplerSpec("euler", euler_step, _no_state, "euler", 1, options=_CHURN),
        SamplerSpec(
            "euler_ancestral", euler_ancestral_step, _no_state, "euler", 1, always_stochastic=True,
            options=("eta",), default_eta=1.0,
        ),
        SamplerSpec("heun", heun_step, _no_state, "euler", 2, options=_CHURN, evals_per_step=2, final_step_evals=1),
        SamplerSpec(
            "flow_heun", flow_heun_step, _no_state, "euler", 2, evals_per_step=2, final_step_evals=1,
            floor_eps_only=True,
        ),
        SamplerSpec("dpmpp_2m", dpmpp_2m_step, _previous_x0, "multistep", 2, lower_order_final_below=15),
        SamplerSpec(
            "dpmpp_2m_sde", dpmpp_2m_sde_step, _previous_x0, "multistep", 2, always_stochastic=True,
            lower_order_final_below=15,
        ),
        SamplerSpec("unipc", unipc_step, _unipc_state, "multistep", 2),
    )
}
SAMPLERS = tuple(SAMPLER_SPECS)
# Sampler-specific keywords of `sample` (the union of the specs' options); GRID_OPTIONS are the grid's.
SAMPLER_OPTIONS = tuple(o for o in _NEUTRAL if any(o in spec.options for spec in SAMPLER_SPECS.values()))


def sampler_spec(name: str) -> SamplerSpec:
    """The spec of sampler `name`; a one-line ConfigError with the nearest name otherwise."""
    spec = SAMPLER_SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        # "DPM++ 2M" / "dpm++" read as dpmpp..., so that the suggestion is not ddpm.
        key = str(name).lower().replace("+", "p").replace("-", "_").replace(" ", "_")
        raise ConfigError(
            f"unknown sampler '{name}'{nearest(key, SAMPLERS)}; choose one of: {', '.join(sorted(SAMPLERS))}"
        )
    return spec


def _names(items) -> str:
    items = list(items)
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def check_sampler_options(name: str, **given) -> None:
    """Raises a one-line ConfigError when a given option is unknown or set for a sampler that does not take it.

    An option counts as set unless it is None or its neutral value (`Options`' default: eta 0, churn 0,
    s_tmin 0, s_tmax inf, s_noise 1, variance "small"), so `sample` passes all its keywords as they are.
    """
    spec = sampler_spec(name)
    for key in given:
        if key not in _NEUTRAL:
            raise ConfigError(
                f"unknown sampler option '{key}'{nearest(key, SAMPLER_OPTIONS)}; "
                f"choose among: {', '.join(SAMPLER_OPTIONS)}"
            )
    wrong = [(k, v) for k, v in given.items() if k not in spec.options and v is not None and v != _NEUTRAL[k]]
    if not wrong:
        return
    takers = {k: [s.name for s in SAMPLER_SPECS.values() if k in s.options] for k, _ in wrong}
    takes = f"it takes {', '.join(spec.options)}" if spec.options else "it takes none of these options"
    raise ConfigError(
        f"sampler '{name}' does not take {' nor '.join(f'{k}={v!r}' for k, v in wrong)}: "
        + "; ".join(f"{k} is for {_names(takers[k])}" for k, _ in wrong)
        + f" ({takes})"
    )
