"""The generic training loop: ``train(config, workdir, task, callbacks=())``.

* Resume: rerunning the same command restores the newest good checkpoint of ``workdir`` (state *and*
  data-iterator position) and continues, so an interrupted run ends with the same parameters, bit for bit,
  as an uninterrupted one.
* Preemption: SIGTERM or SIGINT sets a flag; the loop finishes the current step, saves, and returns
  normally (exit status 0). A second SIGINT interrupts at once. ``train.stop_at_step`` does the same after a
  given step (a job that has one time slice of a longer run; the schedule still spans train.num_steps).
* Guard rails: a step with a non-finite loss or gradient never changes the parameters; with
  ``train.on_nonfinite="halt"`` the loop stops with ``NonFiniteError`` naming the step (the newest
  checkpoint is the last good state), with ``"skip"`` it warns and goes on.
* Logging (process 0): ``MetricWriter`` scalars every ``train.log_every_steps`` (means over the interval of
  loss, grad_norm, lr, the task's metrics, plus images_per_s and step_time_s) and a tqdm progress bar.
* A step's checkpoint is written before its callbacks run, so a failing callback never costs it; a failed save
  (full disk, folder removed) raises ``SaveError`` at the next step; a checkpoint refused because the
  parameters are not finite raises ``NonFiniteError``.
* Callbacks: small callables ``(step, state) -> mapping or None`` run after every step (wrap them in
  ``every(n, fn)``); scalars in the returned mapping are logged, (H, W, 3) uint8 arrays written as images.
  Sample grids and evaluation plug in here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from ldm_jax.ldm.workdirs import portable_config
from ldm_jax.training import sharding as shd
from ldm_jax.training.checkpoint import Checkpointer
from ldm_jax.training.optim import OptimizerConfig, make_optimizer
from ldm_jax.training.state import TrainState, create_state
from ldm_jax.training.steps import StepConfig, compile_train_step, make_train_step
from ldm_jax.training.task import Task
from ldm_jax.training.writers import MetricWriter
from ldm_jax.types import ConfigError, PyTree, nearest

logger = logging.getLogger("ldm_jax.training")

Callback = Callable[[int, TrainState], Mapping | None]
ON_NONFINITE = ("halt", "skip")


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient and ``train.on_nonfinite`` is "halt"."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The loop's settings from ``config.train`` and ``config.checkpoint``."""

    num_steps: int
    seed: int = 0
    log_every_steps: int = 50
    on_nonfinite: str = "halt"
    checkpoint_every: int = 500
    keep: int = 3
    keep_every: int = 0
    stop_at_step: int = 0  # > 0: save and stop after this step, as if preempted (a job's time slice on a cluster)

    @classmethod
    def from_config(cls, config) -> LoopConfig:
        t, c = config.train, config.checkpoint
        out = cls(num_steps=int(t.num_steps), seed=int(t.seed), log_every_steps=int(t.log_every_steps),
                  on_nonfinite=str(t.on_nonfinite), checkpoint_every=int(c.every_steps), keep=int(c.keep),
                  keep_every=int(c.keep_every), stop_at_step=int(t.get("stop_at_step", 0) or 0))
        if out.on_nonfinite not in ON_NONFINITE:
            raise ConfigError(f"train.on_nonfinite='{out.on_nonfinite}' is unknown"
                              f"{nearest(out.on_nonfinite, ON_NONFINITE)}: use 'halt' or 'skip'")
        if out.num_steps < 1:
            raise ConfigError(f"train.num_steps={out.num_steps} must be >= 1")
        if out.stop_at_step < 0:
            raise ConfigError(f"train.stop_at_step={out.stop_at_step} must be >= 0 (0: run to train.num_steps)")
        return out


def every(num_steps: int, fn: Callback) -> Callback:
    """Runs ``fn(step, state)`` on steps that are multiples of `num_steps` (never when it is <= 0)."""

    def callback(step: int, state: TrainState):
        return fn(step, state) if num_steps > 0 and step % num_steps == 0 else None

    return callback


