import os
import subprocess
import sys

import jax
import numpy as np

from ldm_jax.ldm.workdirs import restore_params
from ldm_jax.training import toy, train
from ldm_jax.training.writers import read_metrics
from tests.training import toy_cases

CASES = os.path.abspath(toy_cases.__file__)


def test_two_processes_through_jax_distributed_match_one_process_with_two_devices(tmp_path, subprocess_env, reap,
                                                                                   free_port):
    workdir, port = str(tmp_path / "two_processes"), free_port()
    procs = []
    for i in range(2):  # each process: 1 CPU device, its half of every batch; gloo collectives
        env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        cmd = [sys.executable, "-m", "ldm_jax", "train", f"--config={CASES}:-1,1", f"--workdir={workdir}"]
        if i == 0:  # process 0 joins through the command-line flags, process 1 through JAX_* variables
            cmd += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0",
                    "--local_device_ids=0"]
        else:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
        with open(tmp_path / f"log{i}.txt", "w") as log:  # a pipe could fill up and block the process
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        reap(procs[-1])
    cfg = toy_cases.config(2, 1)  # meanwhile: one process, a 2-device mesh
    state = train(cfg, str(tmp_path / "one_process"), toy.make_task(cfg))
    for i, proc in enumerate(procs):
        proc.wait(timeout=300)
        assert proc.returncode == 0, (tmp_path / f"log{i}.txt").read_text()[-3000:]
    ref = [r["loss"] for r in read_metrics(str(tmp_path / "one_process"))]
    got = [r["loss"] for r in read_metrics(workdir)]  # process 0 logs for both
    assert len(got) == len(ref) == toy_cases.NUM_STEPS
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(restore_params(workdir, ema=False)), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    data_files = sorted(os.listdir(os.path.join(workdir, "checkpoints", str(toy_cases.NUM_STEPS), "data")))
    assert [f for f in data_files if f.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]


def test_incomplete_or_bad_multi_process_flags_fail_in_one_line(tmp_path, subprocess_env):
    base = [sys.executable, "-m", "ldm_jax", "train", f"--config={CASES}:1,1", f"--workdir={tmp_path}"]
    cases = {("--num_processes=2",): "needs all of --coordinator_address",
             ("--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"): "must be in [0,",
             ("--local_device_ids=0,x",): "--local_device_ids=0,x: give non-negative integers"}
    for flags, message in cases.items():
        out = subprocess.run(base + list(flags), env=subprocess_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
