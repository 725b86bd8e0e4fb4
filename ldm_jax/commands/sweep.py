"""ldm-jax sweep --config=configs/ablation_noise_schedules.py[:variant] --workdir=DIR

Trains and evaluates every run of the config's ``sweep`` spec (product / zip / seeds over any config
fields, see ldm_jax/sweeps/spec.py): one shared autoencoder, then each latent-diffusion run (resumable;
rerunning skips finished runs), each evaluated with every sampler x NFE of ``sweep.eval``; appends to
DIR/results.jsonl and writes DIR/report.md with plots. ``--num_hosts=N --host_index=I`` splits the runs
over hosts (host I takes runs I, I+N, ...); without them, a task of a job array takes its share from the
scheduler (SLURM_ARRAY_TASK_ID, a Kubernetes indexed Job's JOB_COMPLETION_INDEX + LDM_JAX_ARRAY_SIZE; see
ldm_jax/sweeps/cluster.py) and requires the shared autoencoder and latent cache to be ready (it stops with one
line instead of training them). ``--prepare_only`` trains the shared autoencoder and builds the
shared latent cache, then stops (run it once before starting several hosts on one machine or file system);
``--report_only`` re-renders the report. ``--reuse_from=OTHER_SWEEP_DIR`` evaluates the runs that another
sweep already trained with the same training config from there (and uses its data and autoencoder), e.g.
the sampler study on the schedule study's checkpoints. ``--reevaluate`` evaluates the finished runs again at
every point and rewrites their rows (after a metric was added), training nothing.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from ldm_jax.commands._app import fail, start

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config, e.g. configs/ablation_noise_schedules.py:tiny",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep (runs, results.jsonl, report.md).")
_HOST = flags.DEFINE_integer("host_index", 0, "This host's index when the runs are split over hosts (default: "
                             "the job array's task index, else 0).")
_HOSTS = flags.DEFINE_integer("num_hosts", 1, "Number of hosts the runs are split over (default: the job array's "
                              "task count, else 1).")
_PREPARE_ONLY = flags.DEFINE_bool("prepare_only", False, "Only train the shared autoencoder and build the shared "
                                   "latent cache (once, before several hosts start).")
_REUSE = flags.DEFINE_string("reuse_from", None, "Another sweep's directory: its finished runs with the same "
                             "training config are evaluated from there instead of trained again.")
_REEVALUATE = flags.DEFINE_bool("reevaluate", False, "Evaluate the finished runs again (e.g. after a metric was "
                                 "added) and rewrite their rows; trains nothing.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only re-render report.md from results.jsonl.")


def _hosts() -> tuple[int, int, bool]:
    """(host index, host count, whether a job array gave them): the flags when either is given, else the job
    array's task (`cluster.array_index`), else one host."""
    if flags.FLAGS[_HOST.name].present or flags.FLAGS[_HOSTS.name].present:
        return _HOST.value, _HOSTS.value, False
    from ldm_jax.sweeps.cluster import array_index

    found = array_index(os.environ)
    return (0, 1, False) if found is None else (*found, True)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags look like --workdir=DIR")
    if _CONFIG.value is None or not _WORKDIR.value:
        fail("sweep needs --config=configs/<ablation>.py[:variant] and --workdir=DIR")
    if not 0 <= _HOST.value < _HOSTS.value:
        fail(f"--host_index={_HOST.value} must be in [0, --num_hosts={_HOSTS.value})")
    config, workdir = _CONFIG.value, _WORKDIR.value
    if "sweep" not in config:
        fail("the config has no `sweep` section: use an ablation config (configs/ablation_*.py)")
    from ldm_jax.sweeps import expand, render_report, run_sweep, stages
    from ldm_jax.sweeps.runner import reevaluate
    from ldm_jax.types import ConfigError

    try:
        if not _REPORT_ONLY.value:
            runs = expand(config)  # a bad spec fails here, before any training
            stages.validate(config, runs)  # and so does a bad value in any run
            host, hosts, in_array = (0, 1, False) if _PREPARE_ONLY.value else _hosts()
            print(f"sweep: {len(runs)} runs -> {workdir}" + (f" (array task {host} of {hosts})" if in_array else ""),
                  flush=True)
            if _REUSE.value and not os.path.isdir(_REUSE.value):
                fail(f"--reuse_from={_REUSE.value} is not a directory: give the workdir of a finished sweep")
            stages.prepare(config, workdir, reuse_from=_REUSE.value, require_prepared=in_array)
            if _PREPARE_ONLY.value:
                print(f"sweep: autoencoder and shared data ready in {workdir}", flush=True)
                return
            eval_fn = stages.make_eval_fn(config.sweep.get("eval"))
            if _REEVALUATE.value:
                reevaluate(config, workdir, eval_fn=eval_fn)
            else:
                run_sweep(config, workdir, train_fn=stages.train_fn, eval_fn=eval_fn, host_index=host,
                          num_hosts=hosts, reuse_from=_REUSE.value)
        path = render_report(workdir, title=str(config.sweep.get("title", "Sweep report")),
                             primary=config.sweep.get("eval", {}).get("primary") or None)
    except stages.Interrupted as e:
        print(f"sweep: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (ConfigError, ValueError) as e:
        fail(str(e))
    print(f"sweep: report -> {path}", flush=True)


def run_cli(argv):
    start(main, argv, uses_config=True)
