"""Sampling time grids: num_steps network evaluations t_0 > ... > t_{N-1}, then the target t_N.

A `Grid` holds t (N+1,) and logsnr (N+1,). ``final="zero"`` makes the target the clean sample
(logsnr = +inf, sigma = 0: diffusers' ``final_sigmas_type="zero"`` / ``set_alpha_to_one=True``);
``final="sigma_min"`` makes it the schedule's smallest training noise level t_min (timestep 0 of a
discrete schedule: diffusers' ``final_sigmas_type="sigma_min"`` / ``set_alpha_to_one=False`` as in SD's
DDIM config).

Spacings:

    uniform   t_i = t_max (1 - i / N)                             uniform in t
    karras    sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho   (Karras et al. 2022)
    logsnr    logsnr_i uniform from logsnr(t_max) to logsnr(t_min)     (Lu et al. 2022, DPM-Solver)
    leading / trailing / linspace    SD's discrete timesteps n_i, at t_i = (n_i + 1) / T
    flowmatch t_i uniform from t_max to tau(1/1000)                   diffusers' FlowMatchEulerDiscreteScheduler

flowmatch is SD3's default grid: with tau(t) = sigmoid(-logsnr(t) / 2) the flow time of a (shifted) schedule,
diffusers spaces N "sigmas" linearly from 1 to tau(1/T) and then shifts them once more, so on a flow schedule
with shift s the network sees flow times shift_s(t_i) for these t_i, the last one shifted twice, as there.

karras and logsnr ramps run from sigma_max (default sigma(t_max)) to sigma_min (default sigma(t_min), or
0.002 where that is 0); with ``final="zero"`` the N evaluations cover the whole ramp and the last step
goes to sigma = 0 (EDM's convention), with ``final="sigma_min"`` the ramp has N + 1 points ending at the
target.

The SD spacings reproduce diffusers' ``set_timesteps``, which differs between scheduler families (`style`):

    style      samplers                         leading                         linspace
    ddim       ddpm, ddim                       n = i (T // N) + offset         round(linspace(0, T-1, N))
    euler      euler, euler_ancestral, heun     n = i (T // N) + offset         linspace(0, T-1, N) unrounded
    multistep  dpmpp_2m, dpmpp_2m_sde, unipc    N + 1 points, T // (N+1) apart, round(linspace(0, T-1, N+1)),
                                                the last (n = offset) dropped   the last (n = 0) dropped
    trailing (all): n = round(arange(T, 0, -T / N)) - 1

`steps_offset` defaults to SD's value 1 (diffusers' default is 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.types import Array, ConfigError, check_choice

SPACINGS = ("uniform", "karras", "logsnr", "leading", "trailing", "linspace", "flowmatch")
FLOWMATCH_TRAIN_TIMESTEPS = 1000
SD_SPACINGS = ("leading", "trailing", "linspace")
STYLES = ("ddim", "euler", "multistep")
FINALS = ("zero", "sigma_min")
# The keywords of `time_grid` (and of `sample` / `sampling_grid`) that shape the grid; the sampler sets `style`.
GRID_OPTIONS = ("spacing", "final", "rho", "sigma_min", "sigma_max", "t_max", "steps_offset")
# log(2^-24 / (1 - 2^-24)): the logSNR diffusers puts at a zero-terminal-SNR end for Euler/DPM/UniPC.
LOGSNR_FLOOR = math.log(2.0**-24) - math.log1p(-(2.0**-24))
DEFAULT_SIGMA_MIN = 0.002


class Grid(NamedTuple):
    t: Array
    logsnr: Array


def sd_timesteps(
    num_steps: int,
    spacing: str,
    num_train_timesteps: int = 1000,
    *,
    style: str = "ddim",
    steps_offset: int = 1,
) -> np.ndarray:
    """diffusers' inference timesteps (descending, float64) for one scheduler family; see the module table."""
    check_choice("spacing", spacing, SD_SPACINGS)
    check_choice("grid style", style, STYLES)
    num, total = int(num_steps), int(num_train_timesteps)
    if not 1 <= num <= total:
        raise ConfigError(f"num_steps must be in [1, {total}] for '{spacing}' spacing, got {num_steps}")
    points = num + 1 if style == "multistep" else num
    if spacing == "trailing":
        # diffusers' round(arange(T, 0, -T / N)) - 1; the float-step arange sometimes yields an (N+1)-th
        # point (which would be timestep -1), dropped here.
        return (np.round(np.arange(total, 0, -total / num)) - 1.0)[:num].astype(np.float64)
    if spacing == "leading":
        ratio = total // points
        if ratio < 1:
            raise ConfigError(f"num_steps={num} is too many for 'leading' spacing over {total} timesteps")
        n = (np.arange(points) * ratio)[::-1].astype(np.float64) + steps_offset
    else:
        n = np.linspace(0, total - 1, points)[::-1]
        if style != "euler":
            n = np.round(n)
    return n[:num] if style == "multistep" else n


