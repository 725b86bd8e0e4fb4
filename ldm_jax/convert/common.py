"""Shared pieces of every weight converter: safetensors I/O, layout transposes, strict key checks.

Parameter trees are nested dicts of arrays; "flat" trees map '/'-joined paths to arrays
(``{"down_0/res_0/conv1/kernel": ...}``). PyTorch state dicts map '.'-joined names to NCHW arrays.
Reading weights into trees (`read_safetensors`, `flatten`, `check_tree`, `ConversionError`, ...) lives in
`ldm_jax.models.weights`, below this package, because the models load their own pretrained weights; it is
re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ldm_jax.models.weights import (
    ConversionError,
    check_tree,
    flatten,
    linear_to_flax,
    linear_to_torch,
    read_safetensors,
    unflatten,
)

__all__ = [
    "ConversionError",
    "check_tree",
    "conv_to_flax",
    "conv_to_torch",
    "flatten",
    "linear_to_flax",
    "linear_to_torch",
    "model_dir",
    "read_safetensors",
    "unflatten",
    "write_safetensors",
]


# ---------------------------------------------------------------------------- files
def model_dir(path: str | os.PathLike, subfolder: str, what: str = "a diffusers model folder") -> str:
    """The folder holding a model's config.json: `path` itself, else its `subfolder` (a pipeline folder, e.g.
    ``transformer/``). FileNotFoundError otherwise, saying to pass `what`."""
    path = os.fspath(path)
    for d in (path, os.path.join(path, subfolder)):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise FileNotFoundError(f"no config.json in '{path}' or '{os.path.join(path, subfolder)}': pass {what}")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Writes contiguous numpy arrays to `path` atomically (a temp file renamed into place)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- layouts
def conv_to_flax(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight (O, I, kh, kw) -> Flax NHWC kernel (kh, kw, I, O)."""
    return np.transpose(w, (2, 3, 1, 0))


def conv_to_torch(k: np.ndarray) -> np.ndarray:
    return np.transpose(k, (3, 2, 0, 1))
