"""A sweep run as a job array: which share of the runs this array task takes, read from the scheduler.

Task i of an array of n takes runs i, i+n, ... (`run_sweep`'s ``host_index`` / ``num_hosts``):

* SLURM (``sbatch --array=0-3``): i from SLURM_ARRAY_TASK_ID, counted from SLURM_ARRAY_TASK_MIN in steps of
  SLURM_ARRAY_TASK_STEP; n from SLURM_ARRAY_TASK_COUNT (or MIN..MAX). The ids must form one range
  (``--array=1-8``, ``--array=0-15:5``; a ``%`` limit is fine; a list such as ``--array=1,3,7`` is refused).
* Kubernetes indexed Job: i from JOB_COMPLETION_INDEX, n from ``LDM_JAX_ARRAY_SIZE`` (set it to the Job's
  ``completions``; a pod does not see that number otherwise).

Every task expects the shared autoencoder and latent cache to be there already (``ldm-jax sweep --prepare_only``
run first, as its own job); see README "On a cluster".
"""

from __future__ import annotations

from collections.abc import Mapping

from ldm_jax.types import ConfigError, env_int

ARRAY_SIZE_VAR = "LDM_JAX_ARRAY_SIZE"


def _slurm(environ: Mapping[str, str]) -> tuple[int, int]:
    task = env_int(environ, "SLURM_ARRAY_TASK_ID")
    low = env_int(environ, "SLURM_ARRAY_TASK_MIN") or 0
    high = env_int(environ, "SLURM_ARRAY_TASK_MAX")
    step = env_int(environ, "SLURM_ARRAY_TASK_STEP") or 1
    count = env_int(environ, "SLURM_ARRAY_TASK_COUNT")
    if count is None and high is None:
        raise ConfigError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX "
                          "is: give --host_index and --num_hosts instead")
    span = None if high is None else (high - low) // step + 1
    if count is None:
        count = span
    elif span is not None and span != count:
        raise ConfigError(f"SLURM_ARRAY_TASK_COUNT={count} but the ids run {low}-{high} in steps of {step}: a sweep "
                          f"needs a range of ids such as --array=0-{count - 1}")
    if count < 1 or (task - low) % step or not 0 <= (task - low) // step < count:
        raise ConfigError(f"SLURM_ARRAY_TASK_ID={task} is not one of the {count} ids from {low} in steps of {step}")
    return (task - low) // step, count


def _kubernetes(environ: Mapping[str, str]) -> tuple[int, int]:
    index = env_int(environ, "JOB_COMPLETION_INDEX")
    count = env_int(environ, ARRAY_SIZE_VAR)
    if count is None:
        raise ConfigError(f"JOB_COMPLETION_INDEX is set but {ARRAY_SIZE_VAR} is not: set it to the indexed Job's "
                          "`completions` (or give --host_index and --num_hosts)")
    if not 0 <= index < count:
        raise ConfigError(f"JOB_COMPLETION_INDEX={index} must be in [0, {ARRAY_SIZE_VAR}={count})")
    return index, count


def array_index(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(this task's index, the number of tasks) of a SLURM job array or a Kubernetes indexed Job, or None
    outside one. Pure: reads `environ` only. Missing or inconsistent variables raise a one-line ConfigError
    naming the variable."""
    if environ.get("SLURM_ARRAY_TASK_ID", "").strip():
        return _slurm(environ)
    if environ.get("JOB_COMPLETION_INDEX", "").strip():
        return _kubernetes(environ)
    return None
