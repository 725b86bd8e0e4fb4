"""Checkpoints: Orbax ``CheckpointManager`` under ``workdir/checkpoints/<step>/``.

Each step directory holds three items:

* ``state/``   the whole ``TrainState`` (params, optimizer state, EMA, rng, counters, extra), sharded arrays
               written by every host and restorable onto any mesh (restore takes the target shardings);
* ``data/``    ``process_<i>-of-<n>.json``: each process's data-iterator state (written by that process);
* ``config/``  ``config.json``: the run's config (written by process 0).

Saves are asynchronous (the step loop goes on while arrays are written) and atomic (Orbax writes to a
temporary directory and renames it when complete), so a killed run leaves either a whole checkpoint or
none. Retention: the newest ``keep`` checkpoints, plus every one whose step is a multiple of ``keep_every``
(0: none). A checkpoint whose parameters are not finite is never written.

``restore_latest`` walks from the newest step down and tells two failures apart:

* unreadable as files (metadata missing or unparsable, truncated or missing arrays): the step is moved to
  ``workdir/checkpoints_corrupt/`` with one warning and the previous one is tried;
* readable but of another run (other parameter names, shapes or dtypes than the run's state):
  ``CheckpointMismatch`` (a ``ConfigError``) naming the first difference; nothing is moved or changed.

A restore that runs out of host or device memory says nothing about the files: it raises
``RestoreOutOfMemory`` and leaves the checkpoint where it is.
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

from ldm_jax.ldm.workdirs import quiet_orbax
from ldm_jax.training.optim import tree_all_finite
from ldm_jax.types import ConfigError, PyTree

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


class SaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, folder removed or read-only): the run stops at once."""


class RestoreOutOfMemory(RuntimeError):
    """Restoring a readable checkpoint ran out of host or device memory: nothing is wrong with its files."""


def _out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


class CheckpointMismatch(ConfigError):
    """A readable checkpoint that belongs to another run (other model or state layout)."""


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))))
    return "/".join(parts)