class StopSignal:
    """Context manager: SIGTERM / SIGINT set a flag (checked once per step) instead of killing the process."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self._signals = signals
        self._previous = {}
        self.signum: int | None = None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: finishing the current step, saving a checkpoint, then exiting",
                       signal.Signals(signum).name)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self) -> bool:
        """Whether any process got a signal (all processes agree, so they all save and stop together)."""
        flag = self.signum is not None
        if jax.process_count() > 1:
            flag = bool(np.max(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
        return flag


class _Meter:
    """Reads each step's metrics one step late (keeping dispatch asynchronous), checks them, averages them."""

    def __init__(self, on_nonfinite: str, checkpointer: Checkpointer):
        self.on_nonfinite, self.checkpointer = on_nonfinite, checkpointer
        self.pending: tuple[int, dict] | None = None
        self.sums: dict[str, float] = {}
        self.count = 0

    def push(self, step: int, metrics: dict) -> None:
        previous, self.pending = self.pending, (step, metrics)
        if previous is not None:
            self._consume(*previous)

    def flush(self) -> None:
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._consume(*previous)

    def _consume(self, step: int, metrics: dict) -> None:
        values = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}
        if values["finite"] < 1.0:
            what = f"non-finite loss or gradients at step {step} (loss={values['loss']}, " \
                   f"grad_norm={values['grad_norm']})"
            if self.on_nonfinite == "halt":
                raise NonFiniteError(f"{what}: halting (train.on_nonfinite='halt'); newest checkpoint is step "
                                     f"{self.checkpointer.latest_step()}; lower optimizer.lr, or set "
                                     "train.on_nonfinite='skip' to skip such steps (their updates are dropped)")
            logger.warning("%s: update skipped (train.on_nonfinite='skip')", what)
            return
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def summary(self) -> dict[str, float]:
        out = {k: v / self.count for k, v in self.sums.items() if k != "finite"} if self.count else {}
        self.sums, self.count = {}, 0
        return out


def _config_json(config) -> dict:
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def _init_state(task: Task, tx, rng) -> TrainState:
    init_rng, train_rng, extra_rng = jax.random.split(rng, 3)
    extra = task.init_extra(extra_rng) if task.init_extra is not None else None
    return create_state(task.init(init_rng), tx, train_rng, extra)


def _global_abstract(local: PyTree, mesh) -> PyTree:
    sharding = shd.batch_sharding(mesh)
    count = jax.process_count()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((np.shape(x)[0] * count, *np.shape(x)[1:]),
                                                       np.asarray(x).dtype, sharding=sharding), local)


class _StepPerShape:
    """The compiled train step of each global batch shape the data gives (aspect-ratio buckets: one per
    bucket), compiled when that shape first arrives; the state and frozen shardings are the same for all.
    `compile_for(abstract_batch)` compiles one."""

    def __init__(self, compile_for):
        self._compile_for, self._compiled = compile_for, {}

    @staticmethod
    def _key(batch) -> tuple:
        return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(batch))

    def prepare(self, abstract_batch) -> None:
        """Compiles the step for this batch (ShapeDtypeStructs with their shardings) now."""
        key = self._key(abstract_batch)
        if key not in self._compiled:
            if self._compiled:
                logger.info("batch shapes %s: compiling the train step for them", [k[0] for k in key])
            self._compiled[key] = self._compile_for(abstract_batch)

    def __call__(self, state, batch, frozen):
        key = self._key(batch)
        if key not in self._compiled:  # a new shape (the common case, a known one, builds nothing per step)
            self.prepare(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch))
        return self._compiled[key](state, batch, frozen)


def _next_batch(iterator, step: int) -> PyTree:
    try:
        return next(iterator)
    except StopIteration:
        raise ConfigError(f"the data iterator ran out before step {step}: make the pipeline repeat "
                          "(e.g. grain's .repeat(None)) or lower train.num_steps") from None


