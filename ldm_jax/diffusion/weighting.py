"""Loss weightings as functions of logSNR, all expressed in eps-MSE units.

The weighted loss is L = w(logsnr) ||eps_hat - eps||^2 (Kingma & Gao 2023). A weighting defined on another
error converts through ||x0_hat - x0||^2 = e^-logsnr ||eps_hat - eps||^2, so with snr = e^logsnr:

    name           w(logsnr) (eps units)          the same loss written as
    uniform        1                              eps-MSE, L_simple (Ho et al. 2020)
    snr            1                              SNR-weighted x0-MSE (Hang et al. 2023, Sec. 3); = uniform
    x0             1 / snr                        plain x0-MSE
    v              1 + 1 / snr                    v-MSE (Salimans & Ho 2022) = (snr + 1) x0-MSE
    truncated_snr  max(1, 1 / snr)                max(snr, 1) x0-MSE (Salimans & Ho 2022)
    min_snr        min(1, gamma / snr)            min(snr, gamma) x0-MSE (Hang et al. 2023)
    p2             1 / (k + snr)^gamma            P2 (Choi et al. 2022)
    edm            1 + 1 / (snr sigma_data^2)     lambda(sigma) ||D - x0||^2 (Karras et al. 2022)
    sigmoid        sigmoid(bias - logsnr)         Kingma & Gao 2023
    elbo           -1/2 dlogsnr/dt                continuous-time VLB with t ~ U[0, 1] (Kingma et al. 2021)
    flow           (1 + e^(-logsnr/2))^2          velocity MSE ||u_hat - u||^2, u = eps - x0 (rectified flow)
    logit_normal   flow x pi_ln(tau)              velocity MSE x SD3's logit-normal density (mean, std)
    cosmap         flow x pi_cm(tau)              velocity MSE x SD3's CosMap density 2 / (pi (1 - 2tau + 2tau^2))

tau = sigmoid(-logsnr / 2) is the flow time of the noise level (x_t = (1 - tau) x0 + tau eps up to scale).
SD3 (Esser et al. 2024, Sec. 3.1) writes every formulation as a velocity MSE weighted by w(tau) pi(tau) with t
drawn from a density pi: draw t with ``noise_sampling="logit_normal"`` and weight with "flow", or draw t
uniformly and weight with "logit_normal"; the two have the same expected loss (different variance).

Special cases: min_snr(gamma -> inf) = snr = uniform; p2(gamma = 0) = uniform; edm(sigma_data = 1) = v;
sigmoid(bias -> inf) = uniform. ``elbo`` depends on the schedule's time derivative, so it is computed by
`ldm_jax.diffusion.loss`, not here. logSNR is clipped to +-30 before exponentials, where every weighting has
saturated, so weights stay finite at zero-terminal-SNR and clean ends.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from ldm_jax.types import Array, ConfigError, check_choice

LOGSNR_CLIP = 30.0


def _clip(logsnr: Array) -> Array:
    return jnp.clip(logsnr, -LOGSNR_CLIP, LOGSNR_CLIP)


def uniform(logsnr: Array) -> Array:
    return jnp.ones_like(logsnr)


def snr(logsnr: Array) -> Array:
    return jnp.ones_like(logsnr)


def x0(logsnr: Array) -> Array:
    return jnp.exp(-_clip(logsnr))


def v(logsnr: Array) -> Array:
    return 1.0 + jnp.exp(-_clip(logsnr))


def truncated_snr(logsnr: Array) -> Array:
    return jnp.maximum(1.0, jnp.exp(-_clip(logsnr)))


def min_snr(logsnr: Array, gamma: float = 5.0) -> Array:
    return jnp.minimum(1.0, gamma * jnp.exp(-_clip(logsnr)))


def p2(logsnr: Array, k: float = 1.0, gamma: float = 1.0) -> Array:
    return (k + jnp.exp(_clip(logsnr))) ** (-gamma)


def edm(logsnr: Array, sigma_data: float = 0.5) -> Array:
    return 1.0 + jnp.exp(-_clip(logsnr)) / sigma_data**2


def sigmoid(logsnr: Array, bias: float = 0.0) -> Array:
    return jax.nn.sigmoid(bias - _clip(logsnr))


def flow(logsnr: Array) -> Array:
    return (1.0 + jnp.exp(-0.5 * _clip(logsnr))) ** 2


def _flow_time(logsnr: Array) -> Array:
    return jax.nn.sigmoid(-0.5 * _clip(logsnr))


def logit_normal(logsnr: Array, mean: float = 0.0, std: float = 1.0) -> Array:
    tau = jnp.clip(_flow_time(logsnr), 1e-7, 1.0 - 1e-7)
    z = jnp.log(tau) - jnp.log1p(-tau)
    density = jnp.exp(-0.5 * ((z - mean) / std) ** 2) / (std * jnp.sqrt(2.0 * jnp.pi) * tau * (1.0 - tau))
    return flow(logsnr) * density


def cosmap(logsnr: Array) -> Array:
    tau = _flow_time(logsnr)
    return flow(logsnr) * 2.0 / (jnp.pi * (1.0 - 2.0 * tau + 2.0 * tau**2))


_WEIGHTINGS = {
    "uniform": uniform,
    "snr": snr,
    "x0": x0,
    "v": v,
    "truncated_snr": truncated_snr,
    "min_snr": min_snr,
    "p2": p2,
    "edm": edm,
    "sigmoid": sigmoid,
    "flow": flow,
    "logit_normal": logit_normal,
    "cosmap": cosmap,
}
WEIGHTINGS = tuple(_WEIGHTINGS) + ("elbo",)


def weight(name: str, logsnr: Array, **kwargs) -> Array:
    """w(logsnr) in eps-MSE units for a weighting `name` (see the module table); kwargs are its constants."""
    check_choice("weighting", name, WEIGHTINGS)
    if name == "elbo":
        raise ConfigError("the 'elbo' weighting needs the schedule's derivative: use diffusion.loss(...)")
    fn = _WEIGHTINGS[name]
    allowed = list(inspect.signature(fn).parameters)[1:]
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(f"weighting '{name}' takes {allowed or 'no options'}, not '{key}'")
    return fn(jnp.asarray(logsnr), **kwargs)
