import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax.training import optim
from ldm_jax.types import ConfigError


def test_schedule_closed_form():
    cfg = optim.OptimizerConfig(lr=2.0, warmup_steps=4, decay="cosine")
    lr = optim.learning_rate_schedule(cfg, num_steps=14)
    # warmup: lr * (t + 1) / W
    np.testing.assert_allclose(lr(jnp.arange(4)), [0.5, 1.0, 1.5, 2.0], rtol=1e-6)
    # cosine over the remaining 10 steps: lr * 0.5 * (1 + cos(pi * (t - 4) / 10))
    ts = (4, 6, 9, 14, 20)
    expect = [2.0 * 0.5 * (1 + math.cos(math.pi * min((t - 4) / 10, 1.0))) for t in ts]
    np.testing.assert_allclose(lr(jnp.array(ts)), expect, rtol=1e-6, atol=1e-7)
    const = optim.learning_rate_schedule(optim.OptimizerConfig(lr=2.0, warmup_steps=0, decay="constant"), 14)
    np.testing.assert_allclose(const(jnp.array([0, 5, 100])), [2.0, 2.0, 2.0])


def test_optimizer_is_clipped_adamw():
    cfg = optim.OptimizerConfig(lr=0.1, warmup_steps=0, decay="constant", grad_clip=1.0, weight_decay=0.5,
                                b1=0.9, b2=0.99, eps=1e-8)
    tx, _ = optim.make_optimizer(cfg, 10)
    p = {"w": jnp.array([1.0, -3.0])}
    g = {"w": jnp.array([30.0, 40.0])}  # norm 50 -> clipped to (0.6, 0.8)
    updates, _ = tx.update(g, tx.init(p), p)
    # First AdamW step: m_hat = g, v_hat = g^2  =>  -lr * (g / (|g| + eps) + wd * p)
    gc = np.array([0.6, 0.8])
    expect = -0.1 * (gc / (np.abs(gc) + 1e-8) + 0.5 * np.array([1.0, -3.0]))
    np.testing.assert_allclose(updates["w"], expect, rtol=1e-5)


def test_ema_decay_and_closed_form():
    np.testing.assert_allclose(optim.ema_decay(0, 0.999, 10), 0.1, rtol=1e-6)  # (1 + 0) / (10 + 0)
    np.testing.assert_allclose(optim.ema_decay(90, 0.999, 10), 0.91, rtol=1e-6)
    np.testing.assert_allclose(optim.ema_decay(10**6, 0.999, 10), 0.999, rtol=1e-6)
    np.testing.assert_allclose(optim.ema_decay(0, 0.9, 0), 0.9)
    # Constant params c from ema_0: ema_n = c + (ema_0 - c) * prod_t decay_t
    cfg = optim.EMAConfig(decay=0.95, warmup_steps=3)
    ema, c = {"w": jnp.full((3,), 5.0)}, {"w": jnp.full((3,), -1.0)}
    prod = 1.0
    for t in range(7):
        ema = optim.ema_update(ema, c, t, cfg)
        prod *= min(0.95, (1 + t) / (3 + t))
    np.testing.assert_allclose(ema["w"], -1.0 + 6.0 * prod, rtol=1e-6)


def test_cast_floating_keeps_ints_and_gradients_flow_to_float32():
    tree = {"w": jnp.ones((2,), jnp.float32), "i": jnp.arange(2)}
    cast = optim.cast_floating(tree, "bfloat16")
    assert cast["w"].dtype == jnp.bfloat16 and cast["i"].dtype == tree["i"].dtype
    g = jax.grad(lambda w: jnp.sum(optim.cast_floating({"w": w}, "bfloat16")["w"] * 3))(tree["w"])
    assert g.dtype == jnp.float32 and np.all(np.asarray(g) == 3)
    assert bool(optim.tree_all_finite(tree)) and not bool(optim.tree_all_finite({"w": jnp.array([1.0, jnp.nan])}))


@pytest.mark.parametrize("bad, match", [
    (dict(decay="cosin"), "did you mean 'cosine'"),
    (dict(name="sgd"), "not supported"),
    (dict(lr=0.0), "lr must be > 0"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        optim.OptimizerConfig.from_config(bad)
    with pytest.raises(ConfigError, match="did you mean 'decay'"):
        optim.OptimizerConfig.from_config({"decy": "cosine"})
    with pytest.raises(ConfigError, match="train.dtype"):
        optim.compute_dtype("bf16")
    assert optax.global_norm({"a": jnp.array([3.0, 4.0])}) == 5.0
