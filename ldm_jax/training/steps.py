"""The pure train step, and its ahead-of-time compilation with shardings and donation.

``train_step(state, batch, frozen) -> (state, metrics)``:

1. rng_t = fold_in(state.rng, state.step) (randomness by step, never threaded through Python state);
2. loss and gradients of ``task.loss_fn`` on the float32 master params cast to ``train.dtype``; with
   ``grad_accum = k`` the global batch is split into k micro-batches (each device splits its own rows, so
   no data moves) and a ``lax.scan`` averages their losses, metrics and gradients, which equals one pass
   over the whole batch for a per-example mean loss;
3. g = ||grad||_2 (global norm, before clipping); AdamW update; EMA update; optional ``task.update_extra``;
4. if the loss, g or the update's norm is not finite, the new params / opt state / EMA / extra are discarded
   (``state`` moves on only in ``step`` and ``nonfinite_count``) and ``metrics["finite"]`` is 0; the loop then halts or
   goes on according to ``train.on_nonfinite``.

The step has no Python branch on data: it is traced once, compiled once (``compile_train_step``) and the
compiled executable is called for every step, so it can never recompile.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.training import optim
from ldm_jax.training.sharding import BATCH_AXES, batch_sharding
from ldm_jax.training.state import TrainState
from ldm_jax.training.task import Task
from ldm_jax.types import Array, ConfigError, PyTree

logger = logging.getLogger("ldm_jax.training")

StepFn = Callable[[TrainState, PyTree, PyTree], tuple[TrainState, dict]]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step needs from ``config.train`` (``from_config``) beyond the optimizer."""

    grad_accum: int = 1
    dtype: str = "float32"
    ema: optim.EMAConfig = optim.EMAConfig()

    @classmethod
    def from_config(cls, train_cfg) -> StepConfig:
        grad_accum = int(train_cfg["grad_accum"])
        if grad_accum < 1:
            raise ConfigError(f"train.grad_accum={grad_accum} must be >= 1")
        optim.compute_dtype(train_cfg["dtype"])
        return cls(grad_accum=grad_accum, dtype=str(train_cfg["dtype"]),
                   ema=optim.EMAConfig.from_config(train_cfg["ema"]))


def _split_micro(x: Array, k: int) -> Array:
    """(B, ...) -> (k, B / k, ...): row b goes to micro-batch b % k, so each device splits its own rows."""
    micro = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(micro, P(None, BATCH_AXES))


def loss_and_grads(task: Task, params: PyTree, batch: PyTree, rng: Array, step: Array, *, frozen: PyTree,
                   extra: PyTree, grad_accum: int = 1, dtype: str = "float32"):
    """((mean loss, mean metrics), mean grads) over `grad_accum` micro-batches of `batch`."""

    def objective(p, b, r):
        loss, metrics = task.loss_fn(optim.cast_floating(p, dtype), b, r, step, frozen=frozen, extra=extra)
        return loss.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if grad_accum == 1:
        return grad_fn(params, batch, rng)

    micro = jax.tree.map(lambda x: _split_micro(x, grad_accum), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first, rng))

    def body(carry, inputs):
        j, b = inputs
        out = grad_fn(params, b, jax.random.fold_in(rng, j))
        return jax.tree.map(jnp.add, carry, out), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
    return jax.tree.map(lambda x: x / grad_accum, total)


def _select(ok: Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: Callable, cfg: StepConfig) -> StepFn:
    """The pure ``train_step(state, batch, frozen) -> (state, metrics)`` of the module docstring."""

    def train_step(state: TrainState, batch: PyTree, frozen: PyTree = None) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = loss_and_grads(task, state.params, batch, jax.random.fold_in(rng, 0), state.step,
                                            frozen=frozen, extra=state.extra, grad_accum=cfg.grad_accum,
                                            dtype=cfg.dtype)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        ok = ok & jnp.isfinite(optax.global_norm(updates))  # e.g. a learning rate that overflows
        params = optax.apply_updates(state.params, updates)
        ema = optim.ema_update(state.ema_params, params, state.num_updates, cfg.ema)
        extra, extra_metrics = state.extra, {}
        if task.update_extra is not None:
            extra, extra_metrics = task.update_extra(state.extra, state.params, batch, jax.random.fold_in(rng, 1),
                                                     state.step, frozen=frozen)
            ok = ok & optim.tree_all_finite(extra)
        new_state = state.replace(
            step=state.step + 1,
            params=_select(ok, params, state.params),
            opt_state=_select(ok, opt_state, state.opt_state),
            ema_params=_select(ok, ema, state.ema_params),
            extra=_select(ok, extra, state.extra),
            nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
        )
        metrics = {
            **aux,
            **{k: jnp.asarray(v, jnp.float32) for k, v in extra_metrics.items()},
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.num_updates),
            "finite": ok.astype(jnp.float32),
            "nonfinite_count": new_state.nonfinite_count.astype(jnp.float32),
        }
        return new_state, metrics

    return train_step


def compile_train_step(step_fn: StepFn, abstract_state: PyTree, state_shardings: PyTree, abstract_batch: PyTree,
                       frozen: PyTree, mesh: Mesh, rules) -> Callable:
    """``jit(step_fn, in/out shardings, donate state).lower(...).compile()``; logs the compile time.

    `abstract_batch`: ShapeDtypeStructs of the *global* batch. Returns the compiled executable; calling it
    with differently shaped or sharded inputs raises instead of recompiling.
    """
    replicated = NamedSharding(mesh, P())
    bsh = jax.tree.map(lambda _: batch_sharding(mesh), abstract_batch)
    fsh = jax.tree.map(lambda x: x.sharding, frozen)
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, bsh, fsh), out_shardings=(state_shardings, replicated),
                     donate_argnums=(0,))
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jitted.lower(abstract_state, abstract_batch, frozen)
        traced = time.perf_counter()
        compiled = lowered.compile()
    done = time.perf_counter()
    logger.info("train step traced in %.1f s, compiled in %.1f s", traced - start, done - traced)
    return compiled
