"""Helpers shared by the diffusion modules: pytree dataclasses, static/dynamic splitting, broadcasting."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.types import Array


def _is_leaf(obj) -> bool:
    return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(obj))


def pytree_dataclass(data_fields: Sequence[str], callable_fields: Sequence[str] = ()):
    """Class decorator: registers a dataclass with JAX; `data_fields` are pytree children, the rest static.

    Children may be arrays or nested pytrees (a schedule wrapping another, a params dict); static fields must
    be hashable (floats, strings, tuples). A field in `callable_fields` is static when it is a plain function
    (hashed by identity) and a child when it is itself a pytree (``jax.tree_util.Partial(apply, params)``), so
    such objects cross `jax.jit` either way and new params never retrace.
    """

    def wrap(cls):
        names = [f.name for f in dataclasses.fields(cls)]
        meta = [n for n in names if n not in data_fields and n not in callable_fields]
        if not callable_fields:
            return jax.tree_util.register_dataclass(cls, data_fields=list(data_fields), meta_fields=meta)

        def flatten(obj):
            fns = [getattr(obj, n) for n in callable_fields]
            static_fns = tuple(f if _is_leaf(f) else None for f in fns)
            children = [getattr(obj, n) for n in data_fields]
            children += [None if s is not None else f for f, s in zip(fns, static_fns)]
            return children, (tuple(getattr(obj, n) for n in meta), static_fns)

        def unflatten(aux, children):
            meta_values, static_fns = aux
            kwargs = dict(zip(data_fields, children[: len(data_fields)]))
            kwargs.update(zip(meta, meta_values))
            for name, fixed, child in zip(callable_fields, static_fns, children[len(data_fields) :]):
                kwargs[name] = child if fixed is None else fixed
            return cls(**kwargs)

        jax.tree_util.register_pytree_node(cls, flatten, unflatten)
        return cls

    return wrap


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def partition(tree):
    """Splits a pytree into (array leaves, hashable static part) so it can cross a `jax.jit` boundary.

    Array leaves (jax or numpy) become traced arguments; every other leaf (a plain function, a string, a
    Python number) is kept in the static part, hashed by value or identity. `combine` inverts it.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dynamic = [leaf if _is_array(leaf) else None for leaf in leaves]
    static = tuple(None if _is_array(leaf) else leaf for leaf in leaves)
    return dynamic, (treedef, static)


def combine(dynamic, static):
    treedef, static_leaves = static
    leaves = [d if s is None else s for d, s in zip(dynamic, static_leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def expand_like(v: Array, x: Array) -> Array:
    """Reshapes a per-example (B,) or scalar array so it broadcasts against x of shape (B, ...)."""
    v = jnp.asarray(v)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def alpha_sigma_from_logsnr(logsnr: Array) -> tuple[Array, Array]:
    """Variance-preserving alpha = sqrt(sigmoid(logsnr)), sigma = sqrt(sigmoid(-logsnr)); exact at +-inf."""
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
