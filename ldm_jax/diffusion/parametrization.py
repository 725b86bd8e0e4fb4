"""What the network predicts, and conversions between any two parametrizations given (x_t, t).

With x_t = alpha x_0 + sigma eps (VP, logsnr = log(alpha^2 / sigma^2)) the four outputs are

    eps                              (Ho et al. 2020)
    x0                               (the denoiser D of Karras et al. 2022)
    v    = alpha eps - sigma x0      (Salimans & Ho 2022)
    flow = eps - x0                  (rectified-flow velocity, Liu et al. 2022; Lipman et al. 2023)

and each maps back to (x0, eps):

    eps:  x0 = (x_t - sigma eps) / alpha
    x0:   eps = (x_t - alpha x0) / sigma
    v:    x0 = alpha x_t - sigma v,            eps = sigma x_t + alpha v
    flow: x0 = (x_t - sigma u) / (alpha + sigma), eps = (x_t + alpha u) / (alpha + sigma)

A rectified-flow network trained on x_flow = (1 - tau) x0 + tau eps (the `flow` schedule, tau = t) is a
"flow" denoise_fn once its input is rescaled: x_flow = x_t / (alpha + sigma); u = eps - x0 needs no change.

For fixed x_t an error in the prediction scales the eps error by a constant (``prediction_scale``):
||d pred||^2 = c(logsnr) ||d eps||^2 with c = 1 (eps), e^-logsnr (x0), 1 + e^-logsnr (v),
(1 + e^(-logsnr/2))^2 (flow). The loss uses it to express every weighting in eps units.

EDM preconditioning (Karras et al. 2022, Table 1) wraps any raw network F into an x0-predicting denoiser:
D(x~; s) = c_skip x~ + c_out F(c_in x~, c_noise) on x~ = x_t / alpha with s = sigma / alpha.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from ldm_jax.diffusion._util import alpha_sigma_from_logsnr, expand_like, pytree_dataclass
from ldm_jax.types import Array, check_choice

PREDICTIONS = ("eps", "x0", "v", "flow")


def to_x0_eps(output: Array, x_t: Array, alpha: Array, sigma: Array, prediction: str) -> tuple[Array, Array]:
    """(x0, eps) implied by a network output of kind `prediction`; alpha, sigma are (B,) or scalars."""
    check_choice("prediction", prediction, PREDICTIONS)
    a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
    if prediction == "eps":
        return (x_t - s * output) / a, output
    if prediction == "x0":
        return output, (x_t - a * output) / s
    if prediction == "v":
        return a * x_t - s * output, s * x_t + a * output
    return (x_t - s * output) / (a + s), (x_t + a * output) / (a + s)


def from_x0_eps(x0: Array, eps: Array, alpha: Array, sigma: Array, prediction: str) -> Array:
    """The output of kind `prediction` for given (x0, eps): the regression target in training."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return expand_like(alpha, x0) * eps - expand_like(sigma, x0) * x0
    return eps - x0


def convert(output: Array, x_t: Array, t: Array, *, schedule, source: str, target: str) -> Array:
    """Re-expresses a network output of kind `source` as kind `target` at (x_t, t)."""
    alpha, sigma = schedule.alpha_sigma(t)
    x0, eps = to_x0_eps(output, x_t, alpha, sigma, source)
    return from_x0_eps(x0, eps, alpha, sigma, target)


def prediction_scale(logsnr: Array, prediction: str) -> Array:
    """c(logsnr) = ||d output||^2 / ||d eps||^2 at fixed x_t for a prediction of kind `prediction`."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return jnp.ones_like(logsnr)
    if prediction == "x0":
        return jnp.exp(-logsnr)
    if prediction == "v":
        return 1.0 + jnp.exp(-logsnr)
    return (1.0 + jnp.exp(-0.5 * logsnr)) ** 2


def edm_coefficients(sigma: Array, sigma_data: float = 0.5) -> tuple[Array, Array, Array, Array]:
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al. 2022, Table 1) at noise level sigma = sigma/alpha.

    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = ln(s) / 4.
    """
    total = sigma**2 + sigma_data**2
    return (
        sigma_data**2 / total,
        sigma * sigma_data / jnp.sqrt(total),
        1.0 / jnp.sqrt(total),
        0.25 * jnp.log(sigma),
    )


@pytree_dataclass(data_fields=("schedule",), callable_fields=("network_fn",))
@dataclasses.dataclass(frozen=True, eq=False)
class EDMPrecond:
    """x0-predicting denoise_fn(x_t, t) built from a raw network F(scaled_input, c_noise) (EDM Table 1)."""

    network_fn: Callable[[Array, Array], Array]
    schedule: object
    sigma_data: float = 0.5

    def __call__(self, x_t: Array, t: Array) -> Array:
        logsnr = self.schedule.logsnr(t)
        alpha, _ = alpha_sigma_from_logsnr(logsnr)
        sigma = jnp.exp(-0.5 * logsnr)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        x_edm = x_t / expand_like(alpha, x_t)
        f = self.network_fn(expand_like(c_in, x_t) * x_edm, c_noise)
        return expand_like(c_skip, x_t) * x_edm + expand_like(c_out, x_t) * f


def edm_precondition(network_fn: Callable, schedule, sigma_data: float = 0.5) -> EDMPrecond:
    """Wraps a raw network into an EDM-preconditioned denoiser; use it with ``prediction="x0"``."""
    return EDMPrecond(network_fn, schedule, float(sigma_data))
