"""The diffusion training loss: any parametrization x any weighting, per example.

    loss_i = w(logsnr_i) / c(logsnr_i) * mean_d (output_i - target_i)^2

target is what a network of kind `prediction` should output for (x0, noise) at t (`from_x0_eps`), c is the
`prediction_scale` turning an output error into an eps error, and w the weighting in eps units
(`weighting.py`). So ``prediction="v", weighting="min_snr"`` is the min-SNR-gamma loss of a v-model
(min(snr, gamma) / (snr + 1) times the v-MSE), and ``prediction="x0", weighting="edm"`` with an
`edm_precondition`-ed network is EDM's loss lambda(sigma) ||D - x0||^2 (times 1/D for the mean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.diffusion import weighting as weighting_lib
from ldm_jax.diffusion._util import alpha_sigma_from_logsnr
from ldm_jax.diffusion.parametrization import PREDICTIONS, from_x0_eps, prediction_scale
from ldm_jax.types import Array, ConfigError, check_choice


def loss_weight(
    t: Array, *, schedule, prediction: str = "eps", weighting: str = "uniform", **kwargs
) -> Array:
    """The per-example factor w / c multiplying the mean squared error of the raw network output."""
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("weighting", weighting, weighting_lib.WEIGHTINGS)
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    if weighting == "elbo":
        if kwargs:
            raise ConfigError(f"weighting 'elbo' takes no options, not {sorted(kwargs)}")
        logsnr, dlogsnr_dt = jax.jvp(schedule.logsnr, (t,), (jnp.ones_like(t),))
        w = -0.5 * dlogsnr_dt
    else:
        logsnr = schedule.logsnr(t)
        w = weighting_lib.weight(weighting, logsnr, **kwargs)
    clipped = jnp.clip(logsnr, -weighting_lib.LOGSNR_CLIP, weighting_lib.LOGSNR_CLIP)
    return w / prediction_scale(clipped, prediction)


def loss(
    output: Array,
    x0: Array,
    noise: Array,
    t: Array,
    *,
    schedule,
    prediction: str = "eps",
    weighting: str = "uniform",
    **weighting_kwargs,
) -> Array:
    """Per-example weighted loss (B,) of a network `output` at x_t = q_sample(schedule, x0, t, noise).

    Args:
      output: the network's prediction of kind `prediction` ("eps", "x0", "v", "flow"), shape (B, ...).
      x0, noise: the clean sample and the Gaussian noise that made x_t.
      t: (B,) times in [0, 1].
      weighting: a name from `weighting.WEIGHTINGS`; `weighting_kwargs` are its constants (gamma=5.0 for
        min_snr, k/gamma for p2, sigma_data for edm, bias for sigmoid).
    """
    if output.shape != x0.shape or noise.shape != x0.shape:
        raise ConfigError(f"output {output.shape}, x0 {x0.shape} and noise {noise.shape} must have one shape")
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    if t.shape != (x0.shape[0],):
        raise ConfigError(f"t must have shape ({x0.shape[0]},) to match the batch, got {t.shape}")
    alpha, sigma = alpha_sigma_from_logsnr(schedule.logsnr(t))
    target = from_x0_eps(x0.astype(jnp.float32), noise.astype(jnp.float32), alpha, sigma, prediction)
    err = jnp.mean(jnp.square(output.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))
    w = loss_weight(t, schedule=schedule, prediction=prediction, weighting=weighting, **weighting_kwargs)
    return w * err
