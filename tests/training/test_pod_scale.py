"""The latent-diffusion stage as several processes through jax.distributed (gloo on CPU), with FSDP groups that
span processes, the latent cache built by all of them, sample grids and evaluation callbacks on; and an
elastic resume: saved as 1 process x 8 devices, continued as 4 processes x 2 devices with data=2 x fsdp=4 (each
FSDP group spans two processes) until SIGKILLed, then finished as 1 x 8.

Reference: the same config trained uninterrupted in this process on 8 devices. Steps see the same global
batches in the same row order whatever the process count (ldm_jax.data.pipeline), so the losses agree to
float tolerance (reduction order differs between meshes).
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ldm_jax.configlib import load_config
from ldm_jax.ldm.workdirs import checkpoint_steps, restore_params
from ldm_jax.training import run
from ldm_jax.training.writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LDM_CFG = os.path.join(ROOT, "configs", "shapes_ldm.py")
STEPS = 6


def _overrides(data_dir, ae_dir, data, fsdp, extra=()):
    return {"data.data_dir": str(data_dir), "model.vae.workdir": str(ae_dir), "train.num_steps": STEPS,
            "checkpoint.every_steps": 2, "train.log_every_steps": 1, "data.latent_cache": "auto",
            "sample.every_steps": 0, "mesh.data": data, "mesh.fsdp": fsdp, **dict(extra)}


def _config(data_dir, ae_dir, data, fsdp, extra=()):
    cfg = load_config(f"{LDM_CFG}:tiny")
    for key, value in _overrides(data_dir, ae_dir, data, fsdp, extra).items():
        *sections, field = key.split(".")
        node = cfg
        for name in sections:
            node = node[name]
        node[field] = value
    return cfg


def _launch(workdir, overrides, processes, devices, env, reap, logs, port):
    """`processes` x `devices` CPU processes of one ldm-jax train job; returns their Popen objects."""
    procs = []
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    for i in range(processes):
        cmd = [sys.executable, "-m", "ldm_jax", "train", f"--config={LDM_CFG}:tiny", f"--workdir={workdir}", *flags,
               f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
        log = open(logs / f"{os.path.basename(workdir)}_{processes}x{devices}_{i}.txt", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"),
                                stdout=log, stderr=subprocess.STDOUT)
        reap(proc)
        procs.append(proc)
    return procs


def _tails(logs) -> str:
    """Each process's first Python traceback (its innermost frames and the exception) or fatal check, where a
    failure starts, and its last lines."""
    out = []
    for p in sorted(logs.glob("*.txt")):
        text = p.read_text()
        first = ""
        trace = re.search(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n)*(.*)", text, re.MULTILINE)
        if trace:  # the last frames and the exception line(s) after the indented frames
            first = text[max(trace.start(), trace.start(1) - 1500):trace.end(1) + 1500]
        elif fatal := re.search(r"^F\d{4} |Check fail", text, re.MULTILINE):
            first = text[fatal.start():fatal.start() + 2500]
        out.append(f"== {p.name}\n{first}\n...\n{text[-1500:]}")
    return "\n".join(out)


def _wait(procs, logs, timeout=600):
    for proc in procs:
        proc.wait(timeout=timeout)
    assert all(p.returncode == 0 for p in procs), _tails(logs)


def _wait_for(condition, procs, timeout=600):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if any(p.poll() is not None for p in procs):
            return condition()
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_autoencoder):
    """The tests' tiny autoencoder and the uninterrupted reference: 1 process, 8 devices, data=1 x fsdp=8."""
    root = tmp_path_factory.mktemp("pod")
    ae, data = tiny_autoencoder
    state = run(_config(data, ae, 1, 8), str(root / "reference"))
    losses = [r["loss"] for r in read_metrics(str(root / "reference")) if "loss" in r]
    return root, data, ae, losses, jax.device_get(state.params)


def _losses(workdir):
    return [r["loss"] for r in read_metrics(str(workdir)) if "loss" in r]


def _assert_params_close(workdir, reference, rtol):
    got = restore_params(str(workdir), ema=False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-2)


def test_two_processes_with_fsdp_across_them_grids_and_eval_match_one_process(setup, subprocess_env, reap,
                                                                              tmp_path, free_port):
    root, data, ae, ref_losses, ref_params = setup
    workdir = tmp_path / "two"
    extra = {"sample.every_steps": 2, "eval.every_steps": 3, "eval.metrics": "('adherence',)",
             "eval.num_samples": 4}
    procs = _launch(workdir, _overrides(data, ae, 1, 8, extra), 2, 4, subprocess_env, reap, tmp_path, free_port())
    _wait(procs, tmp_path)
    losses = _losses(workdir)
    assert len(losses) == STEPS
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    _assert_params_close(workdir, ref_params, rtol=1e-4)
    assert sorted(os.listdir(workdir / "samples")) == [f"{s:07d}.png" for s in (2, 4, 6)]
    assert [r["step"] for r in read_metrics(str(workdir)) if "eval/adherence/color_acc" in r] == [3, 6]
    cache = sorted(os.listdir(workdir / "latent_cache"))
    assert "latents-00000-of-00002.array_record" in cache and "latents-00001-of-00002.array_record" in cache


def test_one_process_resumed_on_four_killed_then_resumed_on_one(setup, subprocess_env, reap, tmp_path, free_port):
    root, data, ae, ref_losses, ref_params = setup
    workdir = tmp_path / "elastic"
    # 1. this process, 1 x 8 devices (the reference's program), to step 2: it saves and stops there
    run(_config(data, ae, 1, 8, {"train.stop_at_step": 2}), str(workdir))
    assert checkpoint_steps(str(workdir)) == [2]
    # 2. 4 processes x 2 devices, data=2 x fsdp=4 (each FSDP group spans two processes): they restore step 2's
    #    state sharded their way, and are SIGKILLed once step 4 is saved
    procs = _launch(workdir, _overrides(data, ae, 2, 4), 4, 2, subprocess_env, reap, tmp_path, free_port())
    assert _wait_for(lambda: checkpoint_steps(str(workdir))[-1] > 2, procs), _tails(tmp_path)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    killed = checkpoint_steps(str(workdir))[-1]
    assert killed < STEPS
    # 3. this process again, 1 x 8, to the end
    run(_config(data, ae, 1, 8), str(workdir))
    assert checkpoint_steps(str(workdir))[-1] == STEPS
    rows = [r for r in read_metrics(str(workdir)) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step once: resumed steps not repeated
    np.testing.assert_allclose([r["loss"] for r in rows], ref_losses, rtol=2e-5)  # the same batches each step
    _assert_params_close(workdir, ref_params, rtol=1e-4)
