"""Every schedule x prediction x sampler at default options: the exact-denoiser law and the sampler's order, or a
one-line ConfigError before anything is compiled.

Data x0 ~ N(MU, S^2) per coordinate (as in test_gaussian_samplers.py): E[x0 | x_t] is affine in x_t and the
probability-flow ODE keeps z = (x_t - alpha MU) / sqrt(alpha^2 S^2 + sigma^2) fixed, so a deterministic sampler
started from the marginal at its grid's first level should land on MU + S z, sample by sample.

The matrix: every schedule `get_schedule` builds (`schedules.SCHEDULES`) at its default options (learned: its
initial parameters, seed 0), plus zero_snr=True where that changes the schedule (the two 1000-step tables, edm,
learned; cosine, sigmoid, laplace and flow already end at zero SNR, where the rescale is the identity: checked
below); x the predictions eps, x0 and v; x every sampler of SAMPLER_SPECS at its default options (eta, churn,
variance), on `sample`'s default grid (uniform in t from t = 1, final="zero"):

    stochastic samplers    512 steps: mean and std of the 4096 draws within 4 standard errors (0.031, 0.022);
                           ancestral steps under-disperse by O(1/N): up to 0.022 short at 256 steps, 0.009 at
                           512 (deterministic samplers at 128 steps: 0.011, of which the draws' own std 0.0106)
    deterministic ones     (a) 128 steps: the law as above, and mean |x - (MU + S z)| within the error of the
                           final jump (below; computed exactly from the exact state at t = 1/N) plus
                           `BUDGET`[p] / N^p, p = min(order, 2), of the sampler's own (measured constants 1.15
                           and 5.8 against 2 and 12; before the zero-SNR fixes dpmpp_2m and unipc with an eps
                           network on cosine were 8e-3 and 4e-3 from the solution, against a budget of 1.1e-3);
                           (b) the order: errors at 32 and 128 steps on the grid uniform in logSNR
                           (spacing="logsnr": the same compiled loops as (a), and on zero-SNR schedules it starts
                           at the same pure-noise floor), fitted slope above the sampler's order less 0.3:
                           ddim and euler 1, heun, flow_heun and dpmpp_2m 2, unipc 3 (UniPC-2's corrector adds
                           one; Zhao et al. 2023). Measured over the matrix: 0.99-1.00, 2.07-2.10, 1.96-2.03, 2.99-3.13
                           (2.57 once: `ORDER_SLACK`). v reaches every sampler as the same (x0, eps) pair as x0
                           (`to_x0_eps`; the steps branch only on eps or not), so (b) runs for eps and x0.

Why (b) is not measured on the default grid: every sampler takes its last step, from t = 1/N to sigma = 0, at
first order (as diffusers and EDM do; the parity tests pin that step), with an error ~ sigma_edm(1/N)^2, and the
exponential integrators (dpmpp, unipc) take O(1) logSNR steps at both ends of a uniform-in-t grid. Where
sigma_edm^2 ~ t near t = 0 (the 1000-step tables, cosine, sigmoid) every sampler is then first order as N grows,
whatever its own order (scaled_linear, 64 -> 128 steps: heun 0.99, dpmpp_2m 1.05, unipc 1.02), and before that
the errors of the two ends cancel erratically (cosine, unipc: 0.33, 0.28, 0.72 between 32, 64, 128, 256 steps).
That measures the grid's resolution of the schedule, not the sampler, so (a) subtracts the jump and (b) takes
the order where the grid is smooth.

Refused (`REFUSED`): laplace on the uniform grid, with every prediction and sampler. Its sigma_edm^2 ~ sqrt(t)
near t = 0 and alpha^2 ~ sqrt(1 - t) near t = 1, so on a uniform grid every sampler converges at order 1/2 (at
50 steps the last step still jumps from sigma_edm = 0.45 to 0, and the samples' std comes out a quarter short);
the error names spacing='logsnr' / 'karras' as the fix (sampled below).

Cost (about 60 s of CPU in all): one test per schedule group and prediction. The exact denoiser takes the
schedule's logSNR at the grid's times as an array, so the compiled sampling loops hold no schedule code: a loop
compiles once per (sampler, prediction, step count), the other schedules find it in conftest.py's persistent
compilation cache, and a grid change reuses it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion
from ldm_jax.diffusion._util import alpha_sigma_from_logsnr
from ldm_jax.diffusion.schedules import SCHEDULES
from ldm_jax.types import ConfigError

MU, S = 1.5, 0.5
SHAPE = (1024, 4)  # 4096 draws: standard errors S / 64 = 0.0078 (mean) and S / sqrt(8192) = 0.0055 (std)
PREDICTIONS = ("eps", "x0", "v")
ORDER_PREDICTIONS = ("eps", "x0")
LAW_STEPS, STOCHASTIC_STEPS, ORDER_STEPS = 128, 512, (32, 128)
ORDERS = {"ddim": 1, "euler": 1, "heun": 2, "flow_heun": 2, "dpmpp_2m": 2, "unipc": 3}
# Allowed shortfall of the fitted order: 0.3, and 0.5 for unipc's third order, which measures 2.57 on sigmoid
# with an eps network: float32 t (spacing 6e-8 near t = 1, where sigmoid's alpha ~ sqrt(1 - t)) puts the
# network's noise level ~1% off the grid's near pure noise, and eps -> x0 divides by alpha.
ORDER_SLACK = {"unipc": 0.5}
# (a)'s error budget beyond the final jump: BUDGET[p] / N^p, p = min(order, 2) (measured constants: 1.15, 5.8).
BUDGET = {1: 2.0, 2: 12.0}
ZERO_SNR_CHANGES = ("linear", "scaled_linear", "edm", "learned")  # the others already end at zero SNR
# One test per group and prediction; the 1000-step tables share their compiled grids (a table is an array leaf).
GROUPS = {"tables": ("linear", "linear+zero_snr", "scaled_linear", "scaled_linear+zero_snr")}
GROUPS.update(
    {
        key: (key,)
        for name in SCHEDULES
        if name not in ("linear", "scaled_linear")
        for key in ((name, f"{name}+zero_snr") if name in ZERO_SNR_CHANGES else (name,))
    }
)
# Refused combinations, with a word of the reason that the one-line error must contain.
REFUSED = {(s, p, k): "laplace" for s in ("laplace",) for p in PREDICTIONS for k in diffusion.SAMPLERS}


@functools.cache
def standard_normal(shape=SHAPE):
    return jax.random.normal(jax.random.key(3), shape)


def make_schedule(key):
    name, zero_snr = key.removesuffix("+zero_snr"), key.endswith("+zero_snr")
    kwargs = {"params": diffusion.learned_schedule_init(jax.random.key(0))} if name == "learned" else {}
    return diffusion.get_schedule(name, zero_snr=zero_snr, **kwargs)


def _exact_output(grid_t, logsnr, prediction, x, t):
    """The exact denoiser of N(MU, S^2) data as a `prediction`-kind output, at the grid's times only: the
    schedule's logSNR there comes in as an array, so the sampling loops hold no schedule code and every schedule
    shares them (the persistent compilation cache of conftest.py finds the identical programs). A time off the
    grid gives NaN."""
    i = jnp.argmin(jnp.abs(grid_t - t[0]))
    a, s = alpha_sigma_from_logsnr(jnp.where(grid_t[i] == t[0], logsnr[i], jnp.nan))
    x0 = MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)
    eps = (x - a * x0) / s
    return diffusion.from_x0_eps(x0, eps, a, s, prediction)


@jax.jit
def _logsnr(schedule, t):
    return schedule.logsnr(t)


def exact_denoiser(schedule, prediction, grid_t):
    """`_exact_output` on `schedule` at the times `grid_t` (a pytree: new times or schedules retrace nothing)."""
    return jax.tree_util.Partial(_exact_output, grid_t, _logsnr(schedule, grid_t), prediction)


def marginal(logsnr, z):
    a, s = alpha_sigma_from_logsnr(logsnr)
    return a * MU + jnp.sqrt(a**2 * S**2 + s**2) * z


def posterior_mean(logsnr, x):
    a, s = alpha_sigma_from_logsnr(logsnr)
    return MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)


def run(schedule, prediction, sampler, num_steps, z, **grid):
    """`sample` from the exact marginal at the grid's first level; returns (samples, grid)."""
    g = diffusion.sampling_grid(schedule, sampler=sampler, num_steps=num_steps, prediction=prediction, **grid)
    out = diffusion.sample(
        exact_denoiser(schedule, prediction, g.t),
        marginal(g.logsnr[0], z),
        schedule=schedule,
        prediction=prediction,
        sampler=sampler,
        num_steps=num_steps,
        rng=jax.random.key(1, impl="rbg"),
        **grid,
    )
    return out, g


