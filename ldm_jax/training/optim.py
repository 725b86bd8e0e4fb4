"""Optimizer recipe: AdamW with linear warmup + cosine (or constant) decay, global-norm clipping, EMA, bf16.

* AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"), from optax.
* Learning rate at update ``t`` (0-based count of applied updates, W warmup steps, T = ``train.num_steps``)::

      lr_t = lr * min(1, (t + 1) / W)                                       for t < W
      lr_t = lr * 0.5 * (1 + cos(pi * min(1, (t - W) / (T - W))))           for t >= W   ("cosine")
      lr_t = lr                                                             for t >= W   ("constant")

  The first update already moves (``(t + 1) / W``, not ``t / W``).
* Gradients are clipped to global norm ``grad_clip`` (Pascanu et al. 2013) before AdamW; 0 turns it off.
* EMA of the parameters, with TensorFlow's ``ExponentialMovingAverage(num_updates=t)`` warmup rule and the
  constant 10 replaced by ``warmup_steps = W``::

      decay_t = min(decay, (1 + t) / (W + t))          (W <= 1: decay_t = decay)
      ema_{t+1} = decay_t * ema_t + (1 - decay_t) * params_{t+1}

* Mixed precision: parameters and optimizer state stay float32 ("master weights"); the step casts a copy
  of the floating parameters to ``train.dtype`` (e.g. bfloat16) for the forward/backward pass, so the
  gradients flow back into float32 through the cast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from ldm_jax.types import Array, ConfigError, FrozenConfig, PyTree, nearest

DECAYS = ("cosine", "constant")
OPTIMIZERS = ("adamw",)
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(FrozenConfig):
    """``config.optimizer``: AdamW hyper-parameters and the learning-rate schedule."""

    name: str = "adamw"
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 100
    decay: str = "cosine"
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name='{self.name}' is not supported{nearest(self.name, OPTIMIZERS)}: "
                              f"use one of {OPTIMIZERS}")
        if self.decay not in DECAYS:
            raise ConfigError(f"optimizer.decay='{self.decay}' is unknown{nearest(self.decay, DECAYS)}: "
                              f"use one of {DECAYS}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optimizer.lr must be > 0, optimizer.warmup_steps and optimizer.grad_clip >= 0 "
                              f"(got lr={self.lr}, warmup_steps={self.warmup_steps}, grad_clip={self.grad_clip})")


@dataclasses.dataclass(frozen=True)
class EMAConfig(FrozenConfig):
    """``config.train.ema``: target decay and the warmup constant W of ``min(decay, (1 + t) / (W + t))``."""

    decay: float = 0.999
    warmup_steps: int = 100

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"train.ema.decay={self.decay} must lie in [0, 1) (0 makes the EMA a copy of params)")


def learning_rate_schedule(cfg: OptimizerConfig, num_steps: int) -> Callable[[Array], Array]:
    """``t -> lr_t`` of the module docstring (jit-friendly; ``t`` counts applied updates from 0)."""
    warmup = max(int(cfg.warmup_steps), 0)
    decay_steps = max(int(num_steps) - warmup, 1)

    def schedule(t):
        t = jnp.asarray(t, jnp.float32)
        ramp = jnp.minimum(1.0, (t + 1.0) / warmup) if warmup > 0 else jnp.ones_like(t)
        if cfg.decay == "constant":
            return cfg.lr * ramp
        progress = jnp.clip((t - warmup) / decay_steps, 0.0, 1.0)
        return cfg.lr * jnp.where(t < warmup, ramp, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))

    return schedule


def make_optimizer(cfg: OptimizerConfig, num_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """(clip_by_global_norm -> AdamW(schedule), schedule). The schedule reads optax's own update count."""
    schedule = learning_rate_schedule(cfg, num_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
    return tx, schedule


def ema_decay(t: Array, decay: float, warmup_steps: int) -> Array:
    """``min(decay, (1 + t) / (W + t))`` with W = ``warmup_steps``; plain ``decay`` when W <= 1."""
    if warmup_steps <= 1:
        return jnp.asarray(decay, jnp.float32)
    t = jnp.asarray(t, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (warmup_steps + t))


def ema_update(ema: PyTree, params: PyTree, t: Array, cfg: EMAConfig) -> PyTree:
    """``decay_t * ema + (1 - decay_t) * params`` leaf by leaf (``t``: updates applied before this one)."""
    d = ema_decay(t, cfg.decay, cfg.warmup_steps)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


def compute_dtype(name: str) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' -> dtype, with a one-line ConfigError otherwise."""
    if name not in DTYPES:
        raise ConfigError(f"train.dtype='{name}' is unknown{nearest(name, DTYPES)}: use one of {DTYPES}")
    return jnp.dtype(name)


def cast_floating(tree: PyTree, dtype) -> PyTree:
    """Casts the floating-point leaves of `tree` to `dtype` (integer leaves and keys unchanged)."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

    return jax.tree.map(cast, tree)


def tree_all_finite(tree: PyTree) -> Array:
    """Scalar bool: every floating leaf of `tree` is finite (True for an empty tree)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)