def _trim_metrics(workdir: str, last_step: int) -> None:
    """Drops logged rows after `last_step` (steps redone after a resume would otherwise appear twice)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _run_callbacks(callbacks: Sequence[Callback], step: int, state: TrainState, writer: MetricWriter) -> None:
    for callback in callbacks:
        out = callback(step, state)
        if not out:
            continue
        scalars = {k: v for k, v in out.items() if np.ndim(v) == 0}
        images = {k: np.asarray(v) for k, v in out.items() if np.ndim(v) == 3}
        if scalars:
            writer.write_scalars(step, scalars)
        if images:
            writer.write_images(step, images)


def _place_pretrained(abstract_params: PyTree, pretrained: PyTree) -> PyTree:
    """Host arrays -> device arrays, each put straight into its parameter's sharding (checked against shapes)."""
    leaves, treedef = jax.tree.flatten(abstract_params)
    try:
        new = treedef.flatten_up_to(pretrained)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"pretrained parameters do not have the model's structure: {str(e)[:200]}") from None
    bad = [f"{np.shape(n)} vs {a.shape}" for a, n in zip(leaves, new) if tuple(np.shape(n)) != tuple(a.shape)]
    if bad:
        raise ConfigError(f"{len(bad)} pretrained parameter(s) have other shapes than the model's (first: {bad[0]})")
    placed = [jax.device_put(np.asarray(n, a.dtype), a.sharding) for a, n in zip(leaves, new)]
    return jax.tree.unflatten(treedef, placed)


def _state_from_pretrained(task: Task, tx, rng, pretrained: PyTree, abstract: TrainState, shardings, mesh,
                           rules) -> TrainState:
    """A fresh state around pretrained params: the model's random init is neither compiled nor run.

    The params enter the jitted state constructor as (donated) arguments, so they are never program
    constants; optimizer moments, EMA and the stage's extra state are built around them in their shardings.
    The keys are split as in ``_init_state`` (same step keys and extra init as a run from scratch).
    """
    params = _place_pretrained(abstract.params, pretrained)

    def build(params, rng):
        _, train_rng, extra_rng = jax.random.split(rng, 3)
        extra = task.init_extra(extra_rng) if task.init_extra is not None else None
        return nn.meta.unbox(create_state(params, tx, train_rng, extra))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(build, out_shardings=shardings, donate_argnums=0)(params, rng)


def _restore_or_init(ckpt: Checkpointer, task: Task, tx, rng, mesh, rules, iterator) -> tuple[TrainState, int]:
    """The newest good checkpoint (and data position), else a fresh state: `task.pretrained` or random init."""
    init_fn = functools.partial(_init_state, task, tx)
    abstract, shardings = shd.sharded_abstract(init_fn, mesh, rules, rng)
    restored = ckpt.restore_latest(abstract)
    if restored is None:
        if task.pretrained is None:
            return shd.create_sharded(init_fn, mesh, rules, rng, shardings=shardings)[0], 0
        logger.warning("fresh start from pretrained parameters")
        return _state_from_pretrained(task, tx, rng, task.pretrained, abstract, shardings, mesh, rules), 0
    step, state, data_state = restored
    iterator.set_state(data_state)
    _trim_metrics(os.path.dirname(ckpt.directory), int(step))
    logger.warning("resumed from checkpoint step %d in %s", step, ckpt.directory)
    return state, int(step)


