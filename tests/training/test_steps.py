import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.training import sharding as shd
from ldm_jax.training import toy
from ldm_jax.training.loop import _global_abstract, _init_state
from ldm_jax.training.optim import OptimizerConfig, make_optimizer
from ldm_jax.training.steps import StepConfig, compile_train_step, loss_and_grads, make_train_step
from tests.training import toy_cases

RULES = shd.DEFAULT_RULES


def _config(**train):
    cfg = toy_cases.config(noise=0.0)  # micro-batches draw their own noise; without it 1 vs k must agree
    cfg.train.update(train)
    return cfg


def _build(cfg, mesh, trace_counter=None):
    task = toy.make_task(cfg)
    if trace_counter is not None:
        inner = task.loss_fn

        def counted(*args, **kwargs):
            trace_counter.append(1)
            return inner(*args, **kwargs)

        task = dataclasses.replace(task, loss_fn=counted)
    tx, schedule = make_optimizer(OptimizerConfig.from_config(cfg.optimizer), cfg.train.num_steps)

    def init_fn(rng):
        return _init_state(task, tx, rng)

    def new_state():
        return shd.create_sharded(init_fn, mesh, RULES, jax.random.PRNGKey(0))[0]

    state = new_state()
    frozen = shd.place(task.frozen, mesh, RULES)
    batches = [next(it) for it in [task.make_iterator(0, 1)] for _ in range(3)]
    step = compile_train_step(make_train_step(task, tx, schedule, StepConfig.from_config(cfg.train)), state,
                              jax.tree.map(lambda x: x.sharding, state), _global_abstract(batches[0], mesh), frozen,
                              mesh, RULES)
    return step, new_state, frozen, batches


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh({"data": 4, "fsdp": 2})


@pytest.fixture(scope="module")
def traces():
    return []


@pytest.fixture(scope="module")
def plain(mesh, traces):
    return _build(_config(grad_accum=1), mesh, trace_counter=traces)


def _run(built, mesh, n):
    step, new_state, frozen, batches = built
    state, losses = new_state(), []
    for b in batches[:n]:
        state, metrics = step(state, shd.global_batch(b, mesh), frozen)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_grad_accumulation_matches_one_big_batch(plain, mesh):
    accum = _build(_config(grad_accum=2), mesh)
    s1, l1 = _run(plain, mesh, 3)
    s2, l2 = _run(accum, mesh, 3)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s2.extra["target_mean"], s1.extra["target_mean"], rtol=1e-5)
    assert int(s2.step) == 3 and int(s2.nonfinite_count) == 0


def test_nonfinite_step_changes_nothing_but_counters(plain, mesh):
    step, new_state, frozen, batches = plain
    state = new_state()
    before = jax.device_get((state.params, state.opt_state, state.ema_params, state.extra))
    bad = dict(batches[0], x=np.full_like(batches[0]["x"], np.nan))
    state, metrics = step(state, shd.global_batch(bad, mesh), frozen)
    assert float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1 and int(state.nonfinite_count) == 1 and int(state.num_updates) == 0
    after = jax.device_get((state.params, state.opt_state, state.ema_params, state.extra))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    state, metrics = step(state, shd.global_batch(batches[1], mesh), frozen)  # the next good batch applies
    assert float(metrics["finite"]) == 1.0 and int(state.num_updates) == 1
    np.testing.assert_allclose(float(metrics["lr"]), 0.5e-2)  # lr at update 0: lr * (0 + 1) / warmup(2)


def test_step_is_traced_once_and_never_recompiles(plain, mesh, traces):
    step, new_state, frozen, batches = plain
    state = new_state()
    for b in batches:
        state, _ = step(state, shd.global_batch(b, mesh), frozen)
    assert len(traces) == 1
    small = {k: v[:8] for k, v in batches[0].items()}
    with pytest.raises(Exception, match="compiled"):  # the compiled step refuses, it does not retrace
        step(state, shd.global_batch(small, mesh), frozen)
    assert len(traces) == 1


def test_bfloat16_compute_gives_float32_gradients_of_float32_master_weights():
    mesh = shd.make_mesh({"data": 1, "fsdp": 1})
    task = toy.make_task(_config())
    params = shd.create_sharded(task.init, mesh, RULES, jax.random.PRNGKey(0))[0]
    frozen = shd.place(task.frozen, mesh, RULES)
    batch = shd.global_batch(next(task.make_iterator(0, 1)), mesh)

    @functools.partial(jax.jit, static_argnames="dtype")
    def run(params, batch, dtype):
        return loss_and_grads(task, params, batch, jax.random.PRNGKey(0), jnp.int32(0), frozen=frozen, extra=None,
                              dtype=dtype)

    (loss16, _), grads16 = run(params, batch, "bfloat16")
    (loss32, _), grads32 = run(params, batch, "float32")
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-2)
    for a, b in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) < 0.05 * np.linalg.norm(np.asarray(b))
