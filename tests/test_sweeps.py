"""Sweep expansion, the resumable runner and the report (mechanics; the end-to-end sweep with real
training lives with the training tests)."""

import json
import os
import types

import numpy as np
import pytest

from ldm_jax.configlib import base_config
from ldm_jax.sweeps import expand, render_report, run_sweep
from ldm_jax.sweeps.runner import read_results
from ldm_jax.types import ConfigError


def _sweep_config():
    c = base_config()
    c.sweep = dict(product=dict(diffusion=dict(schedule=("linear", "cosine"), prediction=("eps", "v"))),
                   zip=dict(diffusion=dict(weighting=("uniform", "min_snr"), min_snr_gamma=(0.0, 5.0))),
                   seeds=(0, 1), eval=dict(samplers=("ddim", "euler"), nfes=(2, 4)))
    return c


def test_expand_is_the_product_of_grid_zip_and_seeds():
    runs = expand(_sweep_config())
    assert len(runs) == 2 * 2 * 2 * 2
    assert len({r.name for r in runs}) == len(runs)
    r = runs[-1]
    assert dict(r.overrides) == {"diffusion.schedule": "cosine", "diffusion.prediction": "v",
                                 "diffusion.weighting": "min_snr", "diffusion.min_snr_gamma": 5.0, "train.seed": 1}
    assert r.config.diffusion.schedule == "cosine" and r.config.train.seed == 1 and "sweep" not in r.config


@pytest.mark.parametrize("variant", ["", ":tiny"])
def test_backbone_study_is_three_backbones_by_two_objectives_and_validates(variant):
    """configs/backbone_study.py: every run's whole config passes the sweep's checks before anything trains; each
    backbone trains with both objectives, and the flow runs use SD3's network input."""
    from ldm_jax.configlib import load_config
    from ldm_jax.sweeps.stages import validate

    config = load_config("configs/backbone_study.py" + variant)
    runs = expand(config)
    validate(config, runs)
    pairs = {(r.config.model.backbone, r.config.diffusion.prediction, r.config.diffusion.network_input) for r in runs}
    assert pairs == {(b, p, i) for b in ("unet", "dit", "mmdit") for p, i in (("v", "vp"), ("flow", "flow"))}


def test_extra_runs_follow_the_grid_and_duplicates_are_dropped():
    c = _sweep_config()
    c.sweep.extra = (dict(diffusion=dict(schedule="linear", prediction="eps", weighting="uniform", min_snr_gamma=0.0),
                          train=dict(seed=0)),  # already in the grid
                     dict(train=dict(seed=7), diffusion=dict(prediction="v", schedule="cosine", weighting="min_snr",
                                                             min_snr_gamma=5.0)))
    runs = expand(c)
    assert len(runs) == 2 * 2 * 2 * 2 + 1
    new = runs[-1]
    assert new.name.replace("seed=7", "seed=1") in {r.name for r in runs}  # named like its grid twin
    assert new.config.train.seed == 7 and new.config.diffusion.prediction == "v"
    c.sweep.extra = (dict(diffusion=dict(shedule="linear")),)
    with pytest.raises(ConfigError, match="diffusion.shedule"):
        expand(c)
    c.sweep.extra = ()
    c.sweep.first = (dict(diffusion=dict(schedule="cosine", prediction="v")), dict(train=dict(seed=1)))
    order = [dict(r.overrides) for r in expand(c)]
    assert [(o["diffusion.schedule"], o["diffusion.prediction"]) for o in order[:4]] == [("cosine", "v")] * 4
    assert [o["train.seed"] for o in order[4:10]] == [1] * 6 and len(order) == 16
    assert order[10:] == [o for o in map(dict, (r.overrides for r in expand(_sweep_config()))) if o not in order[:10]]


def test_bad_spec_errors():
    c = _sweep_config()
    c.sweep.product = dict(diffusion=dict(schedul=("linear",)))
    with pytest.raises(ConfigError, match="diffusion.schedul.*did you mean 'diffusion.schedule'"):
        expand(c)
    c = _sweep_config()
    c.sweep.zip = dict(diffusion=dict(weighting=("uniform",), min_snr_gamma=(0.0, 5.0)))
    with pytest.raises(ConfigError, match="equal lengths"):
        expand(c)


def _fake_train(calls):
    def train(config, workdir):
        calls.append(workdir)
        os.makedirs(workdir, exist_ok=True)
        scale = 2.0 if config.diffusion.schedule == "linear" else 1.0
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for step in range(1, 4):
                f.write(json.dumps({"step": step, "loss": scale / step}) + "\n")
    return train


def _fake_eval(config, workdir, *, sampler, num_steps):
    return {"fd": (2.0 if config.diffusion.schedule == "linear" else 1.0) / num_steps}