def law_errors(out) -> list[str]:
    n = out.size
    mean, std = float(out.mean()), float(out.std())
    errors = []
    if abs(mean - MU) > 4 * S / np.sqrt(n):
        errors.append(f"mean {mean:.4f} (data {MU})")
    if abs(std - S) > 4 * S / np.sqrt(2 * n):
        errors.append(f"std {std:.4f} (data {S})")
    return errors


def fitted_order(schedule, prediction, sampler, z):
    """The order on the logSNR-uniform grid. Every deterministic sampler's last step into sigma = 0 returns the
    denoiser's x0 at the last level, so the reference is the exact posterior mean at the exact state there."""
    errors = []
    for num_steps in ORDER_STEPS:
        out, g = run(schedule, prediction, sampler, num_steps, z, spacing="logsnr")
        last = g.logsnr[num_steps - 1]
        errors.append(float(jnp.mean(jnp.abs(out - posterior_mean(last, marginal(last, z))))))
    return float(np.log(errors[0] / errors[1]) / np.log(ORDER_STEPS[1] / ORDER_STEPS[0])), errors


def check(schedule, prediction, sampler, z) -> list[str]:
    """The failures of one combination (empty: it samples the law, at its order when deterministic)."""
    if diffusion.sampler_spec(sampler).is_stochastic():
        return law_errors(run(schedule, prediction, sampler, STOCHASTIC_STEPS, z)[0])
    out, g = run(schedule, prediction, sampler, LAW_STEPS, z)
    failures = law_errors(out)
    off = float(jnp.mean(jnp.abs(out - (MU + S * z))))
    last = g.logsnr[LAW_STEPS - 1]
    jump = float(jnp.mean(jnp.abs(posterior_mean(last, marginal(last, z)) - (MU + S * z))))
    p = min(ORDERS[sampler], 2)
    if off > jump + BUDGET[p] / LAW_STEPS**p:
        failures.append(f"{off:.3g} from the exact ODE solution at {LAW_STEPS} steps (final jump {jump:.3g})")
    if prediction in ORDER_PREDICTIONS:
        order, errors = fitted_order(schedule, prediction, sampler, z)
        if order < ORDERS[sampler] - ORDER_SLACK.get(sampler, 0.3):
            failures.append(f"fitted order {order:.2f} (errors {errors[0]:.3g}, {errors[1]:.3g})")
    return failures


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("group", list(GROUPS))
def test_sampler_matrix(group, prediction):
    z = standard_normal()
    failures = []
    for key in GROUPS[group]:
        schedule = make_schedule(key)
        for sampler in diffusion.SAMPLERS:
            where = f"{key} / {prediction} / {sampler}"
            if (key, prediction, sampler) in REFUSED:
                try:
                    diffusion.sample(exact_denoiser(schedule, prediction, jnp.ones(1)), z, schedule=schedule,
                                     prediction=prediction, sampler=sampler, rng=jax.random.key(1, impl="rbg"))
                    failures.append(f"{where}: not refused")
                except ConfigError as e:
                    message = str(e)
                    if REFUSED[key, prediction, sampler] not in message or "\n" in message:
                        failures.append(f"{where}: refused with '{message}'")
                    if "spacing='logsnr'" not in message:
                        failures.append(f"{where}: the refusal names no fix: '{message}'")
                continue
            failures += [f"{where}: {failure}" for failure in check(schedule, prediction, sampler, z)]
    assert not failures, "\n".join(failures)


