"""`sample`: the whole sampling loop (`lax.scan` over grid steps) inside one `jax.jit`.

The network is ``denoise_fn(x_t, t) -> output`` with x_t variance preserving and t of shape (B,) in
[0, 1]; the output's kind is `prediction`. The time grid, the sampler step and the denoiser are separate
pieces (`grids.py`, `samplers.py`, any denoise_fn / guidance transform). The grid is computed by a small
separate jit and passed to the loop as an array, so changing the spacing, `final` or rho reuses the compiled
loop: it traces once per (shape, sampler, num_steps, prediction, static options, denoise_fn).

Reproducing diffusers with SD weights: wrap the U-Net as ``lambda x, t: unet(x, schedule.timestep(t), ctx)``
(timestep = 1000 t - 1 on the 1000-step tables), pick the same sampler and spacing, and start from the same
x_T in VP scale: diffusers' Euler-type schedulers keep x~ = x / alpha, so their initial latents
noise * init_noise_sigma correspond to x_T = latents / sqrt(sigma_T^2 + 1) here. Then every network
evaluation (timestep and input) and every update match diffusers' DDIMScheduler (leading/trailing),
DDPMScheduler, EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete, DPMSolverMultistep (dpmsolver++ and
sde-dpmsolver++, midpoint) and UniPCMultistep (bh2). Known differences: diffusers' DDIM with ``linspace``
spacing steps to timestep t - T // N instead of the next grid point (we always step to the next grid
point); SD's DDIM config (``set_alpha_to_one=False``) is ``final="sigma_min"``; out of a zero-terminal-SNR
start, heun's first step and eps networks' first x0 differ on purpose (below: diffusers' are off by O(1)).

Logsnr floor: at a zero-terminal-SNR start alpha = 0. Samplers that divide by alpha (euler, euler_ancestral,
heun, and ddim/ddpm with eps prediction) and dpmpp/unipc (as diffusers does) clamp the grid's logSNR to
log(2^-24 / (1 - 2^-24)), i.e. sigma/alpha <= 4096, diffusers' choice; the network still sees the grid's t.
ddim/ddpm with v/x0/flow prediction use alpha = 0 exactly. Out of that pure-noise start, every sampler keeps
its order (tests/diffusion/test_sampler_matrix.py): heun takes its trapezoid on d(x~/s)/d(1/s) = x0 there
(`samplers.heun_step`), and an eps network, which says nothing about x0 at zero SNR, is evaluated at the next
level instead (`eps_from_noise`). A uniform grid on a schedule it cannot resolve (untruncated laplace:
`Schedule.uniform_grid_problem`) is refused.

img2img (`init`, `strength`): as diffusers, the last int(N * strength) steps of the N-step grid are run,
starting from x = alpha init + sigma noise at the first of them. Handoffs (SDXL's base -> refiner,
diffusers' denoising_end / denoising_start): ``stop_step=k`` runs steps 0 .. k-1 only and returns the state x
at grid point k (VP scale, not yet denoised); ``start_step=k`` with ``init=`` that state runs steps k .. N-1
from it as it is (no noise added). Inpainting (`mask`, `known`): after every
step, x = mask x + (1 - mask) (alpha_next known + sigma_next noise) with the initial `noise`, so the known
region (mask = 0) follows the forward process, and after the last step it is exactly `known` (as in
diffusers' legacy inpainting loop). Both work with every sampler.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ldm_jax.diffusion import samplers as samplers_lib
from ldm_jax.diffusion._util import alpha_sigma_from_logsnr, combine, partition
from ldm_jax.diffusion.grids import FINALS, LOGSNR_FLOOR, SD_SPACINGS, SPACINGS, STYLES, Grid, time_grid
from ldm_jax.diffusion.parametrization import PREDICTIONS, to_x0_eps
from ldm_jax.types import Array, ConfigError, DenoiseFn, PRNGKey, check_choice


@dataclasses.dataclass(frozen=True)
class _GridConfig:
    style: str  # the sampler's grid style (only the SD spacings read it)
    num_steps: int
    spacing: str
    final: str
    rho: float
    sigma_min: float | None
    sigma_max: float | None
    t_max: float
    steps_offset: int


@dataclasses.dataclass(frozen=True)
class _LoopConfig:
    sampler: str
    prediction: str
    num_steps: int
    first: int
    opts: samplers_lib.Options
    stop: int  # steps first .. stop - 1 run (stop < num_steps: a handoff, `stop_step`)
    noise_init: bool = True  # img2img: init is noised to the first step's level (False: init is that state)


def _grid(schedule, cfg: _GridConfig) -> Grid:
    return time_grid(
        schedule,
        cfg.num_steps,
        cfg.spacing,
        style=cfg.style,
        final=cfg.final,
        rho=cfg.rho,
        sigma_min=cfg.sigma_min,
        sigma_max=cfg.sigma_max,
        t_max=cfg.t_max,
        steps_offset=cfg.steps_offset,
    )


@functools.partial(jax.jit, static_argnames=("static", "cfg"))
def _grid_jit(dynamic, static, *, cfg: _GridConfig) -> Grid:
    return _grid(combine(dynamic, static), cfg)


def sampling_grid(
    schedule,
    *,
    sampler: str,
    num_steps: int,
    prediction: str = "eps",
    spacing: str = "uniform",
    final: str = "zero",
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    t_max: float = 1.0,
    steps_offset: int = 1,
) -> Grid:
    """The Grid (t, logsnr) that `sample` walks for these settings, logSNR floor included.

    Compiled once per (grid style, num_steps, spacing, final, static schedule settings): every sampler and
    prediction that shares those shares the compiled grid; the floor (`SamplerSpec.floors_logsnr`) is applied
    outside it.
    """
    spec = samplers_lib.sampler_spec(sampler)
    cfg = _GridConfig(
        spec.grid_style if spacing in SD_SPACINGS else STYLES[0],
        int(num_steps),
        spacing,
        final,
        float(rho),
        sigma_min,
        sigma_max,
        float(t_max),
        int(steps_offset),
    )
    dynamic, static = partition(schedule)
    grid = _grid_jit(dynamic, static, cfg=cfg)
    if not spec.floors_logsnr(prediction):
        return grid
    return Grid(grid.t, jnp.maximum(grid.logsnr, LOGSNR_FLOOR))


def make_model(denoise_fn, prediction: str, batch: int):
    """model(x, t, logsnr) -> (x0_hat, eps_hat): one network evaluation at a scalar grid time."""

    def model(x, t, logsnr):
        out = denoise_fn(x, jnp.full((batch,), t, dtype=jnp.result_type(float)))
        alpha, sigma = alpha_sigma_from_logsnr(logsnr)
        return to_x0_eps(out.astype(x.dtype), x, alpha, sigma, prediction)

    return model


def eps_from_noise(model, grid: Grid, first: int):
    """Wraps `make_model` for eps-prediction so that a step out of pure noise gets an informative x0.

    At zero SNR an eps network sees x_t = eps and says nothing about x0 (x0 = (x - sigma eps) / alpha is 0 / 0;
    at the floored alpha = 2^-12 it is the network's error times 4096). A call at the logSNR floor therefore
    evaluates the network at the next grid level on the noise part of the next state, sigma_1 x, and returns
    that x0 (with the eps it implies at the floor): the first step becomes the one-iteration backward-Euler
    step x_1 = sigma_1 x + alpha_1 D(sigma_1 x, t_1), whose local error O(alpha_1^2) is that of a forward step
    with an x0 or v network, so every sampler keeps its order. One network call either way.
    """
    t_1, l_1 = grid.t[first + 1], grid.logsnr[first + 1]
    _, sigma_1 = alpha_sigma_from_logsnr(l_1)

    def wrapped(x, t, logsnr):
        noise = logsnr <= samplers_lib.FLOOR_LEVEL
        x0, eps = model(
            jnp.where(noise, sigma_1 * x, x), jnp.where(noise, t_1, t), jnp.where(noise, l_1, logsnr)
        )
        alpha, sigma = alpha_sigma_from_logsnr(logsnr)
        return x0, jnp.where(noise, (x - alpha * x0) / sigma, eps)

    return wrapped


@functools.partial(jax.jit, static_argnames=("static", "cfg"))
def _run(dynamic, static, grid, noise, rng, init, mask, known, *, cfg: _LoopConfig):
    """The sampling loop; the grid is an input, so spacing / final / rho changes do not recompile it."""
    denoise_fn, schedule = combine(dynamic, static)
    model = make_model(denoise_fn, cfg.prediction, noise.shape[0])
    if cfg.prediction == "eps":
        model = eps_from_noise(model, grid, cfg.first)
    ctx = samplers_lib.Ctx(model, grid, schedule, cfg.num_steps, cfg.first, cfg.opts)
    spec = samplers_lib.SAMPLER_SPECS[cfg.sampler]

    def at(i):
        return alpha_sigma_from_logsnr(grid.logsnr[i])

    x = noise
    if init is not None and cfg.noise_init:
        alpha, sigma = at(cfg.first)
        x = alpha * init + sigma * noise
    elif init is not None:
        x = init

    def body(carry, i):
        x, state = carry
        key = None if rng is None else jax.random.fold_in(rng, i)
        x, state = spec.step(ctx, i, x, state, key)
        if mask is not None:
            alpha, sigma = at(i + 1)
            last = i == cfg.num_steps - 1  # the known region ends exactly at `known`, whatever `final` is
            alpha, sigma = jnp.where(last, 1.0, alpha), jnp.where(last, 0.0, sigma)
            x = mask * x + (1.0 - mask) * (alpha * known + sigma * noise)
        return (x, state), None

    carry = (x, spec.init_state(x))
    (x, _), _ = jax.lax.scan(body, carry, jnp.arange(cfg.first, cfg.stop))
    return x


def _check_options(prediction, spacing, final, num_steps, strength, variance, schedule):
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("spacing", spacing, SPACINGS)
    check_choice("final", final, FINALS)
    check_choice("ddpm variance", variance, ("small", "large"))
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be a positive int, got {num_steps!r}")
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength must be in (0, 1], got {strength}")
    if spacing in SD_SPACINGS and schedule.num_train_timesteps is None:
        raise ConfigError(f"'{spacing}' spacing needs a discrete schedule; use uniform, karras or logsnr")


def _check_schedule(schedule, spacing: str) -> None:
    """Refuses a uniform grid on a schedule it cannot resolve (`Schedule.uniform_grid_problem`)."""
    problem = getattr(schedule, "uniform_grid_problem", lambda: None)() if spacing == "uniform" else None
    if problem:
        raise ConfigError(f"{problem}: use spacing='logsnr' or 'karras', whose steps follow the noise level, not t")


def _check_single_step_from_noise(grid: Grid, prediction: str, first: int, num_steps: int) -> None:
    """eps-prediction out of pure noise takes x0 from the next level (`eps_from_noise`); with one step that is
    the target itself, where an eps network says nothing either. Checked when the grid is concrete."""
    if prediction != "eps" or num_steps - first != 1:
        return
    with jax.ensure_compile_time_eval():
        start = grid.logsnr[first]
    if not isinstance(start, jax.core.Tracer) and float(start) <= samplers_lib.FLOOR_LEVEL:
        raise ConfigError(
            "one step from zero SNR with prediction='eps' has no level at which the network sees x0: "
            "use num_steps >= 2 or a v / x0 / flow network"
        )


def _prepare_arrays(noise, init, mask, known):
    """Checks img2img / inpainting inputs; samples in at least float32 (bf16 noise is promoted)."""
    if (mask is None) != (known is None):
        raise ConfigError("inpainting needs both mask= and known=")
    for name, arr in (("init", init), ("known", known)):
        if arr is not None and arr.shape != noise.shape:
            raise ConfigError(f"{name} has shape {arr.shape}, expected the noise shape {noise.shape}")
    dtype = jnp.promote_types(noise.dtype, jnp.float32)
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)
    if mask is not None:
        mask = jnp.broadcast_to(cast(mask), noise.shape)
    return cast(noise), cast(init), mask, cast(known)


def sample(
    denoise_fn: DenoiseFn,
    noise: Array,
    *,
    schedule,
    prediction: str = "eps",
    sampler: str = "ddim",
    num_steps: int = 50,
    rng: PRNGKey | None = None,
    spacing: str = "uniform",
    final: str = "zero",
    eta: float | None = None,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    variance: str = "small",
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    t_max: float = 1.0,
    steps_offset: int = 1,
    init: Array | None = None,
    strength: float = 1.0,
    mask: Array | None = None,
    known: Array | None = None,
    start_step: int | None = None,
    stop_step: int | None = None,
) -> Array:
    """Runs `sampler` for `num_steps` steps from `noise` (x at the first grid time, VP scale) to x0.

    Args:
      denoise_fn: ``(x_t, t) -> output``; a plain function is a static jit argument (hashed by identity, so
        pass the same function object to reuse the compiled loop), a pytree callable
        (``jax.tree_util.Partial(fn, params)``, `cfg(...)`, `edm_precondition(...)`) passes its arrays as
        traced arguments, so new params or contexts do not retrace.
      noise: (B, ...) Gaussian noise; sampling runs in float32 (or wider).
      schedule: a `Schedule`; prediction: "eps", "x0", "v" or "flow".
      sampler: ddpm, ddim, euler, euler_ancestral, heun, dpmpp_2m, dpmpp_2m_sde, unipc.
      rng: required by stochastic samplers (ddpm, ddim with eta > 0, euler_ancestral, dpmpp_2m_sde, churn);
        step i draws its noise from ``fold_in(rng, i)``.
      spacing, final, rho, sigma_min, sigma_max, t_max, steps_offset: the time grid (`grids.time_grid`).
      eta: ddim's eta (default 0) or euler_ancestral's (default 1).
      churn, s_tmin, s_tmax, s_noise: EDM's S_churn etc. for heun and euler (Karras et al. 2022, Alg. 2).
      variance: ddpm's "small" (posterior) or "large" (beta_t) variance.
      init, strength: img2img; mask, known: inpainting (mask = 1 where new content is generated).
      start_step: with `init`, the state at grid point `start_step` (VP scale) the loop continues from as it
        is (strength is then unused); stop_step: stop after step stop_step - 1 and return the state at grid
        point stop_step (the module doc's handoffs).
    """
    spec = samplers_lib.sampler_spec(sampler)
    _check_options(prediction, spacing, final, num_steps, strength, variance, schedule)
    _check_schedule(schedule, spacing)
    samplers_lib.check_sampler_options(
        sampler, eta=eta, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, variance=variance
    )
    eta = spec.eta(eta)
    stochastic = spec.is_stochastic(eta, churn)
    if stochastic and rng is None:
        raise ConfigError(f"sampler '{sampler}' draws noise: pass rng=jax.random.key(seed)")
    noise, init, mask, known = _prepare_arrays(noise, init, mask, known)
    first = 0 if init is None else num_steps - min(int(num_steps * strength), num_steps)
    if start_step is not None:
        if init is None:
            raise ConfigError("start_step continues from a state: pass it as init=")
        first = int(start_step)
    stop = num_steps if stop_step is None else int(stop_step)
    if not 0 <= first < stop <= num_steps:
        raise ConfigError(f"no step to run: steps {first} .. {stop - 1} of num_steps={num_steps} (strength="
                          f"{strength}, start_step={start_step}, stop_step={stop_step})")
    opts = samplers_lib.Options(
        eta,
        float(churn),
        float(s_tmin),
        float(s_tmax),
        float(s_noise),
        variance,
        spec.lower_order_final(final, num_steps),
    )
    grid = sampling_grid(
        schedule,
        sampler=sampler,
        num_steps=num_steps,
        prediction=prediction,
        spacing=spacing,
        final=final,
        rho=rho,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        t_max=t_max,
        steps_offset=steps_offset,
    )
    _check_single_step_from_noise(grid, prediction, first, num_steps)
    dynamic, static = partition((denoise_fn, schedule))
    cfg = _LoopConfig(sampler, prediction, num_steps, first, opts, stop, start_step is None)
    return _run(dynamic, static, grid, noise, rng if stochastic else None, init, mask, known, cfg=cfg)
