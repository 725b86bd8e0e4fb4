"""Inception-v3 as used for FID and IS: a Flax port of pytorch-fid's ``FIDInceptionV3`` (2048-d pool features)
and of the network's 1008-way classifier ``fc`` (logits for the Inception Score).

FID (Heusel et al. 2017) is defined by the TensorFlow Inception graph of 2015-12-05; pytorch-fid re-creates
it in PyTorch (torchvision's Inception-v3 with patched blocks) and ships its weights as
``pt_inception-2015-12-05-6726825d.pth``. This port follows that network exactly:

- input: images resized to 299x299 by bilinear interpolation with half-pixel centres and no antialiasing
  (``F.interpolate(..., mode="bilinear", align_corners=False)``), from [0, 1] to [-1, 1];
- BasicConv = conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU;
- FID-specific blocks: the average pools of Mixed_5b-d, 6b-e and 7b exclude the zero padding from the
  mean (TensorFlow's behaviour); Mixed_7c pools with a 3x3 *max* pool;
- output: the global average of Mixed_7c, (B, 2048); optionally the classifier on top of it,
  logits = pool @ W^T + b with pytorch-fid's ``fc.weight`` W (1008, 2048) and ``fc.bias`` b (1008,), or
  torch-fidelity's "unbiased" logits pool @ W^T (what its Inception Score uses; see `inception_score`).

The classifier is optional in a weights file: FID features need only the convolutional trunk, and only a
request for logits fails (with a one-line `ConversionError`) when ``fc.weight`` / ``fc.bias`` are absent.

No weights ship with the framework (no registry has them): pass the local path of pytorch-fid's file
(read with torch, if installed) or of a safetensors copy written by `convert_weights`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.common import (
    ConversionError,
    check_tree,
    conv_to_flax,
    flatten,
    linear_to_flax,
    read_safetensors,
    unflatten,
    write_safetensors,
)
from ldm_jax.eval.frechet import ShardedFeatureFn, to_unit_range
from ldm_jax.types import Array, PyTree

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
RESOLUTION = 299
BN_EPS = 1e-3
NUM_CLASSES = 1008  # the 2015-12-05 graph's 1000 ImageNet classes + 8 unused outputs
OUTPUTS = ("pool", "logits", "logits_unbiased")

# A branch is a list of convs (name, features, kernel, stride, padding); "pool" entries pool first.
_A = lambda pool: [  # noqa: E731  (InceptionA; `pool` = branch_pool features)
    [("branch1x1", 64, (1, 1), 1, "SAME")],
    [("branch5x5_1", 48, (1, 1), 1, "SAME"), ("branch5x5_2", 64, (5, 5), 1, "SAME")],
    [("branch3x3dbl_1", 64, (1, 1), 1, "SAME"), ("branch3x3dbl_2", 96, (3, 3), 1, "SAME"),
     ("branch3x3dbl_3", 96, (3, 3), 1, "SAME")],
    ["avg", ("branch_pool", pool, (1, 1), 1, "SAME")],
]
_B = [
    [("branch3x3", 384, (3, 3), 2, "VALID")],
    [("branch3x3dbl_1", 64, (1, 1), 1, "SAME"), ("branch3x3dbl_2", 96, (3, 3), 1, "SAME"),
     ("branch3x3dbl_3", 96, (3, 3), 2, "VALID")],
    ["max_s2"],
]
_C = lambda c7: [  # noqa: E731  (InceptionC; `c7` = channels_7x7)
    [("branch1x1", 192, (1, 1), 1, "SAME")],
    [("branch7x7_1", c7, (1, 1), 1, "SAME"), ("branch7x7_2", c7, (1, 7), 1, "SAME"),
     ("branch7x7_3", 192, (7, 1), 1, "SAME")],
    [("branch7x7dbl_1", c7, (1, 1), 1, "SAME"), ("branch7x7dbl_2", c7, (7, 1), 1, "SAME"),
     ("branch7x7dbl_3", c7, (1, 7), 1, "SAME"), ("branch7x7dbl_4", c7, (7, 1), 1, "SAME"),
     ("branch7x7dbl_5", 192, (1, 7), 1, "SAME")],
    ["avg", ("branch_pool", 192, (1, 1), 1, "SAME")],
]
_D = [
    [("branch3x3_1", 192, (1, 1), 1, "SAME"), ("branch3x3_2", 320, (3, 3), 2, "VALID")],
    [("branch7x7x3_1", 192, (1, 1), 1, "SAME"), ("branch7x7x3_2", 192, (1, 7), 1, "SAME"),
     ("branch7x7x3_3", 192, (7, 1), 1, "SAME"), ("branch7x7x3_4", 192, (3, 3), 2, "VALID")],
    ["max_s2"],
]
_STEM = [
    ("Conv2d_1a_3x3", 32, (3, 3), 2, "VALID"), ("Conv2d_2a_3x3", 32, (3, 3), 1, "VALID"),
    ("Conv2d_2b_3x3", 64, (3, 3), 1, "SAME"), "max_s2",
    ("Conv2d_3b_1x1", 80, (1, 1), 1, "VALID"), ("Conv2d_4a_3x3", 192, (3, 3), 1, "VALID"), "max_s2",
]
_MIXED = [
    ("Mixed_5b", _A(32)), ("Mixed_5c", _A(64)), ("Mixed_5d", _A(64)), ("Mixed_6a", _B),
    ("Mixed_6b", _C(128)), ("Mixed_6c", _C(160)), ("Mixed_6d", _C(160)), ("Mixed_6e", _C(192)),
    ("Mixed_7a", _D), ("Mixed_7b", "E_avg"), ("Mixed_7c", "E_max"),
]


class BasicConv(nn.Module):
    """relu(BN(conv(x))) with frozen BatchNorm: (y - mean) / sqrt(var + 1e-3) * scale + bias."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: str = "SAME"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Conv(self.features, self.kernel, self.strides, padding=self.padding, use_bias=False,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        bn = {k: self.param(f"bn_{k}", init, (self.features,), self.param_dtype)
              for k, init in (("scale", nn.initializers.ones), ("bias", nn.initializers.zeros),
                              ("mean", nn.initializers.zeros), ("var", nn.initializers.ones))}
        inv = bn["scale"] * jax.lax.rsqrt(bn["var"].astype(jnp.float32) + BN_EPS)
        return nn.relu((x - bn["mean"]) * inv.astype(self.dtype) + bn["bias"])


