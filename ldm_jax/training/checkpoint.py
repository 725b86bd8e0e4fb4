"""Checkpoints: Orbax ``CheckpointManager`` under ``workdir/checkpoints/<step>/``.

Each step directory holds three items:

* ``state/``   the whole ``TrainState`` (params, optimizer state, EMA, rng, counters, extra), sharded arrays
               written by every host and restorable onto any mesh (restore takes the target shardings);
* ``data/``    ``process_<i>-of-<n>.json``: each process's data-iterator state (written by that process);
* ``config/``  ``config.json``: the run's config (written by process 0).

Saves are asynchronous (the step loop goes on while arrays are written) and atomic (Orbax writes to a
temporary directory and renames it when complete), so a killed run leaves either a whole checkpoint or
none. Retention: the newest ``keep`` checkpoints, plus every one whose step is a multiple of ``keep_every``
(0: none). A checkpoint whose parameters are not finite is never written. ``restore_latest`` walks from the
newest step down: a step that fails to restore (truncated or missing files) is moved to
``workdir/checkpoints_corrupt/`` with a warning and the previous one is tried.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies
from orbax.checkpoint.handlers import DefaultCheckpointHandlerRegistry, JsonCheckpointHandler

from ldm_jax.training.optim import tree_all_finite
from ldm_jax.types import PyTree

logger = logging.getLogger("ldm_jax.training")

_BYTES_KEY = "__bytes_base64__"


def _data_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"


def encode_data_state(state: Any) -> Any:
    """Iterator state -> JSON value (bytes states, e.g. grain DataLoader's, are base64-wrapped)."""
    if isinstance(state, (bytes, bytearray)):
        return {_BYTES_KEY: base64.b64encode(bytes(state)).decode("ascii")}
    return state


def decode_data_state(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {_BYTES_KEY}:
        return base64.b64decode(value[_BYTES_KEY])
    return value


def _short(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _is_finite(tree: PyTree) -> bool:
    """Every floating leaf of `tree` is finite. One process on the CPU backend checks in NumPy (no copy; a jitted
    check is one kernel per leaf, seconds of XLA:CPU compile time for a U-Net); otherwise one jitted reduction,
    so that every process of a multi-host run gets the same answer."""
    if jax.process_count() == 1 and jax.default_backend() == "cpu":
        return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree)
                   if jnp.issubdtype(x.dtype, jnp.floating))
    flag = jax.jit(tree_all_finite)(tree)
    return bool(flag.addressable_data(0))


class Checkpointer:
    """Saves and restores (TrainState, data-iterator state, config) under `directory` (one per workdir)."""

    def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._data_name = _data_file(jax.process_index(), jax.process_count())
        registry = DefaultCheckpointHandlerRegistry()
        registry.add("state", ocp.args.StandardSave)
        registry.add("state", ocp.args.StandardRestore)
        # Every process writes its own iterator state (primary_host=None: no single writer).
        data = JsonCheckpointHandler(self._data_name,
                                     multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))
        registry.add("data", ocp.args.JsonSave, data)
        registry.add("data", ocp.args.JsonRestore, data)
        config = JsonCheckpointHandler("config.json")
        registry.add("config", ocp.args.JsonSave, config)
        registry.add("config", ocp.args.JsonRestore, config)
        keep_policies = [policies.LatestN(n=max(int(keep), 1))]
        if keep_every > 0:
            keep_policies.append(policies.EveryNSteps(interval_steps=int(keep_every)))
        options = ocp.CheckpointManagerOptions(
            create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
            preservation_policy=policies.AnyPreservationPolicy(keep_policies))
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    # ------------------------------------------------------------------------------------------ saving
    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, data_state: Any, config: dict | None = None) -> bool:
        """Starts an async save of `state` at `step`; returns False (and warns) when it is refused.

        Refused: parameters or EMA parameters that are not all finite (the last good checkpoint stays the
        newest), or a step that is already saved.
        """
        step = int(step)
        if step in self.manager.all_steps():
            return False
        if not _is_finite((state.params, state.ema_params)):
            logger.warning("step %d: parameters are not finite; NOT checkpointing (newest good checkpoint: %s)",
                           step, self.latest_step())
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(encode_data_state(data_state)),
                                  config=ocp.args.JsonSave(config or {}))
        return bool(self.manager.save(step, args=args, force=True))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ----------------------------------------------------------------------------------------- restoring
    def _read_data_state(self, step: int) -> Any:
        folder = os.path.join(self.directory, str(step), "data")
        own = os.path.join(folder, self._data_name)
        if os.path.exists(own):
            with open(own) as f:
                return decode_data_state(json.load(f))
        others = sorted(n for n in os.listdir(folder) if n.startswith("process_0-of-")) if os.path.isdir(
            folder) else []
        if not others:
            raise FileNotFoundError(f"no data-iterator state in {folder}")
        logger.warning("checkpoint %d was written by a different number of processes; every process resumes "
                       "the data iterator from %s (exact only for pipelines whose state is the same on all "
                       "processes)", step, others[0])
        with open(os.path.join(folder, others[0])) as f:
            return decode_data_state(json.load(f))

    def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, Any]:
        """(state, data-iterator state) of `step`; `abstract_state` carries the target shardings."""
        data_state = self._read_data_state(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored.state, data_state

    def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree, Any] | None:
        """Newest restorable (step, state, data state), falling back past unreadable steps; None if none."""
        for step in reversed(self.all_steps()):
            try:
                state, data_state = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous checkpoint
                logger.warning("checkpoint %s is unreadable (%s); moving it aside and falling back to the "
                               "previous checkpoint", os.path.join(self.directory, str(step)), _short(e))
                self._quarantine(step)
                continue
            return step, state, data_state
        return None

    def _quarantine(self, step: int) -> None:
        """Moves a bad step directory to ``<directory>_corrupt/`` (so a later save of that step can succeed)."""
        if jax.process_index() == 0:
            target = os.path.join(self.directory + "_corrupt", f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ldm_jax_quarantine_{step}")
        self.manager.reload()
