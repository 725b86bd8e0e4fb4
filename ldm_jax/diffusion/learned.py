"""A learned monotone noise schedule (Kingma et al. 2021, VDM), parameters as an explicit pytree.

    gamma~(t) = softplus(w1) t + 1/H sum_h softplus(w3_h) 2 (sigmoid(softplus(w2_h) (2t - 1) + b2_h) - 1/2)
    logsnr(t) = logsnr_max - (logsnr_max - logsnr_min) (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0))

Every weight enters through a softplus, so gamma~ is increasing in t and logsnr strictly decreasing, with
logsnr(0) = logsnr_max and logsnr(1) = logsnr_min (both endpoints are entries of the params dict, so they can
be trained too or held fixed by the optimizer). No Flax: ``params = learned_schedule_init(rng)``, then
``LearnedSchedule(params)`` is a pytree whose leaves are those params; gradients of a loss built on it reach
them, and it is trained together with the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ldm_jax.diffusion._util import pytree_dataclass
from ldm_jax.diffusion.schedules import Schedule, _float
from ldm_jax.types import Array, ConfigError, PRNGKey, PyTree

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
