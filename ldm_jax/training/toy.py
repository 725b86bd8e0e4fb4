"""A tiny, fast stage for exercising the training machinery: a 2-layer conv net regressing a fixed target.

Each example ``i`` is x_i ~ N(0, 1) of shape (R, R, 3) drawn from ``default_rng([seed, i])``; its target is
y_i = 0.5 * x_i[..., ::-1] - 0.2 (a channel flip and shift, which two 3x3 convs can represent). The loss is
mean((f(x + noise * eps) + bias - y)^2), eps ~ N(0, 1) from the step's rng, ``bias`` a frozen (not trained)
array; optional NaN injection at one step and an ``extra`` running mean of the targets (exercising the
TrainState slot a discriminator uses). The data is a grain pipeline: shuffled by seed, reshuffled every
epoch, batched globally and sliced per process, so its order does not depend on the process count.

    from ldm_jax.training import toy, train
    train(toy.toy_config(), "/tmp/toy", toy.make_task(toy.toy_config()))
"""

from __future__ import annotations

import math
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.configlib import base_config
from ldm_jax.training.task import Task


def toy_config() -> ml_collections.ConfigDict:
    """The base schema set up for the toy stage (20 steps of batch 16 at 8x8; a few seconds on a CPU)."""
    c = base_config()
    c.train.stage = "toy"
    c.train.num_steps = 20
    c.train.log_every_steps = 5
    c.train.ema.warmup_steps = 10
    c.data.batch_size = 16
    c.data.resolution = 8
    c.data.num_examples = 64
    c.optimizer.lr = 1e-2
    c.optimizer.warmup_steps = 2
    c.checkpoint.every_steps = 5
    # nan_step: the loss is NaN at that (1-based) step; delay_s: host-side sleep per batch (a slow loader).
    c.toy = dict(width=8, noise=0.05, nan_step=-1, extra=False, delay_s=0.0)
    return c


def flat_lecun_normal(key, shape, dtype=jnp.float32):
    """LeCun-normal kernel (std = 1 / sqrt(fan_in), fan_in = prod(shape[:-1])) drawn flat, then reshaped.

    Drawing a 4-D shape directly with the partitionable threefry PRNG compiles ~5x slower on CPU.
    """
    flat = jax.random.normal(key, (math.prod(shape),), dtype) / math.sqrt(math.prod(shape[:-1]))
    return flat.reshape(shape)


class ToyNet(nn.Module):
    """conv3x3(width) -> gelu -> conv3x3(3), NHWC, kernels named (None, None, "conv_in", "conv_out")."""

    width: int = 8
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        axes = (None, None, "conv_in", "conv_out")
        for i, features in enumerate((self.width, 3)):
            if i:
                x = nn.gelu(x)
            x = nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.with_logical_partitioning(flat_lecun_normal, axes),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                        name=f"conv{i + 1}")(x)
        return x


def _example(index: int, seed: int, resolution: int) -> dict:
    x = np.random.default_rng([seed, int(index)]).standard_normal((resolution, resolution, 3)).astype(np.float32)
    return {"x": x, "y": (0.5 * x[..., ::-1] - 0.2).astype(np.float32)}


def make_iterator(config, process_index: int, process_count: int):
    """Grain iterator of this process's slice of each global batch (checkpointable: get_state/set_state)."""
    seed, res, batch = int(config.data.seed), int(config.data.resolution), int(config.data.batch_size)
    local = batch // process_count
    delay = float(config.toy.get("delay_s", 0.0))

    def take(b):
        if delay > 0:
            time.sleep(delay)
        return {k: v[process_index * local:(process_index + 1) * local] for k, v in b.items()}

    ds = (grain.MapDataset.range(int(config.data.num_examples) or 64)
          .shuffle(seed=seed)
          .repeat(None)
          .map(lambda i: _example(i, seed, res))
          .batch(batch, drop_remainder=True)
          .map(take))
    return iter(ds.to_iter_dataset())


def make_task(config) -> Task:
    """The toy Task from ``toy_config()``-style settings (``config.toy``, ``config.data``, ``config.train``)."""
    opts = config.toy
    net = ToyNet(width=int(opts.width), dtype=jnp.dtype(config.train.dtype))
    res = int(config.data.resolution)

    def init(rng):
        return net.init(rng, jnp.zeros((1, res, res, 3), jnp.float32))["params"]

    def loss_fn(params, batch, rng, step, *, frozen, extra):
        del extra
        # Drawn flat then reshaped: same values as drawing the 4-D shape, but compiles ~5x faster on CPU.
        eps = jax.random.normal(rng, (batch["x"].size,)).reshape(batch["x"].shape)
        x = batch["x"] + frozen["noise"] * eps
        pred = net.apply({"params": params}, x).astype(jnp.float32) + frozen["bias"]
        loss = jnp.mean(jnp.square(pred - batch["y"]))
        loss = jnp.where(step + 1 == frozen["nan_step"], jnp.nan, loss)
        return loss, {"mse": loss}

    def init_extra(rng):
        del rng
        return {"target_mean": jnp.zeros((3,), jnp.float32)}

    def update_extra(extra, params, batch, rng, step, *, frozen):
        del params, rng, step, frozen
        mean = 0.9 * extra["target_mean"] + 0.1 * jnp.mean(batch["y"], axis=(0, 1, 2))
        return {"target_mean": mean}, {"target_mean_0": mean[0]}

    use_extra = bool(opts.extra)
    return Task(
        name="toy",
        init=init,
        loss_fn=loss_fn,
        make_iterator=lambda index, count: make_iterator(config, index, count),
        batch_size=int(config.data.batch_size),
        # noise and nan_step are arguments, not constants: runs differing only in them share a compiled step.
        frozen={"bias": jnp.zeros((3,), jnp.float32), "noise": jnp.asarray(float(opts.noise), jnp.float32),
                "nan_step": jnp.asarray(int(opts.nan_step), jnp.int32)},
        init_extra=init_extra if use_extra else None,
        update_extra=update_extra if use_extra else None,
    )
