"""Reading trained workdirs (``workdir/checkpoints/<step>/``, see ``ldm_jax.training.checkpoint``) for inference.

The model layer loads a training workdir with these two functions; they read only what inference needs (the
saved config JSON and one parameter subtree as host numpy arrays) and work whatever mesh or number of
processes wrote the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax.types import ConfigError, PyTree


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of `workdir`'s checkpoints, ascending (empty when there are none)."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


@contextlib.contextmanager
def quiet_orbax():
    """Orbax's notes for its developers ("Metadata file does not exist: ..._CHECKPOINT_METADATA", logged through
    absl for every read of a checkpoint saved by a CheckpointManager) kept out of the output while we read one."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        absl_logger.setLevel(level)


class DamagedCheckpoint(ConfigError):
    """A workdir's checkpoint files cannot be read (truncated, missing or unparsable)."""


# Config keys whose value is a path: saved absolute, with the workdir's own location (``_origin``), so that a
# moved or copied workdir finds them again (`resolve_paths`).
PATH_KEYS = ("data.data_dir", "data.latent_cache", "model.unet.pretrained", "model.dit.pretrained",
             "model.mmdit.pretrained", "model.vae.pretrained",
             "model.vae.workdir", "model.text_encoder.path", "autoencoder.lpips_vgg", "autoencoder.lpips_lin")
_NOT_PATHS = ("", "auto")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for part in head:
        d = d[part]
    d[last] = value


def portable_config(config: dict, workdir: str) -> dict:
    """The config as saved with a checkpoint: path-valued keys made absolute (relative ones are relative to the
    directory training runs in) and ``_origin.workdir`` = where the workdir was."""
    out = json.loads(json.dumps(config))
    for key in PATH_KEYS:
        value = _get(out, key)
        if isinstance(value, str) and value not in _NOT_PATHS:
            _set(out, key, os.path.abspath(os.path.expanduser(value)))
    out["_origin"] = {"workdir": os.path.abspath(workdir)}
    return out


def resolve_paths(config: dict, workdir: str) -> dict:
    """A saved config with its paths found again after the workdir moved: a path that no longer exists is
    looked for at the same place relative to the workdir (so a folder of workdirs moved or copied together, e.g.
    a demo's autoencoder/ and ldm/, keeps working); paths that exist, or are not found either way, stay."""
    origin = (config.get("_origin") or {}).get("workdir")
    here = os.path.abspath(workdir)
    for key in PATH_KEYS:
        value = _get(config, key)
        if not isinstance(value, str) or value in _NOT_PATHS or os.path.exists(value):
            continue
        candidates = []
        if origin and os.path.isabs(value):
            candidates.append(os.path.normpath(os.path.join(here, os.path.relpath(value, origin))))
        if not os.path.isabs(value):  # saved before paths were made absolute: relative to the training directory
            candidates += [os.path.normpath(os.path.join(here, os.pardir, os.pardir, value)),
                           os.path.normpath(os.path.join(here, os.pardir, value))]
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is not None:
            _set(config, key, found)
    return config


def read_config(workdir: str, step: int | None = None) -> dict:
    """The config JSON saved with a checkpoint of `workdir` (the newest when `step` is None), its paths
    resolved for where the workdir is now (`resolve_paths`)."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir '{workdir}' does not exist")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {folder}: train first (ldm-jax train --workdir={workdir})")
    step = steps[-1] if step is None else step
    path = os.path.join(folder, str(step), "config", "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"the run config of {workdir} ({path}) cannot be read ({type(e).__name__}): the "
                                "checkpoint is damaged; restore the file, or rerun training in the workdir (it "
                                "moves damaged checkpoints aside)") from None
    if not isinstance(config, dict):
        raise DamagedCheckpoint(f"the run config of {workdir} ({path}) is not a JSON object: the checkpoint is "
                                "damaged")
    return resolve_paths(config, workdir)


def restore_params(workdir: str, step: int | None = None, *, ema: bool = True) -> PyTree:
    """Parameters (EMA by default) of a workdir's checkpoint as host numpy arrays, for inference.

    Reads only that subtree, and works whatever mesh or number of processes wrote the checkpoint.
    """
    return restore_state_item(workdir, "ema_params" if ema else "params", step)


def restore_state_item(workdir: str, key: str, step: int | None = None) -> PyTree:
    """One field of the checkpointed TrainState (e.g. "ema_params", "extra") as host numpy arrays."""
    folder = os.path.join(workdir, "checkpoints")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {folder}: train first (ldm-jax train --workdir={workdir})")
    step = steps[-1] if step is None else step
    path = os.path.join(os.path.abspath(folder), str(step), "state")
    try:
        with quiet_orbax(), ocp.PyTreeCheckpointer() as ckptr:
            metadata = ckptr.metadata(path).item_metadata
            item = {key: getattr(metadata, "tree", metadata)[key]}
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                   partial_restore=True))
    except Exception as e:  # noqa: BLE001 - missing, truncated or unparsable files
        text = " ".join(str(e).split())[:160]
        raise DamagedCheckpoint(f"checkpoint step {step} of {workdir} cannot be read ({type(e).__name__}: {text}): "
                                "it is damaged; rerun training in the workdir (it moves damaged checkpoints aside "
                                "and resumes from the previous one) or restore the files") from None
    return tree[key]