def test_runner_resumes_splits_hosts_and_reports(tmp_path):
    c = _sweep_config()
    c.sweep.product = dict(diffusion=dict(schedule=("linear", "cosine")))
    c.sweep.zip, c.sweep.seeds = {}, ()
    c.sweep.eval.extra = (("ddim", 8), ("euler", 4))  # one new point, one already in the grid
    calls = []
    rows = run_sweep(c, str(tmp_path), train_fn=_fake_train(calls), eval_fn=_fake_eval)
    assert len(rows) == 2 and len(calls) == 2
    assert rows[0]["final_loss"] == pytest.approx(2 / 3)
    assert {(e["sampler"], e["nfe"], e["fd"]) for e in rows[0]["evals"]} == {
        ("ddim", 2, 1.0), ("ddim", 4, 0.5), ("euler", 2, 1.0), ("euler", 4, 0.5), ("ddim", 8, 0.25)}
    assert len(rows[0]["evals"]) == 5 and rows[0]["eval_minutes"] >= 0
    run_sweep(c, str(tmp_path), train_fn=_fake_train(calls), eval_fn=_fake_eval)
    assert len(calls) == 2  # finished runs are skipped on rerun

    split = tmp_path / "hosts"
    got = [run_sweep(c, str(split), train_fn=_fake_train([]), eval_fn=_fake_eval, host_index=i, num_hosts=2)
           for i in range(2)]
    assert len(got[1]) == 2 and {r["run"] for r in read_results(str(split))} == {r["run"] for r in rows}

    # a metric added later: the finished runs are evaluated again, their training fields kept, nothing trained
    from ldm_jax.sweeps.runner import reevaluate

    before = {r["run"]: r for r in read_results(str(tmp_path))}
    again = reevaluate(c, str(tmp_path), eval_fn=lambda *a, **k: {**_fake_eval(*a, **k), "new": 1.0})
    assert len(again) == 2 and len(calls) == 2
    for row in again:
        assert all(e["new"] == 1.0 for e in row["evals"]) and len(row["evals"]) == 5
        assert row["train_minutes"] == before[row["run"]]["train_minutes"]
        assert [e["fd"] for e in row["evals"]] == [e["fd"] for e in before[row["run"]]["evals"]]

    report = render_report(str(tmp_path))
    text = open(report).read()
    assert "| schedule=linear | 0.6667 |" in text and "![loss curves](loss_curves.png)" in text
    for png in ("loss_curves.png", "metric_vs_nfe.png", "metric_per_run.png"):
        assert os.path.getsize(tmp_path / png) > 1000


def _fake_checkpointed_train(calls):
    """A fake trainer that leaves what reuse reads: a checkpoint step with the run's config."""
    def train(config, workdir):
        _fake_train(calls)(config, workdir)
        folder = os.path.join(workdir, "checkpoints", str(config.train.num_steps), "config")
        os.makedirs(folder)
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write(config.to_json_best_effort())
    return train


