"""Classifier-free guidance, the `sample` entry point (tracing, img2img, inpainting) and its errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ldm_jax import diffusion
from ldm_jax.types import ConfigError

SD = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((3, 4, 4, 2)), jnp.float32)
T = jnp.array([0.1, 0.5, 0.9])


def model_fn(x, t, ctx):
    """Conditional fake network: the context shifts and scales the output."""
    return x * ctx["scale"][:, None, None, None] + ctx["shift"][:, None, None, :] * t[:, None, None, None]


COND = {"scale": jnp.array([1.0, 2.0, 0.5]), "shift": jnp.asarray(RNG.standard_normal((3, 2)), jnp.float32)}
UNCOND = {"scale": jnp.array([0.3]), "shift": jnp.zeros((1, 2))}


def test_cfg_formula_and_special_scales():
    out_c, out_u = (
        model_fn(X, T, COND),
        model_fn(X, T, jax.tree_util.tree_map(lambda u: jnp.repeat(u, 3, 0), UNCOND)),
    )
    np.testing.assert_allclose(diffusion.cfg(model_fn, COND, UNCOND, 1.0)(X, T), out_c, rtol=1e-6)
    np.testing.assert_allclose(diffusion.cfg(model_fn, COND, UNCOND, 0.0)(X, T), out_u, rtol=1e-6, atol=1e-6)
    guided = diffusion.cfg(model_fn, COND, UNCOND, 7.5)(X, T)
    np.testing.assert_allclose(guided, out_u + 7.5 * (out_c - out_u), rtol=1e-5, atol=1e-5)
    unbatched = diffusion.cfg(model_fn, COND, UNCOND, 7.5, batched=False)(X, T)
    np.testing.assert_allclose(unbatched, guided, rtol=1e-6)


def test_cfg_rescale_and_interval():
    out_c = model_fn(X, T, COND)
    plain = diffusion.cfg(model_fn, COND, UNCOND, 5.0)(X, T)
    full = diffusion.cfg(model_fn, COND, UNCOND, 5.0, rescale=1.0)(X, T)
    # phi = 1: the guided output takes the conditional output's per-example std (Lin et al. 2023, Eq. 15).
    np.testing.assert_allclose(full.std(axis=(1, 2, 3)), out_c.std(axis=(1, 2, 3)), rtol=1e-5)
    ratio = out_c.std(axis=(1, 2, 3)) / plain.std(axis=(1, 2, 3))
    np.testing.assert_allclose(full, plain * ratio[:, None, None, None], rtol=1e-4, atol=1e-6)
    mixed = diffusion.cfg(model_fn, COND, UNCOND, 5.0, rescale=0.7)(X, T)
    np.testing.assert_allclose(mixed, 0.7 * full + 0.3 * plain, rtol=1e-5, atol=1e-6)
    inter = diffusion.cfg(model_fn, COND, UNCOND, 5.0, interval=(0.3, 0.6))(X, T)
    np.testing.assert_allclose(inter[1], plain[1], rtol=1e-6)  # t = 0.5: guided
    np.testing.assert_allclose(inter[jnp.array([0, 2])], out_c[jnp.array([0, 2])], rtol=1e-6)  # outside: cond


def test_cfg_errors():
    with pytest.raises(ConfigError, match="rescale"):
        diffusion.cfg(model_fn, COND, UNCOND, 5.0, rescale=1.5)
    with pytest.raises(ConfigError, match="interval"):
        diffusion.cfg(model_fn, COND, UNCOND, 5.0, interval=(0.8, 0.2))
    with pytest.raises(ConfigError, match="does not match"):
        diffusion.cfg(model_fn, COND, {"scale": jnp.ones(2), "shift": jnp.zeros((2, 2))}, 5.0)


def test_sample_traces_once_per_shape_sampler_and_steps():
    schedule = diffusion.get_schedule("scaled_linear")

    @chex.assert_max_traces(n=1)
    def net(x, t, ctx):
        return model_fn(x, t, ctx) * 0.1

    for i in range(3):  # new contexts, guidance scale and noise: no retrace
        cond = jax.tree_util.tree_map(lambda c, shift=i: c + shift, COND)
        guided = diffusion.cfg(net, cond, UNCOND, 3.0 + i)
        out = diffusion.sample(
            guided, X + i, schedule=schedule, sampler="dpmpp_2m", num_steps=6, spacing="trailing"
        )
        assert out.shape == X.shape and bool(jnp.all(jnp.isfinite(out)))

    @chex.assert_max_traces(n=2)
    def net2(x, t):
        return 0.5 * x

    for shape in ((2, 4, 4, 2), (2, 4, 4, 2), (1, 8, 8, 2), (1, 8, 8, 2)):
        diffusion.sample(net2, jnp.ones(shape), schedule=schedule, sampler="ddim", num_steps=5)
    with pytest.raises(AssertionError):
        diffusion.sample(net2, jnp.ones((1, 2, 2, 2)), schedule=schedule, sampler="ddim", num_steps=5)


def fake_net(x, timestep, lib):
    ts = timestep / 1000.0
    return 0.9 * x * (1.0 - 0.3 * ts) + 0.2 * lib.tanh(2.0 * x) * lib.cos(3.0 * ts)


@pytest.mark.parametrize(
    "sampler,cls",
    [("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler)],
)
def test_img2img_matches_diffusers(sampler, cls):
    """diffusers' img2img: keep the last int(N * strength) timesteps and add_noise the init at the first."""
    schedule = diffusion.get_schedule("scaled_linear")
    num_steps, strength = 10, 0.55
    init, noise = np.array(X), RNG.standard_normal(X.shape).astype(np.float32)
    sch = cls(**SD, timestep_spacing="leading", **({"clip_sample": False} if cls is DDIMScheduler else {}))
    sch.set_timesteps(num_steps)
    start = num_steps - int(num_steps * strength)
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(start)
    timesteps = sch.timesteps[start:]
    latents = sch.add_noise(torch.from_numpy(init), torch.from_numpy(noise), timesteps[:1])
    for ts in timesteps:
        out = fake_net(sch.scale_model_input(latents, ts), ts.float(), torch)
        latents = sch.step(out, ts, latents).prev_sample
    denoise = lambda x, t: fake_net(x, schedule.timestep(t)[:, None, None, None], jnp)
    ours = diffusion.sample(
        denoise,
        jnp.asarray(noise),
        schedule=schedule,
        sampler=sampler,
        num_steps=num_steps,
        spacing="leading",
        init=jnp.asarray(init),
        strength=strength,
    )
    np.testing.assert_allclose(ours, latents.numpy(), atol=1e-5)


