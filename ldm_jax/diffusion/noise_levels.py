"""Noise-level (time) sampling for training, separate from loss weighting.

Each sampler is a pure function ``(rng, batch, **options) -> t`` of shape (batch,) in [0, 1]:

    uniform          t ~ U[t_min, t_max]                                          (Ho et al. 2020)
    logit_normal     t = sigmoid(m + s n), n ~ N(0, 1)                             (Esser et al. 2024, SD3)
    lognormal_sigma  ln(sigma/alpha) ~ N(P_mean, P_std^2), t = schedule.t_from_sigma (Karras et al. 2022)
    low_discrepancy  t_i = (u + i / batch) mod 1, u ~ U[0, 1)                      (Kingma et al. 2021, VDM)
    mode             t = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U[0, 1]          (Esser et al. 2024, eq. 20)
    cosmap           t = 1 - 1 / (tan(pi u / 2) + 1), u ~ U[0, 1]                  (Esser et al. 2024, eq. 21)

The last two (and logit_normal) are SD3's rectified-flow time densities: t is the flow time before any shift
(``get_schedule("flow", shift=3.0)`` then moves every t to more noise, as SD3 does). `mode` with scale s in
[-1, 2 / (pi - 2)] puts more mass in the middle for s > 0 (s = 0 is uniform); `cosmap` has density
2 / (pi (1 - 2t + 2t^2)), the "cosine" schedule's logSNR mapped onto flow time.

``sample_t(name, rng, batch, schedule=s, discrete=True)`` additionally snaps t onto a discrete schedule's
training grid t = (n + 1) / T, n in 0..T-1 (SD-style integer timesteps).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from ldm_jax.types import Array, ConfigError, PRNGKey, check_choice


def uniform(rng: PRNGKey, batch: int, *, t_min: float = 0.0, t_max: float = 1.0) -> Array:
    return jax.random.uniform(rng, (batch,), minval=t_min, maxval=t_max)


def logit_normal(rng: PRNGKey, batch: int, *, mean: float = 0.0, std: float = 1.0) -> Array:
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))


def lognormal_sigma(rng: PRNGKey, batch: int, *, schedule, p_mean: float = -1.2, p_std: float = 1.2) -> Array:
    """EDM's training distribution ln(sigma) ~ N(P_mean, P_std^2), mapped to t through the schedule."""
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch,)))
    return jnp.clip(schedule.t_from_sigma(sigma), 0.0, 1.0)


def low_discrepancy(rng: PRNGKey, batch: int) -> Array:
    """Stratified times: one uniform offset shifted by i / batch (VDM's variance reduction)."""
    u = jax.random.uniform(rng, ())
    return jnp.mod(u + jnp.arange(batch) / batch, 1.0)


def mode(rng: PRNGKey, batch: int, *, scale: float = 1.29) -> Array:
    """SD3's mode sampling (eq. 20); `scale` in [-1, 2 / (pi - 2)] keeps the map monotone (1.29 is SD3's)."""
    if not -1.0 <= scale <= 2.0 / (jnp.pi - 2.0):
        raise ConfigError(f"noise sampler 'mode' needs scale in [-1, {2.0 / (jnp.pi - 2.0):.4f}], got {scale}")
    u = jax.random.uniform(rng, (batch,))
    return 1.0 - u - scale * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)


def cosmap(rng: PRNGKey, batch: int) -> Array:
    """SD3's CosMap sampling (eq. 21): t = 1 - 1 / (tan(pi u / 2) + 1)."""
    u = jax.random.uniform(rng, (batch,))
    return 1.0 - 1.0 / (jnp.tan(0.5 * jnp.pi * u) + 1.0)


_SAMPLERS = {
    "uniform": uniform,
    "logit_normal": logit_normal,
    "lognormal_sigma": lognormal_sigma,
    "low_discrepancy": low_discrepancy,
    "mode": mode,
    "cosmap": cosmap,
}
NOISE_SAMPLERS = tuple(_SAMPLERS)


def snap_to_timesteps(t: Array, num_train_timesteps: int) -> Array:
    """Rounds t up to the grid (n + 1) / T, so t in ((n) / T, (n + 1) / T] becomes timestep n."""
    n = jnp.clip(jnp.ceil(t * num_train_timesteps) - 1.0, 0.0, num_train_timesteps - 1.0)
    return (n + 1.0) / num_train_timesteps


def sample_t(
    name: str, rng: PRNGKey, batch: int, *, schedule=None, discrete: bool = False, **kwargs
) -> Array:
    """Draws (batch,) training times with the sampler `name`; kwargs are that sampler's options."""
    check_choice("noise sampler", name, NOISE_SAMPLERS)
    fn = _SAMPLERS[name]
    params = inspect.signature(fn).parameters
    for key in kwargs:
        if key not in params or key in ("rng", "batch", "schedule"):
            raise ConfigError(f"noise sampler '{name}' has no option '{key}'")
    if "schedule" in params:
        if schedule is None:
            raise ConfigError(f"noise sampler '{name}' needs schedule=")
        kwargs["schedule"] = schedule
    t = fn(rng, batch, **kwargs)
    if discrete:
        num = None if schedule is None else schedule.num_train_timesteps
        if num is None:
            raise ConfigError("discrete=True needs a discrete schedule (linear, scaled_linear)")
        t = snap_to_timesteps(t, num)
    return t