def test_matrix_covers_every_schedule_prediction_and_sampler():
    keys = [key for group in GROUPS.values() for key in group]
    assert len(keys) == len(set(keys))
    assert {key.removesuffix("+zero_snr") for key in keys} == set(SCHEDULES)
    assert {key for key in keys if key.endswith("+zero_snr")} == {f"{n}+zero_snr" for n in ZERO_SNR_CHANGES}
    assert set(PREDICTIONS) == set(diffusion.PREDICTIONS) - {"flow"}  # flow: the x0 / v path, like v
    assert set(ORDERS) == {k for k, spec in diffusion.SAMPLER_SPECS.items() if not spec.is_stochastic()}
    assert all(key in keys and p in PREDICTIONS and k in diffusion.SAMPLERS for key, p, k in REFUSED)


@pytest.mark.parametrize("name", [n for n in SCHEDULES if n not in ZERO_SNR_CHANGES])
def test_zero_snr_leaves_schedules_that_end_at_zero_snr_unchanged(name):
    plain, rescaled = make_schedule(name), make_schedule(f"{name}+zero_snr")
    t = jnp.linspace(0.005, 0.995, 199)
    assert float(_logsnr(plain, 1.0)) == float(_logsnr(rescaled, 1.0)) == -np.inf
    np.testing.assert_allclose(_logsnr(rescaled, t), _logsnr(plain, t), rtol=1e-4, atol=1e-4)
    assert rescaled.uniform_grid_problem() == plain.uniform_grid_problem()


def test_one_step_from_zero_snr_with_eps_is_refused():
    """eps-prediction out of pure noise takes its x0 from the next level; with one step that is the clean end,
    where an eps network says nothing either."""
    schedule = make_schedule("cosine")
    z = standard_normal((8, 2))
    grid_t = jnp.array([1.0, 0.0])
    with pytest.raises(ConfigError, match="num_steps >= 2"):
        diffusion.sample(exact_denoiser(schedule, "eps", grid_t), z, schedule=schedule, prediction="eps",
                         num_steps=1)
    out = diffusion.sample(exact_denoiser(schedule, "v", grid_t), z, schedule=schedule, prediction="v", num_steps=1)
    np.testing.assert_allclose(out, MU, atol=1e-5)  # one step from pure noise lands on E[x0]


def test_laplace_samples_on_the_logsnr_grid_the_refusal_names():
    schedule = make_schedule("laplace")
    z = standard_normal()
    out, _ = run(schedule, "v", "dpmpp_2m", 32, z, spacing="logsnr")
    assert not law_errors(out)
    assert float(jnp.mean(jnp.abs(out - (MU + S * z)))) < 0.01  # 0.005
