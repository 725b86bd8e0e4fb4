"""ldm-jax train --config=configs/X.py[:variant] --workdir=DIR [--config.a.b=value ...]

Trains the stage the config names (autoencoder or latent diffusion). Rerunning the same command resumes
from the newest checkpoint in the workdir. Multi-host: run the same command on every host with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I [--local_device_ids=0,1], or start it as
the tasks of a SLURM job, on every worker of a TPU slice or as a Kubernetes indexed Job (README: "On a cluster").
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from ldm_jax.commands._app import fail, run_or_fail, start

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/shapes_ldm.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process: HOST:PORT of process 0's coordinator (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index in [0, num_processes).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None,
                                      "Multi-process, optional: this process's accelerator ids on its host, e.g. "
                                      "0,1 (several processes per host).")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags look like --workdir=DIR")
    if _CONFIG.value is None or not _WORKDIR.value:
        fail("train needs --config=configs/<name>.py[:variant] and --workdir=DIR")
    multi = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in multi) and not all(v is not None for v in multi):
        fail("multi-process training needs all of --coordinator_address=HOST:PORT, --num_processes=N and "
             "--process_id=I (or none of them: JAX_* variables, or a SLURM / TPU / Kubernetes job's layout)")
    if _NUM_PROCESSES.value is not None and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
        fail(f"--process_id={_PROCESS_ID.value} must be in [0, --num_processes={_NUM_PROCESSES.value})")
    local_ids = _LOCAL_DEVICE_IDS.value
    if local_ids is not None and not all(i.strip().isdigit() for i in local_ids):
        fail(f"--local_device_ids={','.join(local_ids)}: give non-negative integers separated by commas, e.g. 0,1")
    from ldm_jax.training import run

    device_ids = None if local_ids is None else [int(i) for i in local_ids]
    run_or_fail(run, _CONFIG.value, _WORKDIR.value, coordinator_address=_COORDINATOR.value,
                num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value, local_device_ids=device_ids)


def run_cli(argv):
    start(main, argv, uses_config=True)