def _pool(kind: str, x: Array) -> Array:
    if kind == "max_s2":
        return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")
    if kind == "avg":  # the FID blocks' average pool: padding excluded from the mean
        return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)
    if kind == "max":
        return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    raise ValueError(kind)


class InceptionE(nn.Module):
    """InceptionE with the FID patches: branch_pool pools by `pool` ("avg" without padding, or "max")."""

    pool: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def conv(name, f, k):
            return BasicConv(f, k, 1, "SAME", self.dtype, self.param_dtype, name=name)

        b1 = conv("branch1x1", 320, (1, 1))(x)
        b3 = conv("branch3x3_1", 384, (1, 1))(x)
        b3 = [conv("branch3x3_2a", 384, (1, 3))(b3), conv("branch3x3_2b", 384, (3, 1))(b3)]
        bd = conv("branch3x3dbl_2", 384, (3, 3))(conv("branch3x3dbl_1", 448, (1, 1))(x))
        bd = [conv("branch3x3dbl_3a", 384, (1, 3))(bd), conv("branch3x3dbl_3b", 384, (3, 1))(bd)]
        bp = conv("branch_pool", 192, (1, 1))(_pool(self.pool, x))
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionBlock(nn.Module):
    """Parallel branches (convs, optionally after a pool) concatenated on channels."""

    branches: Sequence
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        outs = []
        for branch in self.branches:
            h = x
            for layer in branch:
                if isinstance(layer, str):
                    h = _pool(layer, h)
                else:
                    name, f, k, s, p = layer
                    h = BasicConv(f, k, s, p, self.dtype, self.param_dtype, name=name)(h)
            outs.append(h)
        return jnp.concatenate(outs, axis=-1)


