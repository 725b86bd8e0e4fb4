"""Cluster launch: the process layout read from each launcher's variables (faked in dicts, nothing initialised),
Slurm host lists, a sweep's job-array share, and one real 2-process training started by SLURM variables alone."""

import json
import os
import subprocess
import sys

import jax
import pytest

from ldm_jax.sweeps.cluster import array_index
from ldm_jax.training import sharding as shd
from ldm_jax.training.sharding import ProcessLayout, detect_layout, expand_hostlist
from ldm_jax.types import ConfigError
from tests.training import toy_cases

SLURM = dict(SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_PROCID="2", SLURM_LOCALID="0",
             SLURM_JOB_NODELIST="node[001-004,007],gpu-a", LDM_JAX_COORDINATOR_PORT="9999")
K8S = dict(JOB_COMPLETION_INDEX="2", LDM_JAX_NUM_PROCESSES="4", HOSTNAME="train-2", LDM_JAX_SUBDOMAIN="train-svc")
TPU = dict(TPU_WORKER_HOSTNAMES="t0,t1,t2,t3", TPU_WORKER_ID="3")
JAX_VARS = dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="8", JAX_PROCESS_ID="5")


@pytest.mark.parametrize("text, hosts", [
    ("localhost", ["localhost"]),
    ("node[001-004,007],gpu-a", ["node001", "node002", "node003", "node004", "node007", "gpu-a"]),
    ("gpu-a,node[8-11]", ["gpu-a", "node8", "node9", "node10", "node11"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("a[1]b,c", ["a1b", "c"]),
])
def test_hostlist_expands_slurm_forms(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["node[1-", "node1]", "n[[1]]", "n[4-2]", "n[a-b]", "a,,b", "", "n[1-999999]"])
def test_hostlist_refuses_malformed_lists(text):
    with pytest.raises(ValueError):
        expand_hostlist(text)


def test_slurm_layout_from_the_task_variables():
    assert detect_layout(SLURM) == ProcessLayout("slurm", "node001:9999", 4, 2, None)  # 4 tasks on 6 nodes
    step = dict(SLURM, SLURM_STEP_NODELIST="gpu-[2,5]", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1",
                SLURM_LOCALID="1", SLURM_NTASKS="2")
    assert detect_layout(step).coordinator == "gpu-2:9999"  # the step's nodes, not the job's
    shared = dict(SLURM, SLURM_JOB_NODELIST="127.0.0.1", SLURM_LOCALID="2")  # 4 tasks on one node: a device each
    assert detect_layout(shared).local_device_ids == (2,)
    default_port = {k: v for k, v in SLURM.items() if k != "LDM_JAX_COORDINATOR_PORT"}
    assert detect_layout(default_port).coordinator == f"node001:{shd.SLURM_PORT_BASE + 4242 % 12000}"
    assert detect_layout(dict(SLURM, SLURM_NTASKS="1", SLURM_PROCID="0")) is None  # one task: nothing to join
    assert detect_layout({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"}) is None  # an allocation's shell


@pytest.mark.parametrize("change, named", [
    (dict(SLURM_PROCID=None), "SLURM_PROCID is not set"),
    (dict(SLURM_PROCID="4"), "SLURM_PROCID=4 must be in [0, SLURM_NTASKS=4)"),
    (dict(SLURM_LOCALID=None), "SLURM_LOCALID"),
    (dict(SLURM_JOB_NODELIST=None), "SLURM_JOB_NODELIST is not set"),
    (dict(SLURM_JOB_NODELIST="node[1-"), "SLURM_JOB_NODELIST='node[1-'"),
    (dict(SLURM_NTASKS="four"), "SLURM_NTASKS='four' is not an integer"),
    (dict(LDM_JAX_COORDINATOR_PORT="70000"), "LDM_JAX_COORDINATOR_PORT=70000"),
])
def test_partial_or_inconsistent_slurm_variables_fail_in_one_line(change, named):
    env = {k: v for k, v in {**SLURM, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        detect_layout(env)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_kubernetes_indexed_job_layout():
    assert detect_layout(K8S) == ProcessLayout("kubernetes", "train-0.train-svc:8476", 4, 2)
    jobset = dict(K8S, HOSTNAME="run-workers-0-2", LDM_JAX_COORDINATOR_PORT="1234")  # JobSet pod hostnames
    assert detect_layout(jobset).coordinator == "run-workers-0-0.train-svc:1234"
    assert detect_layout(dict(K8S, LDM_JAX_COORDINATOR="head:77")).coordinator == "head:77"
    assert detect_layout(dict(K8S, LDM_JAX_COORDINATOR="head")).coordinator == "head:8476"
    single = {k: v for k, v in K8S.items() if k != "LDM_JAX_NUM_PROCESSES"}
    assert detect_layout(single) is None  # an indexed Job of one-process pods (a sweep array)
    for change, named in ((dict(LDM_JAX_SUBDOMAIN=""), "LDM_JAX_SUBDOMAIN"), (dict(HOSTNAME="other"), "HOSTNAME"),
                          (dict(JOB_COMPLETION_INDEX="4"), "JOB_COMPLETION_INDEX=4"),
                          (dict(LDM_JAX_NUM_PROCESSES="0"), "LDM_JAX_NUM_PROCESSES=0")):
        with pytest.raises(ConfigError, match=named):
            detect_layout(dict(K8S, **change))


def test_tpu_slice_layout_is_left_to_jax():
    assert detect_layout(TPU) == ProcessLayout("tpu", None, 4, 3)
    multislice = dict(TPU, MEGASCALE_COORDINATOR_ADDRESS="t0", MEGASCALE_NUM_SLICES="2", MEGASCALE_SLICE_ID="1")
    assert detect_layout(multislice) == ProcessLayout("tpu", None, 8, 7)
    assert detect_layout({"MEGASCALE_COORDINATOR_ADDRESS": "t0:8080"}) == ProcessLayout("tpu", None, None, None)
    assert detect_layout({"TPU_WORKER_HOSTNAMES": "t0", "TPU_WORKER_ID": "0"}) is None  # a single host
    assert detect_layout(dict(K8S, **TPU)).source == "tpu"  # a GKE TPU pod is in an indexed Job as well
    with pytest.raises(ConfigError, match="TPU_WORKER_ID is not set"):
        detect_layout({"TPU_WORKER_HOSTNAMES": "t0,t1"})
    with pytest.raises(ConfigError, match="TPU_WORKER_ID=4"):
        detect_layout(dict(TPU, TPU_WORKER_ID="4"))
    with pytest.raises(ConfigError, match="MEGASCALE_SLICE_ID=2"):
        detect_layout(dict(TPU, MEGASCALE_NUM_SLICES="2", MEGASCALE_SLICE_ID="2"))


def test_precedence_arguments_then_jax_vars_then_slurm_tpu_kubernetes():
    everything = {**SLURM, **K8S, **TPU, **JAX_VARS}
    assert detect_layout(everything, "h:1", 2, 1) == ProcessLayout("arguments", "h:1", 2, 1)
    assert detect_layout(everything, process_id=7).process_id == 7  # the rest from JAX_*
    assert detect_layout(everything) == ProcessLayout("JAX_*", "10.0.0.1:1234", 8, 5)
    no_jax = {k: v for k, v in everything.items() if not k.startswith("JAX_")}
    assert detect_layout(no_jax).source == "slurm"
    assert detect_layout({k: v for k, v in no_jax.items() if not k.startswith("SLURM_")}).source == "tpu"
    assert detect_layout(dict(no_jax, LDM_JAX_DISTRIBUTED="off")) is None
    assert detect_layout(dict(no_jax, LDM_JAX_DISTRIBUTED="off"), "h:1", 2, 0).source == "arguments"
    assert detect_layout({"LDM_JAX_DISTRIBUTED": "auto"}) == ProcessLayout("auto", None, None, None)
    assert detect_layout({}) is None
    ids = dict(SLURM, JAX_LOCAL_DEVICE_IDS="0,1")
    assert detect_layout(ids).local_device_ids == (0, 1)
    assert detect_layout(ids, local_device_ids=[3]).local_device_ids == (3,)


@pytest.mark.parametrize("env, args, named", [
    (dict(JAX_COORDINATOR_ADDRESS="h:1"), (), "JAX_NUM_PROCESSES is not set"),
    (dict(JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0"), (), "JAX_COORDINATOR_ADDRESS is not set"),
    (dict(JAX_VARS, JAX_PROCESS_ID="8"), (), "JAX_PROCESS_ID=8 must be in [0, JAX_NUM_PROCESSES=8)"),
    (dict(JAX_VARS, JAX_COORDINATOR_ADDRESS="10.0.0.1"), (), "JAX_COORDINATOR_ADDRESS='10.0.0.1' is not HOST:PORT"),
    ({}, (None, 2, 0), "without coordinator_address"),
    ({}, ("h:1", 2, 2), "process_id=2 must be in [0, num_processes=2)"),
    (dict(SLURM, JAX_LOCAL_DEVICE_IDS="0,x"), (), "JAX_LOCAL_DEVICE_IDS"),
    ({"LDM_JAX_DISTRIBUTED": "yes"}, (), "LDM_JAX_DISTRIBUTED='yes'"),
])
def test_partial_jax_variables_and_arguments_fail_in_one_line(env, args, named):
    with pytest.raises(ConfigError) as e:
        detect_layout(env, *args)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_initialize_gets_the_layout_explicitly_or_bare(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # gloo collectives: not in this process
    assert shd.maybe_initialize_distributed(environ=SLURM) is True
    assert shd.maybe_initialize_distributed(environ=TPU) is True
    assert shd.maybe_initialize_distributed(environ=dict(TPU, JAX_LOCAL_DEVICE_IDS="1")) is True
    assert shd.maybe_initialize_distributed(environ={"SLURM_JOB_ID": "1"}) is False
    assert calls == [dict(coordinator_address="node001:9999", num_processes=4, process_id=2, local_device_ids=None,
                          cluster_detection_method="deactivate"),  # JAX's own SLURM detection cannot interfere
                     {}, {"local_device_ids": [1]}]


def test_sweep_array_index_from_slurm_and_kubernetes():
    assert array_index({}) is None
    assert array_index(dict(SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_COUNT="4")) == (3, 4)
    slurm = dict(SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_MAX="8")  # --array=1-8
    assert array_index(slurm) == (2, 8)
    assert array_index(dict(slurm, SLURM_ARRAY_TASK_COUNT="8")) == (2, 8)
    stepped = dict(SLURM_ARRAY_TASK_ID="10", SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX="15",
                   SLURM_ARRAY_TASK_STEP="5", SLURM_ARRAY_TASK_COUNT="4")  # --array=0-15:5
    assert array_index(stepped) == (2, 4)
    assert array_index(dict(JOB_COMPLETION_INDEX="1", LDM_JAX_ARRAY_SIZE="3")) == (1, 3)
    assert array_index(dict(SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="2", JOB_COMPLETION_INDEX="1")) == (0, 2)
    for env, named in (({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT"),
                       (dict(slurm, SLURM_ARRAY_TASK_COUNT="3"), "SLURM_ARRAY_TASK_COUNT=3"),  # --array=1,3,8
                       (dict(SLURM_ARRAY_TASK_ID="4", SLURM_ARRAY_TASK_COUNT="4"), "SLURM_ARRAY_TASK_ID=4"),
                       (dict(stepped, SLURM_ARRAY_TASK_ID="7"), "SLURM_ARRAY_TASK_ID=7"),
                       ({"JOB_COMPLETION_INDEX": "1"}, "LDM_JAX_ARRAY_SIZE"),
                       (dict(JOB_COMPLETION_INDEX="3", LDM_JAX_ARRAY_SIZE="3"), "JOB_COMPLETION_INDEX=3"),
                       (dict(JOB_COMPLETION_INDEX="x", LDM_JAX_ARRAY_SIZE="3"), "JOB_COMPLETION_INDEX='x'")):
        with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
            array_index(env)


def test_array_task_without_a_prepared_autoencoder_stops_in_one_line(tmp_path, monkeypatch):
    from ldm_jax.configlib import load_config
    from ldm_jax.sweeps import runner, stages

    config = load_config("configs/ablation_noise_schedules.py:tiny")
    with pytest.raises(ConfigError) as e:  # nothing there: not trained here
        stages.prepare(config.copy_and_resolve_references(), str(tmp_path), require_prepared=True)
    assert "shared autoencoder is not ready" in str(e.value) and "--prepare_only" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "autoencoder").exists()
    step = tmp_path / "autoencoder" / "checkpoints" / "1" / "config"  # a run stopped (or still going) at step 1
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="stopped at step 1 of"):
        stages.prepare(config.copy_and_resolve_references(), str(tmp_path), require_prepared=True)
    monkeypatch.setattr(runner, "trained_differently", lambda *a: None)  # a finished autoencoder, but no cache
    with pytest.raises(ConfigError, match="shared latent cache .* is not built"):
        stages.prepare(config.copy_and_resolve_references(), str(tmp_path), require_prepared=True)
    assert sorted(os.listdir(tmp_path)) == ["autoencoder"]


def test_sweep_command_in_a_job_array_takes_its_share_and_trains_no_autoencoder(tmp_path, subprocess_env):
    env = dict(subprocess_env, SLURM_JOB_ID="9", SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="2")
    cmd = [sys.executable, "-m", "ldm_jax", "sweep", "--config=configs/ablation_noise_schedules.py:tiny",
           f"--workdir={tmp_path}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "(array task 1 of 2)" in out.stdout, out.stderr[-2000:]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: the shared autoencoder is not ready")
    assert os.listdir(tmp_path) == []


def test_two_processes_started_by_slurm_variables_alone_train_together(tmp_path, subprocess_env, reap, free_port):
    workdir, port = str(tmp_path / "slurm"), free_port()
    launcher = ("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "TPU_",
                "MEGASCALE_", "JOB_COMPLETION_INDEX", "LDM_JAX_")
    base = {k: v for k, v in subprocess_env.items() if not k.startswith(launcher)}
    cmd = [sys.executable, "-m", "ldm_jax", "train", f"--config={toy_cases.__file__}:-1,1", f"--workdir={workdir}"]
    procs = []
    for i in range(2):  # what `srun --ntasks=2` on one node sets (no step variables: JAX alone would not see SLURM)
        env = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=1", SLURM_JOB_ID="77", SLURM_NTASKS="2",
                   SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_JOB_NODELIST="127.0.0.1",
                   LDM_JAX_COORDINATOR_PORT=str(port))
        with open(tmp_path / f"log{i}.txt", "w") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        reap(procs[-1])
    for i, proc in enumerate(procs):
        proc.wait(timeout=300)
        assert proc.returncode == 0, (tmp_path / f"log{i}.txt").read_text()[-3000:]
    folder = os.path.join(workdir, "checkpoints", str(toy_cases.NUM_STEPS), "data")
    assert sorted(f for f in os.listdir(folder) if f.endswith(".json")) == ["process_0-of-2.json",
                                                                           "process_1-of-2.json"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert len([r for r in map(json.loads, f) if "loss" in r]) == toy_cases.NUM_STEPS