def _leaf_specs(tree) -> dict[str, tuple]:
    """{"params/conv_in/kernel": (shape, dtype name)} of a state tree or of Orbax's metadata tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            continue
        out[_path_str(path)] = (tuple(shape), np.dtype(leaf.dtype).name if getattr(leaf, "dtype", None) else "")
    return out


def state_difference(saved_metadata, abstract_state) -> str | None:
    """The first difference between a checkpoint's state metadata and the run's abstract state, or None.

    Parameters (and EMA parameters) are compared by name, shape and dtype; the rest of the state (optimizer
    moments, the stage's extra state) by the sorted list of shapes, which does not depend on how containers are
    named in the file."""
    saved = _leaf_specs(saved_metadata)
    want = _leaf_specs(abstract_state)
    for top in ("params", "ema_params"):
        a = {k: v for k, v in saved.items() if k.split("/", 1)[0] == top}
        b = {k: v for k, v in want.items() if k.split("/", 1)[0] == top}
        for key in sorted(set(a) | set(b)):
            if key not in a:
                return f"{key} {b[key][0]} is not in the checkpoint ({len(a)} arrays there, {len(b)} here)"
            if key not in b:
                return f"the checkpoint has {key} {a[key][0]}, which this run's model lacks"
            if a[key] != b[key]:
                return f"{key} is {a[key][0]} {a[key][1]} in the checkpoint and {b[key][0]} {b[key][1]} here"
    rest_a = sorted(v for k, v in saved.items() if k.split("/", 1)[0] not in ("params", "ema_params"))
    rest_b = sorted(v for k, v in want.items() if k.split("/", 1)[0] not in ("params", "ema_params"))
    if rest_a != rest_b:
        return (f"the optimizer/extra state differs ({len(rest_a)} arrays in the checkpoint, {len(rest_b)} here; "
                f"first other shape: {next((x for x, y in zip(rest_a, rest_b) if x != y), None)})")
    return None


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
        self.check_for_errors()  # an earlier asynchronous save that failed is reported as itself
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(encode_data_state(data_state)),
                                  config=ocp.args.JsonSave(config or {}))
        try:
            return bool(self.manager.save(step, args=args, force=True))
        except Exception as e:  # noqa: BLE001 - a full disk, a removed or read-only folder
            raise SaveError(self._save_failed(step, e)) from None

    def _save_failed(self, step: int | None, e: BaseException) -> str:
        done = [s for s in self.all_steps() if s != step]
        which = f"checkpoint step {step}" if step is not None else "a checkpoint"
        return (f"saving {which} under {self.directory} failed ({_short(e, 120)}): training stopped; the newest "
                f"complete checkpoint is step {done[-1] if done else 'none'}; fix the cause (e.g. free disk space) "
                "and rerun the same command to resume")

    def check_for_errors(self) -> None:
        """Raises SaveError when an asynchronous save has failed (checked after every step)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise SaveError(self._save_failed(None, e)) from None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise SaveError(self._save_failed(None, e)) from None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the save error (if any) was raised by wait()
                pass

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
        # elastic resume: the pipelines' positions count global batches and are the same on every process
        # (ldm_jax.data.pipeline), so process 0's file is every process's position on the new process count
        logger.info("checkpoint %d was written by another number of processes; resuming the data position of %s",
                    step, others[0])
        with open(os.path.join(folder, others[0])) as f:
            return decode_data_state(json.load(f))

    def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, Any]:
        """(state, data-iterator state) of `step`; `abstract_state` carries the target shardings."""
        data_state = self._read_data_state(step)
        with quiet_orbax():
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        return restored.state, data_state

    def state_metadata(self, step: int):
        """Orbax's metadata tree of a step's state (raises when it cannot be read)."""
        with quiet_orbax(), ocp.StandardCheckpointer() as reader:
            metadata = reader.metadata(os.path.join(self.directory, str(step), "state"))
        tree = getattr(metadata, "item_metadata", metadata)
        return getattr(tree, "tree", tree)

    def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree, Any] | None:
        """Newest restorable (step, state, data state), falling back past unreadable steps; None if none.

        Raises CheckpointMismatch (touching nothing) when a readable step does not match `abstract_state`."""
        for step in reversed(self.all_steps()):
            where = os.path.join(self.directory, str(step))
            try:
                metadata = self.state_metadata(step)
                if not isinstance(metadata, dict) or not _leaf_specs(metadata.get("params")):
                    raise ValueError("its metadata lists no parameters")
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a damaged checkpoint
                self._set_aside(step, where, e)
                continue
            difference = state_difference(metadata, abstract_state)
            if difference is not None:
                raise CheckpointMismatch(f"checkpoint {where} belongs to another run: {difference}. Nothing was "
                                         "changed: resume with the config it was trained with, or pass another "
                                         "--workdir")
            try:
                state, data_state = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - matching layout but unreadable arrays: damaged files
                if _out_of_memory(e):  # says nothing about the files: stop, touch nothing
                    raise RestoreOutOfMemory(f"restoring checkpoint {where} ran out of memory ({_short(e, 160)}); "
                                             "the checkpoint was left as it is: restore with more memory per "
                                             "device (more devices or FSDP: mesh.fsdp)") from e
                self._set_aside(step, where, e)
                continue
            return step, state, data_state
        return None

    def _set_aside(self, step: int, where: str, error: BaseException) -> None:
        """A damaged step: one warning, and the step directory moves to ``<directory>_corrupt/``."""
        logger.warning("checkpoint %s is damaged (%s); moved to %s_corrupt/ and falling back to the previous "
                       "checkpoint", where, _short(error, 120), self.directory)
        self._quarantine(step)

    def _quarantine(self, step: int) -> None:
        """Moves a bad step directory to ``<directory>_corrupt/`` (so a later save of that step can succeed)."""
        if jax.process_index() == 0:
            target = os.path.join(self.directory + "_corrupt", f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ldm_jax_quarantine_{step}")
        self.manager.reload()
