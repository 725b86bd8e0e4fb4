"""Both real stages end to end through the main job's code path (`ldm-jax demo --variant=tiny`):
shapes dataset -> autoencoder -> text-conditioned LDM -> guided samples -> shapes scores."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldm_jax.commands.demo import demo_prompts, run_demo
from ldm_jax.training.writers import read_metrics


def test_demo_tiny_runs_both_stages_and_resumes(tmp_path):
    workdir = str(tmp_path / "demo")
    summary = run_demo(workdir, "tiny")

    ae = read_metrics(os.path.join(workdir, "autoencoder"))
    losses = [r["loss"] for r in ae if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], f"autoencoder loss did not fall: {losses}"
    assert os.path.exists(os.path.join(workdir, "autoencoder", "samples", "0000030.png"))

    ldm = read_metrics(os.path.join(workdir, "ldm"))
    assert [r["step"] for r in ldm if "loss" in r] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in ldm if "loss" in r)
    assert os.path.exists(os.path.join(workdir, "ldm", "samples", "0000004.png"))

    prompts, heldout = demo_prompts()
    assert sum(heldout) == 3 and len(prompts) == 18
    for key in ("color_acc", "shape_acc", "position_acc", "heldout_color_acc", "heldout_shape_acc", "minutes"):
        assert 0.0 <= summary[key] <= (1.0 if key != "minutes" else 60.0), key
    assert summary["num_images"] == 72
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["color_acc"] == summary["color_acc"]
    assert os.path.getsize(os.path.join(workdir, "samples.png")) > 1000

    one_model_one_path(tmp_path, os.path.join(workdir, "ldm"))

    # `ldm-jax evaluate` on the autoencoder: PSNR/SSIM of held-out data and photos
    proc = subprocess.run([sys.executable, "-m", "ldm_jax", "evaluate", f"--workdir={workdir}/autoencoder"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(workdir, "autoencoder", "eval.json")) as f:
        result = json.load(f)
    assert result["stage"] == "autoencoder"
    assert 5.0 < result["heldout_psnr"] < 60.0 and -1.0 <= result["heldout_ssim"] <= 1.0
    assert np.isfinite(result["photos_psnr"]) and np.isfinite(result["photos_ssim"])

    again = run_demo(workdir, "tiny")  # rerun continues: both stages are finished, nothing retrains
    assert len(read_metrics(os.path.join(workdir, "autoencoder"))) == len(ae)
    assert again["color_acc"] == summary["color_acc"]


def _pngs(folder) -> list:
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png") and n != "grid.png")
    return [np.asarray(Image.open(os.path.join(folder, n))) for n in names]


def one_model_one_path(tmp_path, ldm_dir: str):
    """One trained workdir, one prompt list, seed, sampler, steps and guidance: `ldm-jax sample`, `ldm-jax
    evaluate --save_images`, the training loop's grid and the Python API give the same pixels, bit for bit;
    so do a batch of 1 vs 8 and 1 vs 8 devices."""
    import jax

    from ldm_jax.configlib import load_config
    from ldm_jax.images import make_grid
    from ldm_jax.ldm import LatentDiffusion

    prompts, _ = demo_prompts()  # the 18 prompts `evaluate` scores on shapes
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    sample_dir, eval_dir = tmp_path / "sampled", tmp_path / "evaluated"
    proc = subprocess.run([sys.executable, "-m", "ldm_jax", "sample", f"--model={ldm_dir}", "--num_steps=2",
                           f"--prompts_file={tmp_path / 'prompts.txt'}", "--seed=0", f"--out={sample_dir}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "ldm_jax", "evaluate", f"--workdir={ldm_dir}", "--num_samples=18",
                           "--num_steps=2", f"--save_images={eval_dir}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(ldm_dir, "eval.json")) as f:
        result = json.load(f)
    assert result["stage"] == "ldm" and result["num_images"] == 18 and result["num_steps"] == 2
    assert all(0.0 <= result[k] <= 1.0 for k in ("color_acc", "shape_acc", "heldout_color_acc"))
    sampled, evaluated = np.stack(_pngs(sample_dir)), np.stack(_pngs(eval_dir))
    assert sampled.shape == (18, 16, 16, 3) and sampled.std() > 1
    np.testing.assert_array_equal(sampled, evaluated)
    meta = Image.open(sample_dir / "0005-seed5.png").text
    assert meta["prompt"] == prompts[5] and meta["seed"] == "5" and meta["num_steps"] == "2"

    model = LatentDiffusion.from_workdir(ldm_dir)
    settings = dict(sampler="ddim", num_steps=2, guidance_scale=3.0)  # the tiny config's sample section
    assert model.generate(prompts[:1], **settings).shape == (1, 16, 16, 3)
    api = model.generate(prompts, seed=0, **settings)  # all 18 at once over the 8 devices
    np.testing.assert_array_equal(api, sampled)
    alone = model.generate(prompts[7:8], seed=7, **settings)  # image 7 alone (batch of 1, one device)
    np.testing.assert_array_equal(alone[0], sampled[7])
    one_device = model.generate(prompts[:8], seed=0, batch_size=8, devices=jax.devices()[:1], **settings)
    np.testing.assert_array_equal(one_device, sampled[:8])
    in_ones = model.generate(prompts[:8], seed=0, batch_size=1, **settings)
    np.testing.assert_array_equal(in_ones, sampled[:8])

    # the training loop's grid of step 4 (EMA parameters, the config's sample section) is that checkpoint's images
    cfg = load_config("configs/shapes_ldm.py:tiny").sample
    grid_images = model.generate(list(cfg.prompts), seed=int(cfg.seed), sampler=str(cfg.sampler),
                                 num_steps=int(cfg.num_steps), guidance_scale=float(cfg.guidance_scale))
    grid = np.asarray(Image.open(os.path.join(ldm_dir, "samples", "0000004.png")))
    np.testing.assert_array_equal(grid, make_grid(grid_images))


def test_eval_callbacks_log_metrics_during_training(tmp_path):
    """config.eval wires EvalCallback into both stages: recon (autoencoder), adherence (latent diffusion)."""
    from ldm_jax.configlib import load_config
    from ldm_jax.training import run
    from ldm_jax.types import ConfigError

    data = str(tmp_path / "data")
    ae = load_config("configs/shapes_autoencoder.py:tiny")
    ae.data.data_dir = data
    ae.train.num_steps, ae.sample.every_steps = 4, 0
    ae.eval.every_steps, ae.eval.metrics, ae.eval.num_samples = 2, ("recon",), 8
    run(ae, str(tmp_path / "ae"))
    rows = [r for r in read_metrics(str(tmp_path / "ae")) if "eval/recon/psnr" in r]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["eval/recon/ssim"]) for r in rows)

    ldm = load_config("configs/shapes_ldm.py:tiny")
    ldm.data.data_dir, ldm.model.vae.workdir = data, str(tmp_path / "ae")
    ldm.train.num_steps, ldm.sample.every_steps = 2, 2
    ldm.eval.every_steps, ldm.eval.metrics, ldm.eval.num_samples = 2, ("adherence",), 4
    # Choices of the diffusion core from the config alone: a learned (VDM) schedule trained with the network
    # under the ELBO weighting, and EDM's preconditioning (x0 prediction).
    ldm.diffusion.update(schedule="learned", schedule_options={"hidden": 16}, weighting="elbo", prediction="x0",
                         precondition="edm", sigma_data=0.5)
    ldm_dir = str(tmp_path / "ldm")
    state = run(ldm, ldm_dir)
    metrics = read_metrics(ldm_dir)
    losses = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in losses] == [2] and np.isfinite(losses[0]["loss"])
    assert np.isfinite(losses[0]["schedule_loss_second_moment"])
    rows = [r for r in metrics if "eval/adherence/color_acc" in r]
    assert [r["step"] for r in rows] == [2] and 0.0 <= rows[0]["eval/adherence/color_acc"] <= 1.0

    # the endpoints stay fixed; a workdir reloads the trained schedule, and the training grid (learned schedule of
    # step 2) is what the reloaded model generates
    from ldm_jax import diffusion
    from ldm_jax.images import make_grid
    from ldm_jax.ldm import LatentDiffusion

    trained = jax.device_get(state.extra["params"])
    assert float(trained["logsnr_min"]) == -10.0 and float(trained["logsnr_max"]) == 10.0
    model = LatentDiffusion.from_workdir(ldm_dir)
    t = np.linspace(0.05, 0.95, 7)
    want = diffusion.get_schedule("learned", params=trained).logsnr(t)
    np.testing.assert_array_equal(np.asarray(model.schedule.logsnr(t)), np.asarray(want))
    s = ldm.sample
    images = model.generate(list(s.prompts), seed=int(s.seed), sampler=str(s.sampler), num_steps=int(s.num_steps),
                            guidance_scale=float(s.guidance_scale))
    grid = np.asarray(Image.open(os.path.join(ldm_dir, "samples", "0000002.png")))
    np.testing.assert_array_equal(grid, make_grid(images))

    from ldm_jax.eval import stage_metrics

    ldm.eval.metrics = ("fd_fmnist",)  # a metric of another dataset: one clear error before training
    with pytest.raises(ConfigError, match="fashion_mnist"):
        stage_metrics.ldm_callbacks(ldm, generate=None)
    ldm.eval.metrics = ("adherance",)
    with pytest.raises(ConfigError, match="did you mean 'adherence'"):
        stage_metrics.ldm_callbacks(ldm, generate=None)


def test_learned_schedule_update_follows_the_loss_second_moment():
    """The learned schedule's update (VDM): one Adam step on the gradient of E[L^2] for the interior parameters,
    none for the endpoints; the second moment falls after it."""
    import optax

    from ldm_jax import diffusion
    from ldm_jax.ldm import build
    from ldm_jax.training.ldm import learned_schedule_updates

    dc = build.DiffusionConfig(schedule="learned", schedule_options=(("hidden", 8),), weighting="elbo")
    t = jnp.linspace(0.05, 0.95, 16)

    def per_example_loss(params, batch, rng, schedule, frozen):
        return 1.0 + 0.05 * schedule.logsnr(t) ** 2 / (1.0 + t), t

    def second_moment(p):
        return jnp.mean(jnp.square(per_example_loss(None, None, None, diffusion.get_schedule("learned", params=p),
                                                    None)[0]))

    updates = learned_schedule_updates(dc, per_example_loss, lr=1e-3)
    extra = updates["init_extra"](jax.random.key(0))
    new, metrics = updates["update_extra"](extra, {}, {}, jax.random.key(1), 0, frozen=None)
    grads = jax.grad(second_moment)(extra["params"])
    assert all(float(jnp.abs(grads[k]).max()) > 0 for k in ("w1", "w2", "b2", "w3", "logsnr_min", "logsnr_max"))
    grads = {k: jnp.zeros_like(g) if k in ("logsnr_min", "logsnr_max") else g for k, g in grads.items()}
    tx = optax.adam(1e-3)
    step, _ = tx.update(grads, tx.init(extra["params"]), extra["params"])
    want = optax.apply_updates(extra["params"], step)
    for k in want:
        np.testing.assert_allclose(np.asarray(new["params"][k]), np.asarray(want[k]), rtol=1e-6, atol=1e-9)
    assert float(new["params"]["logsnr_min"]) == -10.0 and float(new["params"]["logsnr_max"]) == 10.0
    assert metrics["schedule_loss_second_moment"] == pytest.approx(float(second_moment(extra["params"])), rel=1e-6)
    assert float(second_moment(new["params"])) < float(second_moment(extra["params"]))


def test_diffusion_section_truncates_continuous_schedules():
    """diffusion.logsnr_min bounds cosine's logSNR at t = 1 (untruncated it is -inf); zero_snr then rescales the
    truncated schedule to alpha(1) = 0; a discrete table rejects the bound in one line."""
    import math

    import ml_collections

    from ldm_jax.configlib import base_config
    from ldm_jax.ldm import build as components
    from ldm_jax.types import ConfigError

    c = base_config()
    assert math.isinf(float(components.schedule(c.diffusion).logsnr(1.0)))
    c.diffusion.logsnr_min = -10.0
    s = components.schedule(c.diffusion)
    np.testing.assert_allclose(float(s.logsnr(1.0)), -10.0, atol=1e-4)
    np.testing.assert_allclose(float(s.logsnr(0.0)), float(components.schedule(base_config().diffusion).logsnr(0.0)),
                               rtol=1e-6)
    c.diffusion.shift = 2.0
    np.testing.assert_allclose(float(components.schedule(c.diffusion).logsnr(1.0)), -10.0 - 2 * math.log(2), atol=1e-4)
    c.diffusion.shift, c.diffusion.zero_snr = 1.0, True
    assert float(components.schedule(c.diffusion).alpha_sigma(1.0)[0]) == 0.0
    bad = ml_collections.ConfigDict(dict(schedule="linear", logsnr_min=-10.0))
    with pytest.raises(ConfigError, match="linear"):
        components.schedule(bad)
