import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ldm_jax.ldm.workdirs import restore_params
from ldm_jax.training import run, toy, train
from ldm_jax.training.writers import read_metrics
from tests.training import toy_cases

CASES = os.path.abspath(toy_cases.__file__)


def _steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _logged_step(workdir):
    try:
        return max(_losses(workdir), default=0)
    except ValueError:  # a line being written right now
        return 0


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 16-step toy run on a 1-device mesh."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    cfg = toy_cases.config()
    state = train(cfg, workdir, toy.make_task(cfg))
    return workdir, jax.device_get(state.params), jax.device_get(state.ema_params)


def test_tiny_overfit_run_loss_falls_and_everything_is_logged(reference):
    workdir, params, ema = reference
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, toy_cases.NUM_STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "images_per_s", "step_time_s", "target_mean_0"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert _steps(workdir) == [8, 12, 16]  # every 4 steps, newest 3 kept
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    _assert_trees_equal(restore_params(workdir, ema=False), params)
    _assert_trees_equal(restore_params(workdir), ema)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ema)))


@pytest.mark.parametrize("data, fsdp", [(8, 1), (4, 2)])
def test_same_loss_trajectory_on_8_devices(reference, tmp_path, data, fsdp):
    cfg = toy_cases.config(data, fsdp)
    cfg.checkpoint.every_steps = 0  # only the final save
    state = train(cfg, str(tmp_path), toy.make_task(cfg))
    ref = _losses(reference[0])
    got = _losses(str(tmp_path))
    np.testing.assert_allclose([got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(reference[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_corrupt_newest_checkpoint_resumes_from_previous_and_matches(reference, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference[0], workdir)
    state_dir = os.path.join(workdir, "checkpoints", "16", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            os.truncate(os.path.join(root, name), 0)
    cfg = toy_cases.config()
    with caplog.at_level(logging.WARNING, logger="ldm_jax.training"):
        state = train(cfg, workdir, toy.make_task(cfg))
    assert "is damaged" in caplog.text and "resumed from checkpoint step 12" in caplog.text
    _assert_trees_equal(jax.device_get(state.params), reference[1])
    assert _steps(workdir) == [8, 12, 16]


def test_injected_nan_halts_with_one_line_and_keeps_last_good_checkpoint(tmp_path, capsys):
    from ldm_jax.commands._app import run_or_fail

    cfg = toy_cases.config(nan_step=6)
    with pytest.raises(SystemExit) as exit_info:
        run_or_fail(run, cfg, str(tmp_path))  # what `ldm-jax train` does with the library's NonFiniteError
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: non-finite loss or gradients at step 6") and "newest checkpoint is step 4" in err
    assert _steps(str(tmp_path)) == [4]
    params = restore_params(str(tmp_path), ema=False)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_skip_mode_goes_on_past_a_nan_step(tmp_path, caplog):
    cfg = toy_cases.config(nan_step=3)
    cfg.train.on_nonfinite = "skip"
    cfg.checkpoint.every_steps = 0
    with caplog.at_level(logging.WARNING, logger="ldm_jax.training"):
        state = train(cfg, str(tmp_path), toy.make_task(cfg))
    assert "at step 3" in caplog.text and "skipped" in caplog.text
    assert int(state.step) == toy_cases.NUM_STEPS and int(state.nonfinite_count) == 1
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))


def test_unknown_stage_is_a_one_line_error(tmp_path, capsys):
    cfg = toy_cases.config()
    cfg.train.stage = "toyy"
    from ldm_jax.types import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'toy'"):
        run(cfg, str(tmp_path))


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the training subprocess")


def _cli(workdir, env, reap, log):
    """Starts ``ldm-jax train`` on the toy config; its output goes to `log` (a pipe could fill up and block)."""
    cmd = [sys.executable, "-m", "ldm_jax", "train", f"--config={CASES}", f"--workdir={workdir}",
           "--config.toy.delay_s=0.25"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    reap(proc)
    return proc


def _tail(path, n=3000):
    with open(path) as f:
        return f.read()[-n:]


def test_sigterm_saves_and_exits_0_then_sigkill_then_rerun_matches_uninterrupted(reference, tmp_path,
                                                                                 subprocess_env, caplog, reap):
    workdir, log = str(tmp_path / "run"), str(tmp_path / "log.txt")
    # 1. SIGTERM mid-run: finishes the step, saves it, exits 0.
    proc = _cli(workdir, subprocess_env, reap, log)
    assert _wait_for(lambda: _logged_step(workdir) >= 5, proc), _tail(log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 0, _tail(log)
    stopped = max(_losses(workdir))
    assert 5 <= stopped < toy_cases.NUM_STEPS and _steps(workdir)[-1] == stopped
    # 2. Same command, SIGKILL once it has saved a newer checkpoint.
    proc = _cli(workdir, subprocess_env, reap, log)
    assert _wait_for(lambda: _steps(workdir)[-1] > stopped, proc), _tail(log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # 3. Run it again (in process this time): resumes from the newest checkpoint and ends exactly where the
    #    uninterrupted reference ends (parameters, EMA, and the losses of every step after the resume).
    cfg = toy_cases.config(delay_s=0.0)
    with caplog.at_level(logging.WARNING, logger="ldm_jax.training"):
        state = train(cfg, workdir, toy.make_task(cfg))
    resumed = int(caplog.text.split("resumed from checkpoint step ")[-1].split()[0])
    assert resumed > stopped
    _assert_trees_equal(jax.device_get(state.params), reference[1])
    _assert_trees_equal(jax.device_get(state.ema_params), reference[2])
    rows = read_metrics(workdir)  # rows of steps redone after the resume were dropped, not duplicated
    assert [r["step"] for r in rows] == list(range(1, toy_cases.NUM_STEPS + 1))
    ref_losses = _losses(reference[0])
    assert [r["loss"] for r in rows[resumed:]] == [ref_losses[s] for s in range(resumed + 1, toy_cases.NUM_STEPS + 1)]


class _TwoShapes:
    """The toy iterator's batches, every other one cropped to 8 x 6 (aspect-ratio buckets: one shape per batch)."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.count += 1
        return {k: v[:, :, :6] for k, v in batch.items()} if self.count % 2 == 0 else batch

    def get_state(self):
        return {"inner": self.inner.get_state(), "count": self.count}

    def set_state(self, state):
        self.inner.set_state(state["inner"])
        self.count = state["count"]


def test_batches_of_several_shapes_compile_one_step_each(tmp_path, caplog):
    import dataclasses

    cfg = toy_cases.config()
    cfg.train.num_steps, cfg.checkpoint.every_steps = 6, 3
    task = toy.make_task(cfg)
    task = dataclasses.replace(task, make_iterator=lambda i, n: _TwoShapes(toy.make_iterator(cfg, i, n)))
    with caplog.at_level(logging.INFO, logger="ldm_jax.training"):
        state = train(cfg, str(tmp_path), task)
    assert int(state.step) == 6 and all(np.isfinite(v) for v in _losses(str(tmp_path)).values())
    assert caplog.text.count("compiling the train step for them") == 1  # 8 x 8 first, then 8 x 6 once
    assert _steps(str(tmp_path)) == [3, 6]
