"""Noise schedules as logSNR(t) on continuous time t in [0, 1], variance preserving.

Every schedule is a frozen dataclass registered as a JAX pytree (arrays and parameters are leaves, settings
are static), so it can be closed over or passed through `jax.jit`, and a learned schedule's parameters get
gradients. From ``logsnr(t) = log(alpha^2 / sigma^2)`` follow

    alpha^2 = sigmoid(logsnr),   sigma^2 = sigmoid(-logsnr)       (VP: alpha^2 + sigma^2 = 1)
    x_t = alpha x_0 + sigma eps                                     (q_sample)
    sigma_edm = sigma / alpha = exp(-logsnr / 2)                    (Karras et al. 2022, on x / alpha)

t = 0 is the clean end (largest logSNR), t = 1 the noisy end.

Discrete 1000-step schedules (`linear`: Ho et al. 2020; `scaled_linear`: Stable Diffusion) are stored as the
logSNR of diffusers' ``alphas_cumprod`` table. The network timestep n = 0..T-1 sits at t = (n + 1) / T, so
t = 1 is timestep T-1 and t = 0 is the clean sample (DDPM's alpha_bar_0 = 1, diffusers' ``set_alpha_to_one``).
Between table entries sigma_edm is interpolated linearly in n (diffusers' Euler-type schedulers do the same
for fractional timesteps), with sigma_edm = 0 at n = -1. ``s.timestep(t) = T t - 1`` is the float timestep to
feed an SD U-Net and ``s.t_of_timestep(n)`` its inverse.

Continuous schedules feed ``timestep(t) = 1000 t``. `cosine` (Nichol & Dhariwal 2021), `sigmoid` (Chen 2023),
`laplace` (Hang et al. 2024) and `flow` (rectified flow, Liu et al. 2022 / Esser et al. 2024) reach
logSNR = +-inf at the ends; pass ``logsnr_min``/``logsnr_max`` to truncate them (t is remapped linearly so the
schedule stays strictly monotone, as in Hoogeboom et al. 2023). `edm` is the Karras sigma ramp (rho = 7).
`learned` (Kingma et al. 2021, VDM) is a monotone logSNR(t) whose parameters are a plain pytree
(``LearnedSchedule(learned_schedule_init(rng))``), trained together with the model.

Any schedule can be shifted, ``logsnr(t) - 2 log(shift)`` (shift = resolution / base resolution as in
simple diffusion, or SD3's shift), or rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion._util import alpha_sigma_from_logsnr, expand_like, pytree_dataclass
from ldm_jax.diffusion.grids import LOGSNR_FLOOR
from ldm_jax.types import Array, ConfigError, PRNGKey, PyTree, check_choice

CONTINUOUS_TIMESTEP_SCALE = 1000.0


def _float(t) -> Array:
    return jnp.asarray(t, dtype=jnp.result_type(float))


class Schedule:
    """Base class. Subclasses define `logsnr(t)` and its inverse `t_from_logsnr(logsnr)`."""

    def logsnr(self, t) -> Array:
        raise NotImplementedError

    def t_from_logsnr(self, logsnr) -> Array:
        raise NotImplementedError

    def alpha_sigma(self, t) -> tuple[Array, Array]:
        """(alpha, sigma) with alpha^2 + sigma^2 = 1."""
        return alpha_sigma_from_logsnr(self.logsnr(t))

    def sigma(self, t) -> Array:
        """EDM noise level sigma / alpha = exp(-logsnr / 2)."""
        return jnp.exp(-0.5 * self.logsnr(t))

    def t_from_sigma(self, sigma) -> Array:
        return self.t_from_logsnr(-2.0 * jnp.log(_float(sigma)))

    @property
    def num_train_timesteps(self) -> int | None:
        """T for discrete schedules, None for continuous ones."""
        return None

    @property
    def t_min(self) -> float:
        """Smallest t a sampler evaluates the network at by default (1/T for discrete schedules)."""
        return 0.0

    def timestep(self, t) -> Array:
        """The float timestep to feed the network: T t - 1 for discrete schedules, 1000 t otherwise."""
        return _float(t) * CONTINUOUS_TIMESTEP_SCALE

    def t_of_timestep(self, n) -> Array:
        return _float(n) / CONTINUOUS_TIMESTEP_SCALE

    def uniform_grid_problem(self) -> str | None:
        """Why an N-step grid uniform in t cannot sample this schedule (None: it can).

        Every sampler ends with a first-order jump from t_max / N to sigma = 0 (error ~ sigma_edm^2 there) and
        starts with a step out of pure noise (error ~ alpha(t_1)^2); where sigma_edm^2 vanishes slower than t
        near t = 0, or alpha^2 slower than 1 - t near t = 1, those errors shrink slower than 1 / N and no sampler
        reaches even first order on a uniform grid.
        """
        return None


# ----------------------------------------------------------------------------------------------------------
# Discrete (table) schedules.


@pytree_dataclass(data_fields=("logsnr_table",))
@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteSchedule(Schedule):
    """A T-step table: ``logsnr_table[n] = log(abar_n / (1 - abar_n))`` for network timestep n = 0..T-1."""

    logsnr_table: Array

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> DiscreteSchedule:
        ab = np.asarray(alphas_cumprod, dtype=np.float64)
        if ab.ndim != 1 or ab.size < 2 or np.any(np.diff(ab) >= 0) or ab[0] > 1 or ab[-1] < 0:
            raise ConfigError(
                "alphas_cumprod must be a strictly decreasing 1-D table in [0, 1] with >= 2 entries"
            )
        with np.errstate(divide="ignore"):
            return cls(np.log(ab) - np.log1p(-ab))

    @classmethod
    def from_betas(cls, betas) -> DiscreteSchedule:
        return cls.from_alphas_cumprod(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))

    @property
    def alphas_cumprod(self) -> Array:
        return jax.nn.sigmoid(jnp.asarray(self.logsnr_table))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.logsnr_table.shape[0])

    @property
    def t_min(self) -> float:
        return 1.0 / self.num_train_timesteps

    def timestep(self, t) -> Array:
        return _float(t) * self.num_train_timesteps - 1.0

    def t_of_timestep(self, n) -> Array:
        return (_float(n) + 1.0) / self.num_train_timesteps

    def _sigma_ext(self) -> tuple[Array, Array]:
        """(logsnr, sigma_edm) at n = -1 .. T-1; a zero-SNR end's sigma = inf is interpolated towards as
        max(4096, sigma_{T-2}) (`grids.LOGSNR_FLOOR`, diffusers' 2^-24 stand-in), so every sigma below that is
        reached at some t < 1 and logSNR / karras grids get a consistent t; t = 1 itself keeps logsnr = -inf."""
        table = jnp.asarray(self.logsnr_table, dtype=jnp.result_type(float))
        logsnr_ext = jnp.concatenate([jnp.full((1,), jnp.inf, table.dtype), table])  # n = -1 .. T-1
        sig = jnp.exp(-0.5 * logsnr_ext)
        stand_in = jnp.maximum(math.exp(-0.5 * LOGSNR_FLOOR), sig[-2])
        return logsnr_ext, jnp.where(jnp.isinf(sig), stand_in, sig)

    def logsnr(self, t) -> Array:
        num = self.num_train_timesteps
        logsnr_ext, sig = self._sigma_ext()
        n = jnp.clip(_float(t) * num - 1.0, -1.0, num - 1.0)
        k = jnp.clip(jnp.floor(n), -1.0, num - 2.0)
        w = n - k
        i = (k + 1).astype(jnp.int32)
        lo, hi = sig[i], sig[i + 1]
        interp = -2.0 * jnp.log(lo + w * (hi - lo))
        return jnp.where(w == 0, logsnr_ext[i], jnp.where(w == 1, logsnr_ext[i + 1], interp))

    def t_from_logsnr(self, logsnr) -> Array:
        num = self.num_train_timesteps
        _, sig = self._sigma_ext()
        s = jnp.exp(-0.5 * _float(logsnr))
        j = jnp.clip(jnp.searchsorted(sig, s, side="right") - 1, 0, num - 1)
        lo, hi = sig[j], sig[j + 1]
        w = jnp.clip(jnp.where(hi > lo, (s - lo) / (hi - lo), 0.0), 0.0, 1.0)
        t = (j + w) / num
        return jnp.where(s >= sig[-1], 1.0, t)


def linear(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> DiscreteSchedule:
    """DDPM's linear betas (Ho et al. 2020): beta_n = linspace(beta_start, beta_end, T)."""
    return DiscreteSchedule.from_betas(
        np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    )


def scaled_linear(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> DiscreteSchedule:
    """Stable Diffusion's betas: beta_n = linspace(sqrt(beta_start), sqrt(beta_end), T)^2."""
    root = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=np.float64)
    return DiscreteSchedule.from_betas(root**2)


# ----------------------------------------------------------------------------------------------------------
# Continuous closed-form schedules.


class _Analytic(Schedule):
    """Closed-form logSNR with optional truncation to [logsnr_min, logsnr_max] by remapping t linearly."""

    logsnr_min: float | None
    logsnr_max: float | None

    def _raw_logsnr(self, t: Array) -> Array:
        raise NotImplementedError

    def _raw_t(self, logsnr: Array) -> Array:
        raise NotImplementedError

    def _bounds(self) -> tuple[Array, Array]:
        lo = _float(0.0) if self.logsnr_max is None else self._raw_t(_float(self.logsnr_max))
        hi = _float(1.0) if self.logsnr_min is None else self._raw_t(_float(self.logsnr_min))
        return lo, hi

    def logsnr(self, t) -> Array:
        lo, hi = self._bounds()
        return self._raw_logsnr(lo + _float(t) * (hi - lo))

    def t_from_logsnr(self, logsnr) -> Array:
        lo, hi = self._bounds()
        return (self._raw_t(_float(logsnr)) - lo) / (hi - lo)


@pytree_dataclass(data_fields=())
@dataclasses.dataclass(frozen=True)
class Cosine(_Analytic):
    """iDDPM cosine (Nichol & Dhariwal 2021): abar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2).

    logsnr = log cos^2(a) - log(sin(a - a0) sin(a + a0)), a = (t + s) / (1 + s) pi / 2, a0 = a(0).
    """

    s: float = 0.008
    logsnr_min: float | None = None
    logsnr_max: float | None = None

    def _raw_logsnr(self, t):
        k = 0.5 * math.pi / (1.0 + self.s)
        cos_a = jnp.sin((1.0 - t) * k)  # cos(a) without the rounding of cos(pi / 2)
        return 2.0 * jnp.log(cos_a) - jnp.log(jnp.sin(t * k)) - jnp.log(jnp.sin((t + 2.0 * self.s) * k))

    def _raw_t(self, logsnr):
        a0 = 0.5 * math.pi * self.s / (1.0 + self.s)
        alpha2, sigma2 = jax.nn.sigmoid(logsnr), jax.nn.sigmoid(-logsnr)
        a = jnp.arctan2(
            jnp.sqrt(math.sin(a0) ** 2 + math.cos(a0) ** 2 * sigma2), math.cos(a0) * jnp.sqrt(alpha2)
        )
        return a * (1.0 + self.s) * 2.0 / math.pi - self.s


@pytree_dataclass(data_fields=())
@dataclasses.dataclass(frozen=True)
class Sigmoid(_Analytic):
    """Sigmoid schedule (Chen 2023, Alg. 1): abar(t) = (v_end - sig(u)) / (v_end - v_start).

    u = (t (end - start) + start) / tau, v_x = sig(x / tau);
    logsnr = log(v_end - sig(u)) - log(sig(u) - v_start).
    """

    start: float = -3.0
    end: float = 3.0
    tau: float = 1.0
    logsnr_min: float | None = None
    logsnr_max: float | None = None

    def _raw_logsnr(self, t):
        v_start, v_end = jax.nn.sigmoid(self.start / self.tau), jax.nn.sigmoid(self.end / self.tau)
        v = jax.nn.sigmoid((t * (self.end - self.start) + self.start) / self.tau)
        return jnp.log(v_end - v) - jnp.log(v - v_start)

    def _raw_t(self, logsnr):
        v_start, v_end = jax.nn.sigmoid(self.start / self.tau), jax.nn.sigmoid(self.end / self.tau)
        span = v_end - v_start
        v = jnp.where(
            logsnr > 0, v_start + jax.nn.sigmoid(-logsnr) * span, v_end - jax.nn.sigmoid(logsnr) * span
        )
        u = jnp.log(v) - jnp.log1p(-v)
        return (u * self.tau - self.start) / (self.end - self.start)


@pytree_dataclass(data_fields=())
@dataclasses.dataclass(frozen=True)
class Laplace(_Analytic):
    """Laplace schedule (Hang et al. 2024): logsnr = mu - b sgn(0.5 - t) log(1 - 2 |t - 0.5|)."""

    mu: float = 0.0
    b: float = 0.5
    logsnr_min: float | None = None
    logsnr_max: float | None = None

    def _raw_logsnr(self, t):
        # 1 - 2|t - 0.5| = 2 min(t, 1 - t), formed without rounding t ~ 1e-8 (logsnr spacing's clean end) to 0
        return self.mu - self.b * jnp.sign(0.5 - t) * jnp.log(2.0 * jnp.minimum(t, 1.0 - t))

    def uniform_grid_problem(self) -> str | None:
        """Untruncated, sigma_edm^2 ~ e^-mu (2t)^b near t = 0 and alpha^2 ~ e^mu (2(1 - t))^b near t = 1."""
        if self.b >= 1.0 or (self.logsnr_min is not None and self.logsnr_max is not None):
            return None
        sigma_50 = math.exp(-0.5 * (self.mu - self.b * math.log(2.0 / 50)))  # sigma_edm at t = 1/50
        return (
            f"the laplace schedule (b={self.b:g}) has sigma_edm^2 ~ t^{self.b:g} near t = 0 and alpha^2 ~ "
            f"(1 - t)^{self.b:g} near t = 1, so on a grid uniform in t every sampler converges at order "
            f"{self.b:g} < 1 (at 50 steps the last step still jumps from sigma_edm = {sigma_50:.2f} to 0)"
        )

    def _raw_t(self, logsnr):
        z = (logsnr - self.mu) / self.b
        return jnp.where(z >= 0, 0.5 * jnp.exp(-jnp.abs(z)), 1.0 - 0.5 * jnp.exp(-jnp.abs(z)))


@pytree_dataclass(data_fields=())
@dataclasses.dataclass(frozen=True)
class Flow(_Analytic):
    """Rectified flow x_t = (1 - t) x_0 + t eps seen as VP: logsnr = 2 log((1 - t) / t).

    The flow-scale sample is x_flow = x_vp / (alpha + sigma); t = sigmoid(-logsnr / 2) is the flow time.
    """

    logsnr_min: float | None = None
    logsnr_max: float | None = None

    def _raw_logsnr(self, t):
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def _raw_t(self, logsnr):
        return jax.nn.sigmoid(-0.5 * logsnr)


@pytree_dataclass(data_fields=())
@dataclasses.dataclass(frozen=True)
class EDM(_Analytic):
    """Karras et al. 2022 ramp: sigma(t) = (s_max^(1/rho) + (1 - t)(s_min^(1/rho) - s_max^(1/rho)))^rho."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    logsnr_min: float | None = None
    logsnr_max: float | None = None

    def _raw_logsnr(self, t):
        a, b = self.sigma_max ** (1.0 / self.rho), self.sigma_min ** (1.0 / self.rho)
        return -2.0 * self.rho * jnp.log(a + (1.0 - t) * (b - a))

    def _raw_t(self, logsnr):
        a, b = self.sigma_max ** (1.0 / self.rho), self.sigma_min ** (1.0 / self.rho)
        return 1.0 - (jnp.exp(-logsnr / (2.0 * self.rho)) - a) / (b - a)


# ----------------------------------------------------------------------------------------------------------
# Wrappers.


class _Wrapper(Schedule):
    inner: Schedule

    @property
    def num_train_timesteps(self):
        return self.inner.num_train_timesteps

    @property
    def t_min(self):
        return self.inner.t_min

    def timestep(self, t):
        return self.inner.timestep(t)

    def t_of_timestep(self, n):
        return self.inner.t_of_timestep(n)

    def uniform_grid_problem(self):
        return self.inner.uniform_grid_problem()


@pytree_dataclass(data_fields=("inner",))
@dataclasses.dataclass(frozen=True, eq=False)
class Shifted(_Wrapper):
    """logsnr(t) - 2 log(shift): shift > 1 moves every t to more noise (simple diffusion; SD3's shift)."""

    inner: Schedule
    shift: float = 1.0

    def logsnr(self, t):
        return self.inner.logsnr(t) - 2.0 * math.log(self.shift)

    def t_from_logsnr(self, logsnr):
        return self.inner.t_from_logsnr(_float(logsnr) + 2.0 * math.log(self.shift))


@pytree_dataclass(data_fields=("inner",))
@dataclasses.dataclass(frozen=True, eq=False)
class ZeroTerminalSNR(_Wrapper):
    """alpha'(t) = (alpha(t) - alpha(1)) alpha(0) / (alpha(0) - alpha(1)) (Lin et al. 2023, Alg. 1).

    sigma'^2 = (1 - alpha')(1 + alpha') is formed from sigma^2 without cancellation near t = 0.
    """

    inner: Schedule

    def _ends(self):
        (a0, s0), (a1, _) = self.inner.alpha_sigma(0.0), self.inner.alpha_sigma(1.0)
        return a0, s0, a1

    def logsnr(self, t):
        a0, s0, a1 = self._ends()
        a, s = self.inner.alpha_sigma(t)
        a_new = (a - a1) * a0 / (a0 - a1)
        one_minus = s**2 / (1.0 + a) + a1 * (s**2 - s0**2) / ((a0 + a) * (a0 - a1))
        return 2.0 * jnp.log(a_new) - jnp.log(one_minus) - jnp.log1p(a_new)

    def t_from_logsnr(self, logsnr):
        a0, s0, a1 = self._ends()
        a_new, s_new = alpha_sigma_from_logsnr(_float(logsnr))
        a = a_new * (a0 - a1) / a0 + a1
        one_minus = s_new**2 / (1.0 + a_new) * (a0 - a1) / a0 + a1 * s0**2 / ((1.0 + a0) * a0)
        return self.inner.t_from_logsnr(2.0 * jnp.log(a) - jnp.log(one_minus) - jnp.log1p(a))


# ----------------------------------------------------------------------------------------------------------
# Learned schedule (Kingma et al. 2021, VDM), parameters as an explicit pytree:
#
#     gamma~(t) = softplus(w1) t + 1/H sum_h softplus(w3_h) 2 (sigmoid(softplus(w2_h) (2t - 1) + b2_h) - 1/2)
#     logsnr(t) = logsnr_max - (logsnr_max - logsnr_min) (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0))
#
# Every weight enters through a softplus, so gamma~ is increasing in t and logsnr strictly decreasing, with
# logsnr(0) = logsnr_max and logsnr(1) = logsnr_min (both endpoints are entries of the params dict, so they can
# be trained too or held fixed by the optimizer). No Flax: ``params = learned_schedule_init(rng)``, then
# ``LearnedSchedule(params)`` is a pytree whose leaves are those params; gradients of a loss built on it reach
# them, and it is trained together with the model.

_BISECTION_STEPS = 40


def learned_schedule_init(
    rng: PRNGKey, hidden: int = 64, logsnr_min: float = -10.0, logsnr_max: float = 10.0, scale: float = 0.1
) -> dict:
    """Parameters of a learned schedule that starts close to linear logSNR between the two endpoints."""
    if not logsnr_max > logsnr_min:
        raise ConfigError(f"need logsnr_max > logsnr_min, got {logsnr_max} <= {logsnr_min}")
    k2, k3, kb = jax.random.split(rng, 3)
    return {
        "w1": jnp.asarray(1.0),
        "w2": scale * jax.random.normal(k2, (hidden,)),
        "b2": scale * jax.random.normal(kb, (hidden,)),
        "w3": scale * jax.random.normal(k3, (hidden,)) - 3.0,
        "logsnr_min": jnp.asarray(float(logsnr_min)),
        "logsnr_max": jnp.asarray(float(logsnr_max)),
    }


def _gamma_tilde(params: PyTree, t: Array) -> Array:
    t = t[..., None]
    hidden = jax.nn.sigmoid(jax.nn.softplus(params["w2"]) * (2.0 * t - 1.0) + params["b2"])
    bump = jnp.mean(jax.nn.softplus(params["w3"]) * 2.0 * (hidden - 0.5), axis=-1)
    return jax.nn.softplus(params["w1"]) * t[..., 0] + bump


@pytree_dataclass(data_fields=("params",))
@dataclasses.dataclass(frozen=True, eq=False)
class LearnedSchedule(Schedule):
    """VDM-style learned schedule; `params` from `learned_schedule_init`."""

    params: PyTree = None

    def __post_init__(self):
        if self.params is None:
            raise ConfigError("the learned schedule needs params=learned_schedule_init(rng)")

    def logsnr(self, t) -> Array:
        t = _float(t)
        g0, g1 = _gamma_tilde(self.params, jnp.zeros(())), _gamma_tilde(self.params, jnp.ones(()))
        frac = (_gamma_tilde(self.params, t) - g0) / (g1 - g0)
        lo, hi = self.params["logsnr_min"], self.params["logsnr_max"]
        return hi - (hi - lo) * frac

    def t_from_logsnr(self, logsnr) -> Array:
        """Inverse by bisection (40 halvings of [0, 1]); logsnr outside the range maps to 0 or 1."""
        target = _float(logsnr)

        def body(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            above = self.logsnr(mid) > target  # logsnr decreases in t: the root lies right of mid
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, body, (jnp.zeros_like(target), jnp.ones_like(target)))
        return 0.5 * (lo + hi)


def shifted(schedule: Schedule, shift: float) -> Schedule:
    """The schedule with logsnr(t) - 2 log(shift); shift = 1 returns it unchanged."""
    if not shift > 0:
        raise ConfigError(f"shift must be > 0, got {shift}")
    return schedule if shift == 1.0 else Shifted(schedule, float(shift))


def zero_terminal_snr(schedule: Schedule) -> Schedule:
    """Rescales so that alpha(1) = 0 while alpha at the clean end is kept (Lin et al. 2023, Algorithm 1).

    A discrete table is rescaled exactly as diffusers' ``rescale_betas_zero_snr`` (alpha at timestep 0 kept).
    """
    if isinstance(schedule, DiscreteSchedule):
        ab = 1.0 / (1.0 + np.exp(-np.asarray(schedule.logsnr_table, dtype=np.float64)))  # float64
        root = np.sqrt(ab)
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        return DiscreteSchedule.from_alphas_cumprod(root**2)
    return ZeroTerminalSNR(schedule)


_BUILDERS = {
    "linear": linear,
    "scaled_linear": scaled_linear,
    "cosine": Cosine,
    "sigmoid": Sigmoid,
    "laplace": Laplace,
    "edm": EDM,
    "flow": Flow,
    "learned": LearnedSchedule,
}

# The names `get_schedule` builds.
SCHEDULES = tuple(_BUILDERS)


def get_schedule(name: str, *, shift: float = 1.0, zero_snr: bool = False, **kwargs) -> Schedule:
    """Builds a schedule by name: linear, scaled_linear, cosine, sigmoid, laplace, edm, flow, learned.

    ``kwargs`` go to the schedule (e.g. ``get_schedule("sigmoid", start=0, end=3, tau=0.5)``; ``learned``
    needs ``params=learned_schedule_init(rng)``). ``zero_snr`` rescales to zero terminal SNR, then ``shift``
    is applied.
    """
    check_choice("schedule", name, list(_BUILDERS))
    builder = _BUILDERS[name]
    try:
        schedule = builder(**kwargs)
    except TypeError as e:
        raise ConfigError(f"schedule '{name}': {e}") from None
    if zero_snr:
        schedule = zero_terminal_snr(schedule)
    return shifted(schedule, shift)


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """x_t = alpha(t) x_0 + sigma(t) eps; t (B,) or scalar, broadcast over x0's trailing axes."""
    alpha, sigma = schedule.alpha_sigma(t)
    return expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * noise