def _continuous_t(
    schedule, num: int, spacing: str, *, rho, sigma_min, sigma_max, t_max
) -> tuple[Array, Array]:
    """`num` points from t_max down to (and including, for karras/logsnr) the smallest noise level."""
    t_lo = schedule.t_min
    if spacing == "uniform":
        t = t_max * (1.0 - jnp.arange(num) / num)
        return t, schedule.logsnr(t)
    ramp = jnp.asarray(np.linspace(0.0, 1.0, num))
    if spacing == "flowmatch":
        t_last = jax.nn.sigmoid(-0.5 * schedule.logsnr(jnp.asarray(1.0 / FLOWMATCH_TRAIN_TIMESTEPS, ramp.dtype)))
        t = t_max + ramp * (t_last - t_max)
        return t, schedule.logsnr(t)
    if spacing == "karras":
        s_max = schedule.sigma(t_max) if sigma_max is None else jnp.asarray(sigma_max, jnp.result_type(float))
        s_max = jnp.minimum(s_max, math.exp(-0.5 * LOGSNR_FLOOR))
        if sigma_min is None:
            s_min = schedule.sigma(t_lo)
            s_min = jnp.where(s_min > 0, s_min, DEFAULT_SIGMA_MIN)
        else:
            s_min = jnp.asarray(sigma_min, jnp.result_type(float))
        sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        logsnr = -2.0 * jnp.log(sig)
        return schedule.t_from_logsnr(logsnr), logsnr
    l_hi = schedule.logsnr(t_lo) if sigma_min is None else -2.0 * jnp.log(jnp.asarray(sigma_min, ramp.dtype))
    l_hi = jnp.where(jnp.isfinite(l_hi), l_hi, -2.0 * math.log(DEFAULT_SIGMA_MIN))
    l_lo = schedule.logsnr(t_max) if sigma_max is None else -2.0 * jnp.log(jnp.asarray(sigma_max, ramp.dtype))
    l_lo = jnp.maximum(l_lo, LOGSNR_FLOOR)
    logsnr = l_lo + ramp * (l_hi - l_lo)
    return schedule.t_from_logsnr(logsnr), logsnr


def time_grid(
    schedule,
    num_steps: int,
    spacing: str = "uniform",
    *,
    style: str = "ddim",
    final: str = "zero",
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    t_max: float = 1.0,
    steps_offset: int = 1,
) -> Grid:
    """The (N+1)-point grid for `num_steps` network evaluations; see the module docstring."""
    check_choice("spacing", spacing, SPACINGS)
    check_choice("final", final, FINALS)
    if int(num_steps) < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    if spacing in SD_SPACINGS:
        total = schedule.num_train_timesteps
        if total is None:
            raise ConfigError(
                f"'{spacing}' spacing needs a discrete schedule (linear, scaled_linear); "
                "use uniform, karras or logsnr for continuous ones"
            )
        n = sd_timesteps(num_steps, spacing, total, style=style, steps_offset=steps_offset)
        t = jnp.asarray((n + 1.0) / total, dtype=jnp.result_type(float))
        logsnr = schedule.logsnr(t)
    else:
        ends_at_min = final == "sigma_min" and spacing not in ("uniform", "flowmatch")
        t, logsnr = _continuous_t(
            schedule,
            int(num_steps) + ends_at_min,
            spacing,
            rho=rho,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            t_max=t_max,
        )
        if ends_at_min:  # the ramp's last point is the target itself
            return Grid(t, logsnr)
    if final == "zero":
        t_end, l_end = jnp.zeros((1,), t.dtype), jnp.full((1,), jnp.inf, logsnr.dtype)
    else:
        t_end = jnp.full((1,), schedule.t_min, t.dtype)
        l_end = schedule.logsnr(t_end)
    return Grid(jnp.concatenate([t, t_end]), jnp.concatenate([logsnr, l_end]))
