"""Weight files -> parameter trees: safetensors reading, flat <-> nested trees, strict key checks.

What the models need to load their own pretrained weights (`TextEncoder.minilm`, `TextEncoder.from_hf_clip`);
the converters in `ldm_jax.convert` build on it (``ldm_jax.convert.common`` re-exports every name here).
Parameter trees are nested dicts of arrays; "flat" trees map '/'-joined paths to arrays
(``{"down_0/res_0/conv1/kernel": ...}``). PyTorch state dicts map '.'-joined names to NCHW arrays.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np


class ConversionError(ValueError):
    """Weights do not fit the target model; the message lists every offending key."""


# ---------------------------------------------------------------------------- files
def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a .safetensors file into numpy arrays (bf16/fp16 tensors become float32); no torch needed."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at '{path}': pass the path of a .safetensors file")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises several types for a damaged header
        if "bfloat16" in str(e) or "BF16" in str(e):
            return _read_safetensors_bf16(path)
        raise ConversionError(f"'{path}' is not a readable safetensors file ({e})") from None
    return {k: np.asarray(v) for k, v in tensors.items()}


def _read_safetensors_bf16(path: str) -> dict[str, np.ndarray]:
    import ml_dtypes
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="flax") as f:
        for k in f.keys():
            out[k] = np.asarray(f.get_tensor(k)).astype(ml_dtypes.bfloat16).astype(np.float32)
    return out


# ---------------------------------------------------------------------------- trees
def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict -> {'a/b/c': leaf}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """{'a/b/c': leaf} -> nested dict."""
    tree: dict = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


# ---------------------------------------------------------------------------- layouts
def linear_to_flax(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight (out, in) -> Flax Dense kernel (in, out); a 1x1 conv weight is accepted too."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return np.transpose(w)


def linear_to_torch(k: np.ndarray) -> np.ndarray:
    return np.transpose(k)


# ---------------------------------------------------------------------------- checks
def check_tree(expected: Mapping[str, tuple], got: Mapping[str, np.ndarray], what: str) -> None:
    """Raises one ConversionError listing all missing keys, unexpected keys and shape mismatches.

    `expected` maps flat keys to shapes (from ``jax.eval_shape`` of the model's init).
    """
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(
        f"{k}: expected {tuple(expected[k])}, got {tuple(np.shape(got[k]))}"
        for k in set(expected) & set(got)
        if tuple(expected[k]) != tuple(np.shape(got[k]))
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {len(mismatched)}: {'; '.join(mismatched)}")
    if problems:
        raise ConversionError(f"{what} weights do not fit the model config — " + " | ".join(problems))
