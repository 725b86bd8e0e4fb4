"""The training state: one immutable pytree that a train step maps to the next one.

Everything a run needs to continue bit for bit lives here (plus the data-iterator state, which the
checkpoint stores beside it): the update counter, float32 master parameters, the optimizer state, the EMA
parameters, the base random key (each step derives its own with ``fold_in(rng, step)``), a count of skipped
non-finite steps, and a free ``extra`` slot for stage-specific trained state such as a discriminator's
parameters and optimizer state.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ldm_jax.types import Array, PyTree


@flax.struct.dataclass
class TrainState:
    """Immutable training state (a pytree; pure functions build new ones with ``.replace``).

    Attributes:
      step: int32 scalar, number of train steps taken (skipped non-finite steps included).
      params: float32 master parameters (cast to the compute dtype only inside the step).
      opt_state: the optax state of ``params``.
      ema_params: exponential moving average of ``params`` (see ``optim.ema_update``).
      rng: uint32[2] base key; step ``t`` uses ``jax.random.fold_in(rng, t)``.
      nonfinite_count: int32 scalar, how many steps were skipped for a non-finite loss or gradient.
      extra: stage-specific trained state (e.g. discriminator params and opt state), or None.
    """

    step: Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree
    rng: Array
    nonfinite_count: Array
    extra: PyTree = None

    @property
    def num_updates(self) -> Array:
        """Updates actually applied: ``step - nonfinite_count`` (the optimizer's own count)."""
        return self.step - self.nonfinite_count


def create_state(params: PyTree, tx: optax.GradientTransformation, rng: Array, extra: PyTree = None) -> TrainState:
    """A fresh state at step 0: EMA starts as a copy of ``params``; works on boxed (logical) params too."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        rng=jnp.asarray(rng, jnp.uint32),
        nonfinite_count=jnp.zeros((), jnp.int32),
        extra=extra,
    )
