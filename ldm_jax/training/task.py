"""The contract between a training stage and the generic machinery (step, loop, checkpoints, sharding).

A stage (autoencoder, latent diffusion, the toy regression of the tests) is a ``Task`` value: plain functions
and data, no subclassing. The loop never looks inside params, batches or metrics beyond what is written here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from ldm_jax.types import Array, PRNGKey, PyTree

STAGES = ("autoencoder", "ldm", "toy")  # the values of config.train.stage


class DataIterator(Protocol):
    """A checkpointable iterator of this process's batches (a grain ``DatasetIterator`` is one).

    ``next()`` returns a pytree of numpy arrays whose leading dimension is this process's share of the
    global batch; the processes' shares, concatenated in process order, form the global batch. For exact
    resume the order must depend only on the seed and on how many batches were drawn. ``get_state()``
    returns a JSON-serialisable value (bytes are accepted too) that ``set_state`` accepts back.
    """

    def __next__(self) -> PyTree: ...

    def __iter__(self) -> Iterator[PyTree]: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class Task:
    """One training stage, as functions the generic step and loop call.

    Attributes:
      name: short stage name (logs).
      init: ``rng -> params``; may return ``nn.Partitioned``-boxed leaves (logical axis names), as the
        models' ``init`` does; it is only ever traced (``eval_shape``, then ``jit`` with out shardings).
      loss_fn: ``(params, batch, rng, step, *, frozen, extra) -> (loss, metrics)``: a scalar float32 loss
        (mean over the batch, so micro-batch means average to the full-batch mean) and a dict of scalar
        metrics. ``params`` arrive unboxed and cast to ``train.dtype``; ``batch`` is the global batch (or
        one micro-batch of it) as sharded arrays; ``step`` is the int32 step; ``frozen`` and ``extra`` as below.
      make_iterator: ``(process_index, process_count) -> DataIterator``.
      frozen: arrays the loss needs but never trains (frozen VAE / text encoder params), or None. They are
        jit arguments (not constants baked into the program) and are not checkpointed.
      init_extra: ``rng -> extra`` trained state kept in ``TrainState.extra`` (e.g. discriminator params and
        optimizer state), or None.
      update_extra: ``(extra, params, batch, rng, step, *, frozen) -> (extra, metrics)``, run in the same
        step after the loss (with the params the loss saw), e.g. the discriminator's update; or None.
      batch_size: the global batch size (for the images/s metric and mesh checks).
      pretrained: host arrays (numpy) with the structure of ``init``'s unboxed params, or None. A fresh run
        (not a resume) starts from them: each leaf is placed straight into its parameter's sharding, so the
        weights never become constants of a compiled program (fine-tuning from SD's 860M parameters).
    """

    name: str
    init: Callable[[PRNGKey], PyTree]
    loss_fn: Callable[..., tuple[Array, Mapping[str, Array]]]
    make_iterator: Callable[[int, int], DataIterator]
    batch_size: int
    frozen: PyTree = None
    init_extra: Callable[[PRNGKey], PyTree] | None = None
    update_extra: Callable[..., tuple[PyTree, Mapping[str, Array]]] | None = None
    pretrained: PyTree = None
