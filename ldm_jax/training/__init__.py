"""Training: one generic, sharded, resumable loop; each stage is a ``Task``.

    ldm-jax train --config=configs/X.py[:variant] --workdir=DIR      # == run(config, workdir)

``run(config, workdir)`` initialises multi-host JAX when needed, builds the stage's ``Task`` from
``config.train.stage`` and calls ``train(config, workdir, task, callbacks)``.

The ``Task`` interface (``ldm_jax.training.task``) — what a stage provides:

    Task(name, init, loss_fn, make_iterator, batch_size, frozen=None, init_extra=None, update_extra=None)
      init(rng) -> params                         shape-first: only traced; may carry nn.Partitioned logical names
      loss_fn(params, batch, rng, step, *, frozen, extra) -> (scalar loss, {name: scalar})
      make_iterator(process_index, process_count) -> iterator with get_state() / set_state(state)
      frozen                                      untrained arrays passed to loss_fn (frozen VAE, text encoder)
      init_extra(rng) -> extra;  update_extra(extra, params, batch, rng, step, *, frozen) -> (extra, metrics)

The pieces, each usable on its own:

* ``state.TrainState`` (step, params, opt_state, ema_params, rng, nonfinite_count, extra);
* ``optim``: AdamW + warmup/cosine, clipping, EMA, mixed precision;
* ``sharding``: mesh, logical axis rules, shape-first sharded init, global batches, multi-host init;
* ``steps``: the pure ``train_step`` (gradient accumulation, non-finite guard) and its AOT compilation;
* ``checkpoint.Checkpointer``: Orbax checkpoints with retention, per-process data state, corrupt fallback;
* ``loop.train``: resume, signals, logging, callbacks;  ``toy``: a tiny stage for tests and smoke runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from ldm_jax.training.task import STAGES
from ldm_jax.types import ConfigError, nearest


def make_stage(config, workdir: str):
    """(Task, callbacks) of ``config.train.stage`` (plain if/elif: no registry)."""
    stage = str(config.train.stage)
    if stage == "toy":
        from ldm_jax.training import toy

        return toy.make_task(config), []
    if stage == "autoencoder":
        from ldm_jax.training import autoencoder

        return autoencoder.make_task(config, workdir)
    if stage == "ldm":
        from ldm_jax.training import ldm

        return ldm.make_task(config, workdir)
    raise ConfigError(f"train.stage='{stage}' is unknown{nearest(stage, STAGES)}: use one of {STAGES}")


def run(config, workdir: str, *, coordinator_address: str | None = None, num_processes: int | None = None,
        process_id: int | None = None, local_device_ids: Sequence[int] | None = None):
    """Trains the config's stage in `workdir` (what ``ldm-jax train`` runs). Raises ConfigError on a config error
    and NonFiniteError on a non-finite halt; the commands turn them into one line and exit 2 / 1.

    The keyword arguments (``--coordinator_address``, ``--num_processes``, ``--process_id`` and the optional
    ``--local_device_ids`` on the command line) start a multi-process job explicitly; without them the JAX_*
    environment variables, or the layout of a SLURM job, a TPU slice or a Kubernetes indexed Job, are used
    (`sharding.detect_layout`, `sharding.maybe_initialize_distributed`).
    """
    from ldm_jax.training.loop import train
    from ldm_jax.training.preflight import preflight
    from ldm_jax.training.sharding import maybe_initialize_distributed

    maybe_initialize_distributed(coordinator_address, num_processes, process_id, local_device_ids)
    preflight(config, workdir)  # the whole config, referenced files, the workdir: before any work
    task, callbacks = make_stage(config, workdir)
    return train(config, workdir, task, callbacks=callbacks)


def __getattr__(name):
    # Lazy re-exports keep ``import ldm_jax.training`` (the CLI) free of jax/orbax imports until needed.
    if name in ("train", "every", "NonFiniteError"):
        from ldm_jax.training import loop

        return getattr(loop, name)
    if name in ("Task",):
        from ldm_jax.training.task import Task

        return Task
    if name in ("TrainState",):
        from ldm_jax.training.state import TrainState

        return TrainState
    raise AttributeError(f"module 'ldm_jax.training' has no attribute '{name}'")
