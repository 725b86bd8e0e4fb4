"""Samplers and schedules against diffusers' PyTorch schedulers on SD's scaled_linear table.

Both sides are fed the same deterministic fake network eps = f(x, timestep) (closed form, nonlinear in x and
in the timestep) and the same noise; diffusers' Euler-type schedulers work on x / alpha, so states are
converted with sqrt(sigma^2 + 1) where they cross over.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from ldm_jax import diffusion
from ldm_jax.diffusion import samplers as samplers_lib
from ldm_jax.diffusion.sampling import make_model

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 4, 3)
TOL = 1e-5
CLASSES = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "dpmpp_2m_sde": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
EDM_SCALED = ("euler", "euler_ancestral", "heun")


def fake_net(x, timestep, lib):
    """A smooth, nonlinear stand-in for a U-Net's output; `lib` is jnp or torch."""
    ts = timestep / 1000.0
    return 0.9 * x * (1.0 - 0.3 * ts) + 0.2 * lib.tanh(2.0 * x) * lib.cos(3.0 * ts) + 0.1 * lib.sin(5.0 * ts)


SCHEDULE = diffusion.get_schedule("scaled_linear")


def denoise(x, t):
    """The fake network behind our samplers: one function object, so its compiled loops are reused."""
    return fake_net(x, SCHEDULE.timestep(t)[:, None, None, None], jnp)


@pytest.fixture(scope="module")
def schedule():
    return SCHEDULE


def make_scheduler(sampler, spacing, prediction="eps", final="zero"):
    kwargs = dict(
        SD,
        timestep_spacing=spacing,
        steps_offset=1,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
    )
    if sampler == "ddim":
        kwargs.update(clip_sample=False, set_alpha_to_one=final == "zero")
    if sampler == "ddpm":
        kwargs.update(clip_sample=False)
    if sampler == "dpmpp_2m_sde":
        kwargs.update(algorithm_type="sde-dpmsolver++")
    return CLASSES[sampler](**kwargs)


def step_noise(rng, i):
    return np.array(jax.random.normal(jax.random.fold_in(rng, i), SHAPE, jnp.float32))


class NoiseFeed:
    """Stands in for diffusers' randn_tensor: returns our per-step noise in call order."""

    def __init__(self, rng):
        self.rng, self.i = rng, 0

    def __call__(self, shape, **kwargs):
        out = torch.from_numpy(step_noise(self.rng, self.i))
        self.i += 1
        return out


def run_diffusers(sampler, spacing, num_steps, x_vp, rng, prediction="eps", final="zero", monkeypatch=None):
    sch = make_scheduler(sampler, spacing, prediction, final)
    sch.set_timesteps(num_steps)
    feed = NoiseFeed(rng)
    if monkeypatch is not None and sampler in ("ddpm", "euler_ancestral"):
        monkeypatch.setattr(f"{type(sch).__module__}.randn_tensor", feed)
    scale = float((sch.sigmas[0] ** 2 + 1) ** 0.5) if sampler in EDM_SCALED else 1.0
    latents = torch.from_numpy(np.asarray(x_vp) * scale)
    for ts in sch.timesteps:
        inp = sch.scale_model_input(latents, ts)
        out = fake_net(inp, ts.float(), torch)
        kwargs = {}
        if sampler == "dpmpp_2m_sde":
            kwargs["variance_noise"] = torch.from_numpy(step_noise(rng, feed.i))
            feed.i += 1
        latents = sch.step(out, ts, latents, **kwargs).prev_sample
    return latents.numpy()


def run_ours(schedule, sampler, spacing, num_steps, x_vp, rng, prediction="eps", final="zero"):
    return np.asarray(
        diffusion.sample(
            denoise,
            jnp.asarray(x_vp),
            schedule=schedule,
            prediction=prediction,
            sampler=sampler,
            num_steps=num_steps,
            spacing=spacing,
            final=final,
            rng=rng,
        )
    )


LOOP_CASES = [
    (sampler, spacing)
    for sampler in ("ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
    for spacing in ("leading", "trailing", "linspace")
    if not (sampler in ("ddim",) and spacing == "linspace")
]


@pytest.mark.parametrize("sampler,spacing", LOOP_CASES)
def test_whole_loop_matches_diffusers(schedule, sampler, spacing, monkeypatch):
    num_steps = 10
    rng = jax.random.key(3, impl="rbg")
    x_vp = np.asarray(jax.random.normal(jax.random.key(0), SHAPE))
    ref = run_diffusers(sampler, spacing, num_steps, x_vp, rng, monkeypatch=monkeypatch)
    ours = run_ours(schedule, sampler, spacing, num_steps, x_vp, rng)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "sampler,prediction,final,num_steps",
    [
        ("ddim", "v", "sigma_min", 20),  # SD's DDIM config: set_alpha_to_one=False
        ("dpmpp_2m", "v", "zero", 20),  # N >= 15: the last step stays second order only if final != zero
        ("unipc", "v", "zero", 16),
        ("euler", "v", "zero", 12),
    ],
)
def test_loop_variants_match_diffusers(schedule, sampler, prediction, final, num_steps):
    rng = jax.random.key(5, impl="rbg")
    x_vp = np.asarray(jax.random.normal(jax.random.key(1), SHAPE))
    ref = run_diffusers(sampler, "trailing", num_steps, x_vp, rng, prediction, final)
    ours = run_ours(schedule, sampler, "trailing", num_steps, x_vp, rng, prediction, final)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