class Classifier(nn.Module):
    """The final ``fc``: z = pool @ kernel (+ bias), kernel (2048, 1008) = pytorch-fid's fc.weight^T, in float32."""

    num_classes: int = NUM_CLASSES
    use_bias: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pool: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], self.num_classes),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,), self.param_dtype)
        z = jnp.matmul(pool, kernel.astype(jnp.float32), precision="highest")
        return z + bias.astype(jnp.float32) if self.use_bias else z


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3: (B, 299, 299, 3) in [-1, 1] -> (B, 2048) pool features or (B, 1008) logits.

    `output` = "pool" (the FID features; no ``fc`` parameters are created or read), "logits" (pool @ W^T + b)
    or "logits_unbiased" (pool @ W^T, torch-fidelity's Inception Score input).
    """

    output: str = "pool"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        x = x.astype(self.dtype)
        for layer in _STEM:
            if isinstance(layer, str):
                x = _pool(layer, x)
            else:
                name, f, k, s, p = layer
                x = BasicConv(f, k, s, p, self.dtype, self.param_dtype, name=name)(x)
        for name, spec in _MIXED:
            if isinstance(spec, str):
                x = InceptionE(spec.split("_")[1], self.dtype, self.param_dtype, name=name)(x)
            else:
                x = InceptionBlock(spec, self.dtype, self.param_dtype, name=name)(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.output == "pool":
            return pool
        return Classifier(use_bias=self.output == "logits", param_dtype=self.param_dtype, name="fc")(pool)


# ---------------------------------------------------------------------------- preprocessing
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's bilinear resize with align_corners=False (no antialiasing).

    Output pixel i samples the input at s = (i + 0.5) n_in / n_out - 0.5 (clamped at 0) and blends
    pixels floor(s) and floor(s) + 1 (clamped at the edge) with weights 1 - frac(s), frac(s).
    """
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(w, (np.arange(n_out), i1), lam)
    return w


def preprocess(images: Array, resolution: int = RESOLUTION) -> Array:
    """(B, H, W, 1|3) uint8 or float in [-1, 1] -> (B, 299, 299, 3) float32 in [-1, 1], as pytorch-fid."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (B, H, W, 1 or 3), got shape {tuple(images.shape)}")
    x = to_unit_range(images)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    wh = jnp.asarray(bilinear_matrix(x.shape[1], resolution), jnp.float32)
    ww = jnp.asarray(bilinear_matrix(x.shape[2], resolution), jnp.float32)
    x = jnp.einsum("oh,bhwc->bowc", wh, x, precision="highest")
    x = jnp.einsum("pw,bowc->bopc", ww, x, precision="highest")
    return 2.0 * x - 1.0


# ---------------------------------------------------------------------------- weights
_BN_LEAVES = {"weight": "bn_scale", "bias": "bn_bias", "running_mean": "bn_mean", "running_var": "bn_var"}
_IGNORED = ("num_batches_tracked", "AuxLogits.")
_FC_KEYS = {"fc.weight": "fc/kernel", "fc.bias": "fc/bias"}


def params_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """pytorch-fid / torchvision Inception3 state dict (NCHW) -> FIDInceptionV3 params; strict key check.

    ``fc.weight`` (1008, 2048) and ``fc.bias`` are kept (as ``fc/kernel`` (2048, 1008), ``fc/bias``) when the
    state dict has them; a state dict without any ``fc.`` key gives the trunk only (enough for FID).
    """
    flat = {}
    for key, value in state_dict.items():
        if any(key.endswith(s) or key.startswith(s) for s in _IGNORED):
            continue
        value = np.asarray(value, np.float32)
        if key in _FC_KEYS:
            flat[_FC_KEYS[key]] = linear_to_flax(value) if key == "fc.weight" else value
            continue
        *path, kind, leaf = key.split(".")
        if kind == "conv" and leaf == "weight":
            flat["/".join([*path, "conv", "kernel"])] = conv_to_flax(value)
        elif kind == "bn" and leaf in _BN_LEAVES:
            flat["/".join([*path, _BN_LEAVES[leaf]])] = value
        else:
            flat[key] = value  # reported as unexpected below
    _check_flat(flat)
    return unflatten(flat)


def param_shapes(fc: bool = False) -> dict[str, tuple]:
    """Flat parameter shapes of the trunk, plus ``fc/kernel`` (2048, 1008) and ``fc/bias`` (1008,) if `fc`."""
    model = FIDInceptionV3(output="logits" if fc else "pool")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3))))
    return {k: v.shape for k, v in flatten(shapes["params"]).items()}


def _check_flat(flat: Mapping[str, np.ndarray]) -> None:
    """Strict check; the classifier is expected (both leaves, right shapes) as soon as one fc leaf is present."""
    check_tree(param_shapes(fc=any(k.startswith("fc/") for k in flat)), flat, "FID Inception-v3")


def has_classifier(params: PyTree) -> bool:
    """Whether `params` hold the ``fc`` classifier that logits need."""
    return isinstance(params, Mapping) and "fc" in params


def _require_classifier(params: PyTree) -> None:
    if not has_classifier(params):
        raise ConversionError(
            "Inception logits need the classifier weights 'fc.weight' (1008, 2048) and 'fc.bias', missing from "
            f"these weights (a pytorch-fid {FID_WEIGHTS_FILE} has them; FID features do not need them)")


def _read_torch_file(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading '{path}' needs torch (`pip install torch==2.13.0`); or convert it once to safetensors "
            "with ldm_jax.eval.inception.convert_weights on a machine that has torch"
        ) from None
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() for k, v in state.items()}


def load_params(path: str | os.PathLike) -> dict:
    """FIDInceptionV3 params from pytorch-fid's ``.pth`` (needs torch) or a ``.safetensors`` copy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at '{path}': download pytorch-fid's {FID_WEIGHTS_FILE} "
            "(no network access is attempted) and pass its local path"
        )
    if path.suffix == ".safetensors":
        flat = read_safetensors(path)
        _check_flat(flat)
        return unflatten(flat)
    try:
        return params_from_state_dict(_read_torch_file(path))
    except (ConversionError, ImportError):
        raise
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise ConversionError(
            f"'{path}' is not a readable PyTorch state dict ({type(e).__name__}: {e})") from None


