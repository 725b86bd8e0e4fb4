"""Classifier-free guidance as a denoise_fn transform (Ho & Salimans 2022).

``cfg(model_fn, cond, uncond, scale)`` turns a conditional network ``model_fn(x_t, t, context) -> output``
into a ``denoise_fn(x_t, t)``:

    out = out_u + w (out_c - out_u)                      (uncond may be a negative prompt's context)
    rescale phi > 0 (Lin et al. 2023, Eq. 15-16):  out = phi out std(out_c) / std(out) + (1 - phi) out
    interval (lo, hi) (Kynkaenniemi et al. 2024): guidance only where lo <= t <= hi, else out = out_c

Guidance is linear in the output, so it is the same whichever prediction (eps, x0, v, flow) the network
makes; std is taken per example over all non-batch axes. The conditional and unconditional passes run as
one batch of 2B by default (``batched=False``: two calls). Contexts may be arrays or pytrees (e.g. a dict
with pooled embeddings); an unconditional context with batch 1 is broadcast to the batch.

The result is a pytree (its contexts and scale are leaves), so `sample` does not retrace when they change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ldm_jax.diffusion._util import expand_like, pytree_dataclass
from ldm_jax.types import Array, ConfigError, PyTree


def rescale_guidance(guided: Array, cond: Array, phi: float) -> Array:
    """phi * guided * std(cond) / std(guided) + (1 - phi) * guided, std per example (Lin et al. 2023)."""
    axes = tuple(range(1, guided.ndim))
    ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True)
    return phi * guided * ratio + (1.0 - phi) * guided


@pytree_dataclass(data_fields=("cond", "uncond", "scale"), callable_fields=("model_fn",))
@dataclasses.dataclass(frozen=True, eq=False)
class CFG:
    """A guided denoise_fn; build it with `cfg`."""

    model_fn: Callable[[Array, Array, PyTree], Array]
    cond: PyTree
    uncond: PyTree
    scale: Array
    rescale: float = 0.0
    interval: tuple[float, float] | None = None
    batched: bool = True

    def _outputs(self, x: Array, t: Array) -> tuple[Array, Array]:
        batch = x.shape[0]
        uncond = jax.tree_util.tree_map(
            lambda u, c: jnp.broadcast_to(u, (batch,) + u.shape[1:]) if u.shape[0] == 1 else u,
            self.uncond,
            self.cond,
        )
        if not self.batched:
            return self.model_fn(x, t, self.cond), self.model_fn(x, t, uncond)
        both = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], axis=0), self.cond, uncond)
        out = self.model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        return out[:batch], out[batch:]

    def __call__(self, x: Array, t: Array) -> Array:
        out_c, out_u = self._outputs(x, t)
        guided = out_u + expand_like(self.scale, out_c) * (out_c - out_u)
        if self.rescale > 0:
            guided = rescale_guidance(guided, out_c, self.rescale)
        if self.interval is not None:
            lo, hi = self.interval
            inside = (t >= lo) & (t <= hi)
            guided = jnp.where(expand_like(inside, guided), guided, out_c)
        return guided


def cfg(
    model_fn: Callable[[Array, Array, PyTree], Array],
    cond: PyTree,
    uncond: PyTree,
    scale: float | Array,
    *,
    rescale: float = 0.0,
    interval: tuple[float, float] | None = None,
    batched: bool = True,
) -> CFG:
    """Classifier-free guidance of `model_fn` between contexts `cond` and `uncond` (see the module doc).

    `scale` is w (1 = no guidance; a (B,) array gives one scale per example); `rescale` is phi in [0, 1];
    `interval` = (t_lo, t_hi) limits guidance to those times.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ConfigError(f"guidance rescale must be in [0, 1], got {rescale}")
    if interval is not None:
        lo, hi = interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {interval}")
        interval = (float(lo), float(hi))
    c_leaves, u_leaves = jax.tree_util.tree_leaves(cond), jax.tree_util.tree_leaves(uncond)
    if jax.tree_util.tree_structure(cond) != jax.tree_util.tree_structure(uncond):
        raise ConfigError("cond and uncond contexts must have the same structure")
    for c, u in zip(c_leaves, u_leaves):
        if c.shape[1:] != u.shape[1:] or u.shape[0] not in (1, c.shape[0]):
            raise ConfigError(f"uncond context {u.shape} does not match cond {c.shape} (batch 1 or equal)")
    return CFG(
        model_fn, cond, uncond, jnp.asarray(scale, jnp.float32), float(rescale), interval, bool(batched)
    )