SINGLE_CASES = [(s, i) for s in ("ddim", "euler", "euler_ancestral", "heun") for i in (0, 4)]
SINGLE_CASES += [("dpmpp_2m", 0), ("unipc", 0)]  # later multistep updates need history: see the loop tests


@pytest.mark.parametrize("sampler,index", SINGLE_CASES)
def test_single_step_matches_diffusers(schedule, sampler, index, monkeypatch):
    """One update from the same state at grid index `index` (multistep methods: their first step)."""
    num_steps, spacing = 8, "leading"
    rng = jax.random.key(7, impl="rbg")
    x_vp = np.asarray(jax.random.normal(jax.random.key(2), SHAPE))
    sch = make_scheduler(sampler, spacing)
    sch.set_timesteps(num_steps)
    if sampler == "euler_ancestral":
        monkeypatch.setattr(
            f"{type(sch).__module__}.randn_tensor",
            lambda shape, **kw: torch.from_numpy(step_noise(rng, index)),
        )
    pos = 2 * index if sampler == "heun" else index  # Heun's arrays repeat every interior sigma/timestep
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(pos)
    sigmas = getattr(sch, "sigmas", None)
    scale_in = float((sigmas[pos] ** 2 + 1) ** 0.5) if sampler in EDM_SCALED else 1.0
    latents = torch.from_numpy(x_vp * scale_in)
    for ts in sch.timesteps[pos : pos + (2 if sampler == "heun" else 1)]:
        out = fake_net(sch.scale_model_input(latents, ts), ts.float(), torch)
        latents = sch.step(out, ts, latents).prev_sample
    pos_next = pos + 2 if sampler == "heun" else pos + 1
    scale_out = float((sigmas[pos_next] ** 2 + 1) ** 0.5) if sampler in EDM_SCALED else 1.0
    ref = latents.numpy() / scale_out

    grid = diffusion.sampling_grid(schedule, sampler=sampler, num_steps=num_steps, spacing=spacing)
    opts = samplers_lib.Options(eta=1.0 if sampler == "euler_ancestral" else 0.0)

    @jax.jit
    def one_step(x, key):
        model = make_model(denoise, "eps", 2)
        ctx = samplers_lib.Ctx(model, grid, schedule, num_steps, 0, opts)
        spec = samplers_lib.sampler_spec(sampler)
        return spec.step(ctx, index, x, spec.init_state(x), key)[0]

    ours = one_step(jnp.asarray(x_vp), jax.random.fold_in(rng, index))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers(spacing):
    for sampler in ("ddim", "euler", "dpmpp_2m", "unipc"):
        for num_steps in (7, 10, 25):
            sch = make_scheduler(sampler, spacing)
            sch.set_timesteps(num_steps)
            ours = diffusion.sd_timesteps(num_steps, spacing, style=samplers_lib.sampler_spec(sampler).grid_style)
            np.testing.assert_allclose(
                ours, sch.timesteps.numpy(), atol=1e-4, err_msg=f"{sampler}/{num_steps}"
            )
    grid = diffusion.time_grid(SCHEDULE, 10, spacing, style="multistep")
    sch = make_scheduler("unipc", spacing)
    sch.set_timesteps(10)
    np.testing.assert_allclose(SCHEDULE.timestep(grid.t[:-1]), sch.timesteps.numpy(), atol=2e-4)


def test_alphas_cumprod_match_diffusers():
    for name, kw in (("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)), ("linear", {})):
        ref = DDPMScheduler(beta_schedule=name, **kw).alphas_cumprod.numpy()
        ours = diffusion.get_schedule(name)
        np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref, atol=1e-6, rtol=0)
        np.testing.assert_allclose(
            np.asarray(ours.alpha_sigma(ours.t_of_timestep(np.arange(1000)))[0] ** 2), ref, atol=1e-6, rtol=0
        )
    ref = DDIMScheduler(**SD, rescale_betas_zero_snr=True).alphas_cumprod.numpy()
    ours = diffusion.get_schedule("scaled_linear", zero_snr=True)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref, atol=1e-6, rtol=0)
    assert float(ours.alphas_cumprod[-1]) == 0.0


def test_euler_sigmas_match_diffusers(schedule):
    """Fractional linspace timesteps: sigma/alpha interpolated linearly in the timestep, as diffusers does.

    diffusers forms sigma from float32 alphas_cumprod, so 1 - abar_0 carries a ~1e-5 relative rounding error
    at timestep 0 (our table is float64); hence rtol 2e-5.
    """
    sch = make_scheduler("euler", "linspace")
    sch.set_timesteps(13)
    grid = diffusion.sampling_grid(schedule, sampler="euler", num_steps=13, spacing="linspace")
    np.testing.assert_allclose(np.asarray(jnp.exp(-0.5 * grid.logsnr)), sch.sigmas.numpy(), rtol=2e-5)
