"""Diffusion core: schedules, noise levels, parametrizations, losses, guidance and samplers (pure JAX).

Imports nothing from the package but `ldm_jax.types`; no Flax params, no ConfigDict. Time t in [0, 1]
(0 = clean, 1 = noisiest) is the framework's time everywhere; variance preserving x_t = alpha x0 + sigma eps.

Schedules::

    s = diffusion.get_schedule("cosine")            # linear, scaled_linear, cosine, sigmoid, laplace, edm,
                                                    # flow, learned(params=...); shift=..., zero_snr=True
    s = diffusion.shifted(s, 2.0); s = diffusion.zero_terminal_snr(s)
    s.logsnr(t); s.alpha_sigma(t) -> (alpha, sigma); s.sigma(t)          # sigma/alpha (EDM view)
    s.t_from_logsnr(l); s.t_from_sigma(sig)                              # inverses
    s.num_train_timesteps; s.timestep(t); s.t_of_timestep(n)             # network timestep <-> t
    x_t = diffusion.q_sample(s, x0, t, noise)
    params = diffusion.learned_schedule_init(rng); s = diffusion.LearnedSchedule(params)

Discrete SD tables: timestep n in 0..T-1 sits at t = (n + 1) / T and ``s.timestep(t) = T t - 1`` is what an SD
U-Net is fed; t = 0 is the clean sample. sigma/alpha is linear in n between table entries (what diffusers'
Euler schedulers do for fractional timesteps). See `schedules.py`.

Training::

    t = diffusion.sample_t("logit_normal", rng, batch, schedule=s)   # uniform, logit_normal, mode, cosmap,
                                                                     # lognormal_sigma, low_discrepancy
    x_t = diffusion.q_sample(s, x0, t, noise)
    out = model(x_t, s.timestep(t), context)
    per_example = diffusion.loss(out, x0, noise, t, schedule=s, prediction="v",
                                 weighting="min_snr", gamma=5.0)

Parametrizations eps / x0 / v / flow: ``to_x0_eps``, ``from_x0_eps``, ``convert``; EDM preconditioning:
``edm_precondition(net, s)`` (an x0-predicting denoise_fn), ``edm_coefficients``. Weightings (eps units):
uniform, snr, x0, v, truncated_snr, min_snr(gamma), p2(k, gamma), edm(sigma_data), sigmoid(bias), elbo, and
rectified flow's velocity MSE: flow, logit_normal(mean, std), cosmap (SD3's densities as weights).

Sampling (whole loop in one jit; one trace per shape, sampler, steps and static options)::

    x0 = diffusion.sample(denoise_fn, noise, schedule=s, prediction="eps", sampler="dpmpp_2m",
                          num_steps=20, rng=key, spacing="karras")
    guided = diffusion.cfg(model_fn, cond_ctx, uncond_ctx, 7.5, rescale=0.7, interval=(0.1, 0.9))
    x0 = diffusion.sample(guided, noise, schedule=s, ...)                          # guided denoise_fn
    x0 = diffusion.sample(fn, noise, ..., init=latents, strength=0.6)              # img2img
    x0 = diffusion.sample(fn, noise, ..., mask=m, known=latents)                   # inpainting

Samplers: ddpm, ddim (eta), euler, euler_ancestral, heun (EDM Alg. 2, churn), dpmpp_2m, dpmpp_2m_sde, unipc.
Each is described by one `SamplerSpec` (``diffusion.sampler_spec("heun")``: grid style, order, options it takes,
``is_stochastic(eta, churn)``, ``nfe(num_steps)``, ``steps_for_nfe(nfe)``, ...); `SAMPLER_OPTIONS` and
`GRID_OPTIONS` name the sampler-specific and grid keywords of `sample`.
Spacings: uniform, karras (rho), logsnr, and SD's leading / trailing / linspace, which reproduce diffusers'
schedulers step for step (`sampling.py` documents the mapping).
"""

from ldm_jax.diffusion.grids import GRID_OPTIONS, LOGSNR_FLOOR, SPACINGS, Grid, sd_timesteps, time_grid
from ldm_jax.diffusion.guidance import CFG, cfg, rescale_guidance
from ldm_jax.diffusion.losses import loss, loss_weight
from ldm_jax.diffusion.noise_levels import (
    NOISE_SAMPLERS,
    logit_normal,
    lognormal_sigma,
    low_discrepancy,
    sample_t,
    snap_to_timesteps,
)
from ldm_jax.diffusion.parametrization import (
    PREDICTIONS,
    EDMPrecond,
    convert,
    edm_coefficients,
    edm_precondition,
    from_x0_eps,
    prediction_scale,
    to_x0_eps,
)
from ldm_jax.diffusion.samplers import SAMPLER_OPTIONS, SAMPLER_SPECS, SAMPLERS, SamplerSpec, sampler_spec
from ldm_jax.diffusion.sampling import sample, sampling_grid
from ldm_jax.diffusion.schedules import (
    EDM,
    Cosine,
    DiscreteSchedule,
    Flow,
    Laplace,
    LearnedSchedule,
    Schedule,
    Shifted,
    Sigmoid,
    ZeroTerminalSNR,
    get_schedule,
    learned_schedule_init,
    linear,
    q_sample,
    scaled_linear,
    shifted,
    zero_terminal_snr,
)
from ldm_jax.diffusion.weighting import WEIGHTINGS, weight

__all__ = [
    "CFG",
    "EDM",
    "GRID_OPTIONS",
    "LOGSNR_FLOOR",
    "NOISE_SAMPLERS",
    "PREDICTIONS",
    "SAMPLERS",
    "SAMPLER_OPTIONS",
    "SAMPLER_SPECS",
    "SPACINGS",
    "WEIGHTINGS",
    "Cosine",
    "DiscreteSchedule",
    "EDMPrecond",
    "Flow",
    "Grid",
    "Laplace",
    "LearnedSchedule",
    "SamplerSpec",
    "Schedule",
    "Shifted",
    "Sigmoid",
    "ZeroTerminalSNR",
    "cfg",
    "convert",
    "edm_coefficients",
    "edm_precondition",
    "from_x0_eps",
    "get_schedule",
    "learned_schedule_init",
    "linear",
    "logit_normal",
    "lognormal_sigma",
    "loss",
    "loss_weight",
    "low_discrepancy",
    "prediction_scale",
    "q_sample",
    "rescale_guidance",
    "sample",
    "sample_t",
    "sampler_spec",
    "sampling_grid",
    "scaled_linear",
    "sd_timesteps",
    "shifted",
    "snap_to_timesteps",
    "time_grid",
    "to_x0_eps",
    "weight",
    "zero_terminal_snr",
]