def train(config, workdir: str, task: Task, callbacks: Sequence[Callback] = ()) -> TrainState:
    """Trains `task` for ``config.train.num_steps`` steps in `workdir` (resuming from its checkpoints)."""
    lc = LoopConfig.from_config(config)
    mesh = shd.make_mesh(config.mesh)
    rules = shd.logical_rules(config.mesh.get("rules"))
    step_cfg = StepConfig.from_config(config.train)
    shd.check_batch_size(task.batch_size, mesh, step_cfg.grad_accum)
    tx, schedule = make_optimizer(OptimizerConfig.from_config(config.optimizer), lc.num_steps)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=lc.keep, keep_every=lc.keep_every)
    writer = None
    try:
        iterator = task.make_iterator(jax.process_index(), jax.process_count())
        state, start = _restore_or_init(ckpt, task, tx, jax.random.PRNGKey(lc.seed), mesh, rules, iterator)
        if start >= lc.num_steps:
            logger.warning("workdir %s is already at step %d >= train.num_steps=%d: nothing to do", workdir, start,
                           lc.num_steps)
            return state
        frozen = shd.place(task.frozen, mesh, rules)
        first = _next_batch(iterator, start + 1)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        step_fn = _StepPerShape(functools.partial(compile_train_step, make_train_step(task, tx, schedule, step_cfg),
                                                  abstract_state, shardings, frozen=frozen, mesh=mesh, rules=rules))
        step_fn.prepare(_global_abstract(first, mesh))  # before the first step: compile errors come first
        writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
        loop = _Loop(lc, ckpt, writer, portable_config(_config_json(config), workdir), task.batch_size)
        return loop.run(step_fn, state, first, iterator, frozen, mesh, start, callbacks)
    finally:
        ckpt.close()
        if writer is not None:
            writer.close()


@dataclasses.dataclass
class _Loop:
    lc: LoopConfig
    ckpt: Checkpointer
    writer: MetricWriter
    config_json: dict
    batch_size: int

    def run(self, step_fn, state, first, iterator, frozen, mesh, start, callbacks) -> TrainState:
        lc, meter = self.lc, _Meter(self.lc.on_nonfinite, self.ckpt)
        bar = tqdm.tqdm(total=lc.num_steps, initial=start, desc="train", disable=jax.process_index() != 0,
                        dynamic_ncols=True, mininterval=1.0)
        clock, last_logged = time.perf_counter(), start
        try:
            with StopSignal() as stop:
                for step in range(start + 1, lc.num_steps + 1):
                    local = first if step == start + 1 else _next_batch(iterator, step)
                    state, metrics = step_fn(state, shd.global_batch(local, mesh), frozen)
                    meter.push(step, metrics)
                    bar.update(1)
                    final = step == lc.num_steps
                    if final or (lc.log_every_steps > 0 and step % lc.log_every_steps == 0):
                        meter.flush()
                        clock, last_logged = self._log(meter, step, clock, last_logged, bar), step
                    stopping = stop.requested() or step == lc.stop_at_step
                    if final or stopping or (lc.checkpoint_every > 0 and step % lc.checkpoint_every == 0):
                        meter.flush()
                        self._save(step, state, iterator)
                    self.ckpt.check_for_errors()  # a failed asynchronous save stops the run at once
                    # after the save: a failing callback (grid, metric) never costs this step's checkpoint
                    _run_callbacks(callbacks, step, state, self.writer)
                    if stopping:
                        logger.warning("stopped %s after step %d; checkpoint saved",
                                       "by signal" if stop.signum is not None else "at train.stop_at_step", step)
                        break
                meter.flush()
        finally:
            bar.close()
        return state

    def _save(self, step: int, state, iterator) -> None:
        if self.ckpt.save(step, state, iterator.get_state(), self.config_json):
            return
        if step not in self.ckpt.all_steps():  # refused: parameters that are not finite
            raise NonFiniteError(f"the parameters are not finite at step {step}, so no checkpoint was written; "
                                 f"the newest good checkpoint is step {self.ckpt.latest_step()}; lower "
                                 "optimizer.lr (or raise optimizer.warmup_steps) and rerun to resume from it")

    def _log(self, meter: _Meter, step: int, clock: float, last_logged: int, bar) -> float:
        now = time.perf_counter()
        steps = max(step - last_logged, 1)
        scalars = meter.summary()
        scalars.update(step_time_s=(now - clock) / steps, images_per_s=self.batch_size * steps / max(now - clock, 1e-9))
        self.writer.write_scalars(step, scalars)
        if "loss" in scalars:
            bar.set_postfix(loss=f"{scalars['loss']:.4g}", refresh=False)
        return now
