"""Reading trained workdirs (``workdir/checkpoints/<step>/``, see ``ldm_jax.training.checkpoint``) for inference.

The model layer loads a training workdir with these two functions; they read only what inference needs (the
saved config JSON and one parameter subtree as host numpy arrays) and work whatever mesh or number of
processes wrote the checkpoint.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax.types import PyTree


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of `workdir`'s checkpoints, ascending (empty when there are none)."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def read_config(workdir: str, step: int | None = None) -> dict:
    """The config JSON saved with a checkpoint of `workdir` (the newest when `step` is None)."""
    folder = os.path.join(workdir, "checkpoints")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {folder}: train first (ldm-jax train --workdir={workdir})")
    step = steps[-1] if step is None else step
    with open(os.path.join(folder, str(step), "config", "config.json")) as f:
        return json.load(f)


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
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = ckptr.metadata(path).item_metadata
        item = {key: getattr(metadata, "tree", metadata)[key]}
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    return tree[key]
