"""Pieces shared by the diffusion transformers (`ldm_jax.models.dit`, `ldm_jax.models.mmdit`).

    layer_norm(x, eps)            LN without affine parameters, statistics in float32
    modulate(x, shift, scale)     x (1 + scale) + shift, (B, D) vectors broadcast over the tokens (adaLN)
    Modulation                    `chunks` vectors split(Linear(SiLU(c)))                 parameters ``linear``
    GeluProjection                gelu_tanh(Linear(x))                                    parameters ``proj``
    GeluFeedForward               Linear(gelu_tanh(Linear(x))), any hidden width          ``net_0/proj``, ``net_2``
    sincos_positions_2d           the fixed 2-D sin-cos position table of a (row, column) coordinate grid

Parameter names follow diffusers (AdaLayerNormZero.linear, FeedForward.net.0.proj / net.2, GELU.proj), which
the converters rely on. Positions follow diffusers' ``get_2d_sincos_pos_embed``: a grid of n cells gets the
coordinates arange(n) * base_size / n / interpolation_scale (`grid_coordinates`); DiT builds the grid it is
given, MMDiT crops the centre of a pos_embed_max_size grid by slicing those coordinates.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.layers import dense
from ldm_jax.types import Array

Dtype = Any


# ---------------------------------------------------------------------------- norms and adaLN
def layer_norm(x: Array, eps: float, dtype: Dtype | None = None) -> Array:
    """(x - mean) / sqrt(var + eps) over the last axis, no affine parameters; statistics and normalisation in
    float32, the result in `dtype` (None: x's dtype)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype if dtype is None else dtype)


def modulate(x: Array, shift: Array, scale: Array, dtype: Dtype | None = None) -> Array:
    """x (B, L, D) * (1 + scale) + shift, with (B, D) shift and scale broadcast over the L tokens.

    Dtype rule: with `dtype` None the arithmetic and the result are in x's dtype (shift and scale are cast to
    it; DiT, whose normalised x is already in the model dtype). With a `dtype`, the arithmetic is in float32
    (x, shift and scale upcast) and only the result is cast to `dtype` (MMDiT, which feeds the float32
    `layer_norm` output straight in, so a bfloat16 model rounds once, after the modulation).
    """
    compute = x.dtype if dtype is None else jnp.float32
    out = x.astype(compute) * (1 + scale.astype(compute)[:, None, :]) + shift.astype(compute)[:, None, :]
    return out.astype(compute if dtype is None else dtype)


class Modulation(nn.Module):
    """adaLN parameters (Peebles & Xie 2023): `chunks` vectors, each as wide as c, = split(Linear(SiLU(c))).

    Parameters ``linear`` (diffusers' AdaLayerNormZero / AdaLayerNormContinuous ``linear``). The order of the
    chunks is the caller's (AdaLayerNormZero: shift, scale, gate, shift, scale, gate[, shift, scale, gate];
    AdaLayerNormContinuous: scale, shift). `zero_init` starts the Linear at 0 (adaLN-Zero).
    """

    chunks: int
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: Array) -> list[Array]:
        lin = dense(self.chunks * c.shape[-1], ("embed", "mlp"), zero_init=self.zero_init, name="linear",
                    dtype=self.dtype, param_dtype=self.param_dtype)
        return jnp.split(lin(nn.silu(c)), self.chunks, axis=-1)


class GeluProjection(nn.Module):
    """gelu_tanh(x W + b), W: (dim, `features`) (diffusers' GELU(approximate="tanh"), parameters ``proj``)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = dense(self.features, ("embed", "mlp"), name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return nn.gelu(h, approximate=True)


class GeluFeedForward(nn.Module):
    """net_2(gelu_tanh(net_0(x))): dim -> `hidden` -> dim, no gating (diffusers' FeedForward with
    activation_fn="gelu-approximate"; parameters ``net_0/proj``, ``net_2``)."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GeluProjection(self.hidden, name="net_0", **kw)(x)
        return dense(x.shape[-1], ("mlp", "embed"), name="net_2", **kw)(h)


# ---------------------------------------------------------------------------- positions
def grid_coordinates(n: int, base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """Coordinates of n grid cells along one axis, float32 as diffusers computes them:
    arange(n) / (n / base_size) / interpolation_scale. At n = base_size they are the integer cell indices."""
    return np.arange(n, dtype=np.float32) / np.float32(n / base_size) / np.float32(interpolation_scale)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(n, dim) float32 [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k / (dim / 2)), k < dim / 2, from float64."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    args = np.outer(np.asarray(pos, np.float64), omega)
    return np.concatenate([np.sin(args), np.cos(args)], axis=1).astype(np.float32)


def sincos_positions_2d(dim: int, rows: np.ndarray, cols: np.ndarray, xp: Any = np) -> Array:
    """Fixed 2-D sin-cos positions of the grid rows x cols (coordinates, e.g. `grid_coordinates`), float32
    (len(rows) * len(cols), dim), tokens row-major; dim a multiple of 4.

    Token (i, j) is [sincos(cols[j]), sincos(rows[i])], each dim / 2 wide as `_sincos_1d` (diffusers'
    get_2d_sincos_pos_embed). `xp` is the array module that assembles the table from the two small per-axis
    tables: numpy gives a numpy array; jax.numpy, inside a jitted model, keeps the (rows * cols, dim) table out
    of the program's constants (only the per-axis tables enter it).
    """
    if dim % 4:
        raise ValueError(f"sincos_positions_2d: dim={dim} is not a multiple of 4")
    half, h, w = dim // 2, len(rows), len(cols)
    r, c = xp.asarray(_sincos_1d(half, rows)), xp.asarray(_sincos_1d(half, cols))
    grid = [xp.broadcast_to(c[None], (h, w, half)), xp.broadcast_to(r[:, None], (h, w, half))]
    return xp.concatenate(grid, axis=-1).reshape(h * w, dim)