def test_inpainting_matches_diffusers_and_keeps_the_known_region():
    schedule = diffusion.get_schedule("scaled_linear")
    num_steps = 8
    known, noise = np.array(X), RNG.standard_normal(X.shape).astype(np.float32)
    mask = np.zeros((3, 4, 4, 1), np.float32)
    mask[:, :2] = 1.0  # generate the top half
    sch = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    sch.set_timesteps(num_steps)
    latents, m = torch.from_numpy(noise), torch.from_numpy(mask)
    for i, ts in enumerate(sch.timesteps):
        latents = sch.step(fake_net(latents, ts.float(), torch), ts, latents).prev_sample
        proper = torch.from_numpy(known)
        if i < num_steps - 1:
            proper = sch.add_noise(proper, torch.from_numpy(noise), sch.timesteps[i + 1 : i + 2])
        latents = (1 - m) * proper + m * latents
    denoise = lambda x, t: fake_net(x, schedule.timestep(t)[:, None, None, None], jnp)
    ours = diffusion.sample(
        denoise,
        jnp.asarray(noise),
        schedule=schedule,
        sampler="ddim",
        num_steps=num_steps,
        spacing="trailing",
        final="sigma_min",
        mask=jnp.asarray(mask),
        known=jnp.asarray(known),
    )
    np.testing.assert_allclose(ours, latents.numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ours)[:, 2:], known[:, 2:])
    assert float(jnp.abs(ours[:, :2] - known[:, :2]).max()) > 0.1


def test_learned_schedule_and_every_spacing_sample():
    params = diffusion.learned_schedule_init(jax.random.key(0, impl="rbg"), hidden=8)
    schedules = {
        "learned": diffusion.LearnedSchedule(params),
        "edm": diffusion.get_schedule("edm", shift=2.0),
        "zero_snr": diffusion.get_schedule("scaled_linear", zero_snr=True),
    }
    for name, spacing, sampler, prediction in (
        ("learned", "karras", "heun", "x0"),
        ("edm", "logsnr", "unipc", "v"),
        ("zero_snr", "trailing", "euler", "v"),
        ("zero_snr", "leading", "ddim", "v"),
    ):
        out = diffusion.sample(
            lambda x, t: 0.3 * x,
            X,
            schedule=schedules[name],
            prediction=prediction,
            sampler=sampler,
            num_steps=6,
            spacing=spacing,
        )
        assert bool(jnp.all(jnp.isfinite(out))), (name, spacing, sampler)


def test_sample_errors_are_one_line():
    s = diffusion.get_schedule("cosine")
    net = lambda x, t: x
    with pytest.raises(ConfigError, match="did you mean 'dpmpp_2m'"):
        diffusion.sample(net, X, schedule=s, sampler="dpmpp2m")
    with pytest.raises(ConfigError, match="rng="):
        diffusion.sample(net, X, schedule=s, sampler="euler_ancestral")
    with pytest.raises(ConfigError, match="eta"):
        diffusion.sample(net, X, schedule=s, sampler="dpmpp_2m", eta=0.5)
    with pytest.raises(ConfigError, match="discrete schedule"):
        diffusion.sample(net, X, schedule=s, spacing="leading")
    with pytest.raises(ConfigError, match="strength"):
        diffusion.sample(net, X, schedule=s, init=X, strength=0.0)
    with pytest.raises(ConfigError, match="both mask= and known="):
        diffusion.sample(net, X, schedule=s, mask=jnp.ones_like(X))
    with pytest.raises(ConfigError, match="num_steps"):
        diffusion.sample(net, X, schedule=s, num_steps=0)