def test_runner_reuses_identically_trained_runs_of_another_sweep(tmp_path):
    c = _sweep_config()
    c.sweep.product = dict(diffusion=dict(schedule=("linear", "cosine")))
    c.sweep.zip, c.sweep.seeds = {}, ()
    source = str(tmp_path / "source")
    run_sweep(c, source, train_fn=_fake_checkpointed_train([]), eval_fn=_fake_eval)
    with open(os.path.join(source, "results.jsonl")) as f:  # as if that sweep ran from another directory
        rows = [dict(json.loads(line), workdir=f"elsewhere/runs/{json.loads(line)['run']}") for line in f]
    with open(os.path.join(source, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    # the linear run's saved config trained with another learning rate: it must not stand in
    path = os.path.join(source, "runs", "schedule=linear", "checkpoints", str(c.train.num_steps), "config",
                        "config.json")
    saved = json.load(open(path))
    saved["optimizer"]["lr"] *= 2
    json.dump(saved, open(path, "w"))

    # the sampler study: other evaluation points and paths, one run the source never trained
    c.sweep.product = dict(diffusion=dict(schedule=("cosine", "sigmoid", "linear")))
    c.sweep.eval.nfes = (3,)
    c.data.data_dir, c.model.vae.workdir = "/somewhere/else", "/another/autoencoder"
    calls = []
    got = run_sweep(c, str(tmp_path / "study"), train_fn=_fake_checkpointed_train(calls), eval_fn=_fake_eval,
                    reuse_from=source)
    by_run = {r["run"]: r for r in got}
    assert sorted(os.path.basename(d) for d in calls) == ["schedule=linear", "schedule=sigmoid"]
    cosine = by_run["schedule=cosine"]
    assert cosine["reused_from"] == cosine["workdir"] == os.path.join(source, "runs", "schedule=cosine")
    assert cosine["final_loss"] == pytest.approx(1 / 3) and cosine["train_minutes"] == rows[1]["train_minutes"]
    assert {(e["sampler"], e["nfe"]) for e in cosine["evals"]} == {("ddim", 3), ("euler", 3)}
    assert "reused_from" not in by_run["schedule=linear"]
    assert sorted(os.listdir(os.path.join(source, "runs"))) == ["schedule=cosine", "schedule=linear"]  # only read
    with pytest.raises(ValueError, match="has no results"):
        run_sweep(c, str(tmp_path / "x"), train_fn=_fake_train([]), eval_fn=_fake_eval, reuse_from=str(tmp_path))


def test_sweep_cli_end_to_end_with_real_runs(tmp_path):
    """`ldm-jax sweep` on the tiny ablation: shared autoencoder, 2 LDM runs, ddim/heun evals, report. (Skipping
    finished runs on a rerun and reusing another sweep's runs: test_runner_resumes_splits_hosts_and_reports and
    test_runner_reuses_identically_trained_runs_of_another_sweep; a config without a sweep section:
    tests/test_bad_inputs.py.)"""
    import functools
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ldm_jax", "sweep", "--config=configs/ablation_noise_schedules.py:tiny",
           f"--workdir={tmp_path}"]
    run = functools.partial(subprocess.run, capture_output=True, text=True)
    prep = run([*cmd, "--prepare_only"], timeout=900)
    assert prep.returncode == 0 and "ready" in prep.stdout, prep.stderr[-3000:]
    assert os.path.isdir(tmp_path / "autoencoder") and not (tmp_path / "results.jsonl").exists()
    proc = run(cmd, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert [r["run"] for r in rows] == ["schedule=linear", "schedule=cosine"]
    for row in rows:
        assert {(e["sampler"], e["nfe"], e["steps"]) for e in row["evals"]} == {("ddim", 2, 2.0), ("heun", 2, 1.0)}
        for e in row["evals"]:
            assert 0.0 <= e["shape_acc"] <= 1.0 and 0.0 <= e["brightness_gap"] <= 1.0
        assert np.isfinite(row["final_loss"])
    text = (tmp_path / "report.md").read_text()
    assert "| schedule=cosine |" in text and "metric_vs_nfe.png" in text
    for png in ("loss_curves.png", "metric_vs_nfe.png", "metric_per_run.png"):
        assert os.path.getsize(tmp_path / png) > 1000
    assert len(os.listdir(tmp_path / "runs")) == 2 and os.path.isdir(tmp_path / "autoencoder")
    # one latent cache shared by the runs, none of their own
    assert os.path.isdir(tmp_path / "latent_cache")
    assert not any(os.path.exists(tmp_path / "runs" / r / "latent_cache") for r in os.listdir(tmp_path / "runs"))



def test_fashion_mnist_evaluation_scores_real_images_close_and_blank_images_far():
    """The sweep's fashion_mnist metrics on a stand-in generator: real test images give a small FD-FMNIST and
    no brightness gap, black images a large FD and a gap equal to the data's mean pixel."""
    from ldm_jax.eval.fmnist_net import load_fashion_mnist
    from ldm_jax.sweeps.stages import evaluate_run

    real, labels = load_fashion_mnist("test")
    # image i of the class the i-th prompt names (the prompts cycle through the 10 classes)
    picks = np.stack([real[labels == i % 10][i // 10] for i in range(300)])[..., None]
    mean = float(np.mean(real / 255.0))
    config = base_config()
    config.data.name = "fashion_mnist"

    def run(images):
        model = types.SimpleNamespace(generate=lambda prompts, seed=0, **kw: images[seed:seed + len(prompts)])
        return evaluate_run(config, "unused", sampler="ddim", nfe=2, guidance_scale=1.0, num_samples=len(images),
                            model=model, data_mean=mean)

    good, blank = run(picks), run(np.zeros_like(picks))
    assert good["brightness_gap"] < 0.02 and abs(blank["brightness_gap"] - mean) < 1e-6
    assert good["fd_fmnist"] < 0.2 * blank["fd_fmnist"], (good, blank)
    # per class: real images of the prompted classes reproduce each class's brightness, black ones none of it
    assert good["class_brightness_gap"] < 0.02 and abs(good["brightness_slope"] - 1.0) < 0.15, good
    class_means = [np.mean(real[labels == c] / 255.0) for c in range(10)]
    assert blank["class_brightness_gap"] == pytest.approx(np.mean(class_means), abs=1e-6)
    assert abs(blank["brightness_slope"]) < 1e-9
    from ldm_jax.eval.generated import class_brightness
    squeezed = class_brightness(np.tile(np.round(255 * (0.5 * np.array(class_means) + 0.1)), 3).astype(np.uint8)
                                .reshape(30, 1, 1, 1), np.arange(30) % 10, np.array(class_means))
    assert squeezed["brightness_slope"] == pytest.approx(0.5, abs=0.02)  # a range halved towards the middle