def convert_weights(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Writes pytorch-fid's ``.pth`` as a torch-free ``.safetensors`` of FIDInceptionV3 params."""
    write_safetensors(dst, {k: np.asarray(v) for k, v in flatten(load_params(src)).items()})


def inception_apply(params: PyTree, images: Array, output: str = "pool") -> Array:
    """Images (B, H, W, 1|3), uint8 or float in [-1, 1] -> `output` (jittable; `output` is static).

    "pool": (B, 2048) FID features; "logits": (B, 1008) pool @ W^T + b; "logits_unbiased": (B, 1008)
    pool @ W^T (torch-fidelity's IS input). The logits raise `ConversionError` when `params` lack ``fc``.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if output != "pool":
        _require_classifier(params)
    return FIDInceptionV3(output=output).apply({"params": params}, preprocess(images))


def _params(weights: str | os.PathLike | PyTree) -> PyTree:
    return load_params(weights) if isinstance(weights, str | os.PathLike) else weights


def inception_feature_fn(weights: str | os.PathLike | PyTree, *, mesh=None, batch_size: int | None = None):
    """Sharded host callable images -> (B, 2048) FID features; `weights` is a path or a params tree."""
    return ShardedFeatureFn(inception_apply, _params(weights), mesh=mesh, batch_size=batch_size)


def inception_logits_fn(weights: str | os.PathLike | PyTree, *, mesh=None, batch_size: int | None = None,
                        bias: bool = False):
    """Sharded host callable images -> (B, 1008) classifier logits, for `inception_score`.

    By default (``bias=False``) the logits are torch-fidelity's "logits_unbiased", pool @ W^T, which its
    Inception Score uses; ``bias=True`` gives the classifier's full logits pool @ W^T + b. `weights` (a path
    or a params tree) must include ``fc``; otherwise a one-line `ConversionError` is raised here.
    """
    params = _params(weights)
    _require_classifier(params)
    apply = functools.partial(inception_apply, output="logits" if bias else "logits_unbiased")
    return ShardedFeatureFn(apply, params, mesh=mesh, batch_size=batch_size)
