"""Runs a sweep: trains every run (each resumable), evaluates it at several samplers x NFEs, and appends
one JSON row per finished run to ``results.jsonl``. Rerunning the same command skips finished runs and
resumes an interrupted one from its checkpoints. With ``num_hosts > 1`` host i takes runs i, i+n, ...
and writes ``results.host<i>.jsonl``; the report merges them.

``reuse_from`` points at another sweep's directory: a run that sweep already trained with the same training
config (the same overrides, and the saved config equal up to paths and evaluation settings) is evaluated
from there instead of being trained again, e.g. a sampler study on the checkpoints of a schedule study. The
other sweep's directory is only read.

``reevaluate`` evaluates the finished runs again (e.g. after a metric was added) and rewrites their rows in
place; it trains nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from absl import logging

from ldm_jax.configlib import with_added_keys
from ldm_jax.sweeps.spec import Run, expand

TrainFn = Callable[..., object]          # train_fn(config, workdir)
EvalFn = Callable[..., dict]             # eval_fn(config, workdir, *, sampler, num_steps) -> {metric: value}


def results_files(workdir: str) -> list[str]:
    names = sorted(n for n in os.listdir(workdir) if n.startswith("results") and n.endswith(".jsonl"))
    return [os.path.join(workdir, n) for n in names]


def read_results(workdir: str) -> list[dict]:
    if not os.path.isdir(workdir):
        return []
    rows = []
    for path in results_files(workdir):
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def _final_loss(run_dir: str) -> float | None:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    return losses[-1] if losses else None


def eval_points(eval_spec) -> list[tuple[str, int]]:
    """(sampler, NFE) pairs of ``sweep.eval``: samplers x nfes, then the ``extra`` pairs (e.g. ddim at 100)."""
    samplers = tuple(eval_spec.get("samplers", ("ddim",)))
    nfes = tuple(eval_spec.get("nfes", (20,)))
    points = [(str(s), int(n)) for s in samplers for n in nfes]
    for pair in eval_spec.get("extra", ()) or ():
        if len(pair) != 2:
            raise ValueError(f"sweep.eval.extra entries are (sampler, nfe) pairs, got {pair!r}")
        if (str(pair[0]), int(pair[1])) not in points:
            points.append((str(pair[0]), int(pair[1])))
    return points


# config fields that do not change what a run trains: paths (each sweep has its own) and evaluation settings
_NOT_TRAINING = ("sweep", "eval", "sample", "checkpoint", "logging", "data.data_dir", "data.latent_cache",
                 "model.vae.workdir", "_origin")


def _training_view(config: dict) -> dict:
    view = json.loads(json.dumps(config))
    for dotted in _NOT_TRAINING:
        *parents, leaf = dotted.split(".")
        node = view
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return view


def _differences(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def config_differences(config: dict, saved: dict) -> list[str]:
    """Dotted keys where two config dicts train different things (paths and evaluation settings ignored)."""
    return _differences(_training_view(config), _training_view(saved))


def trained_differently(config, workdir: str) -> str | None:
    """Why the finished training in `workdir` cannot stand in for one with `config` (None when it can): its
    newest checkpoint must have reached ``config.train.num_steps`` and its saved config must train the same."""
    from ldm_jax.ldm.workdirs import read_config

    last = int(config.train.num_steps)
    try:
        saved = read_config(workdir)
    except FileNotFoundError:
        return f"no checkpoint in {workdir}"
    step = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    if step < last:
        return f"its checkpoint in {workdir} stopped at step {step} of {last}"
    diff = config_differences(json.loads(config.to_json_best_effort()), with_added_keys(saved))
    return f"{workdir} was trained with different {', '.join(diff[:5])}" if diff else None


def _evaluate(run: Run, run_dir: str, eval_fn: EvalFn, points) -> tuple[list[dict], float]:
    """(one row entry per (sampler, NFE) point, minutes taken)."""
    t0, evals = time.time(), []
    for sampler, nfe in points:
        metrics = eval_fn(run.config, run_dir, sampler=sampler, num_steps=int(nfe))
        evals.append({"sampler": sampler, "nfe": int(nfe), **{k: float(v) for k, v in metrics.items()}})
    return evals, (time.time() - t0) / 60


def _overrides_key(overrides) -> str:
    return json.dumps(sorted(json.loads(json.dumps(dict(overrides))).items()))


def _run_one(run: Run, run_dir: str, train_fn: TrainFn, eval_fn: EvalFn, points, reused: dict | None) -> dict:
    t0 = time.time()
    if reused is None:
        train_fn(run.config, run_dir)
        train_minutes = (time.time() - t0) / 60
    else:  # trained by another sweep: evaluated from its directory, its training time recorded
        run_dir, train_minutes = reused["workdir"], reused.get("train_minutes")
    evals, eval_minutes = _evaluate(run, run_dir, eval_fn, points)
    row = {"run": run.name, "overrides": {k: v for k, v in run.overrides}, "workdir": run_dir,
           "train_minutes": train_minutes, "eval_minutes": eval_minutes,
           "final_loss": _final_loss(run_dir), "evals": evals}
    return row if reused is None else {**row, "reused_from": reused["workdir"]}


def run_sweep(config, workdir: str, *, train_fn: TrainFn, eval_fn: EvalFn, host_index: int = 0,
              num_hosts: int = 1, reuse_from: str | None = None) -> list[dict]:
    """Trains and evaluates every run of ``config.sweep`` this host owns; returns all finished rows. Runs
    that the sweep in ``reuse_from`` trained identically are evaluated from there (see the module doc)."""
    runs = expand(config)
    if reuse_from and not read_results(reuse_from):
        raise ValueError(f"--reuse_from={reuse_from} has no results*.jsonl: point it at a sweep directory with "
                         "finished runs")
    others = {}
    for row in read_results(reuse_from) if reuse_from else ():
        # the row's workdir may be relative to wherever that sweep ran: locate the run inside reuse_from
        others[_overrides_key(row["overrides"])] = {
            **row, "workdir": os.path.join(reuse_from, "runs", os.path.basename(os.path.normpath(row["workdir"])))}
    os.makedirs(workdir, exist_ok=True)
    done = {row["run"] for row in read_results(workdir)}
    eval_spec = config.sweep.get("eval", {})
    points = eval_points(eval_spec)
    out_name = "results.jsonl" if num_hosts == 1 else f"results.host{host_index}.jsonl"
    mine = [r for i, r in enumerate(runs) if i % num_hosts == host_index]
    for k, run in enumerate(mine):
        if run.name in done:
            logging.info("sweep: %s already finished, skipping", run.name)
            continue
        reused = others.get(_overrides_key(run.overrides))
        if reused is not None and (why := trained_differently(run.config, reused["workdir"])):
            logging.warning("sweep: not reusing %s from %s: %s; training it here", run.name, reuse_from, why)
            reused = None
        logging.info("sweep: run %d/%d %s%s", k + 1, len(mine), run.name,
                     f" (trained in {reused['workdir']})" if reused else "")
        row = _run_one(run, os.path.join(workdir, "runs", run.name), train_fn, eval_fn, points, reused)
        with open(os.path.join(workdir, out_name), "a") as f:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump({"runs": [r.name for r in runs], "evals": points}, f, indent=1)
    return read_results(workdir)


def reevaluate(config, workdir: str, *, eval_fn: EvalFn) -> list[dict]:
    """Evaluates every finished run of ``config.sweep`` in `workdir` again at the sweep's points and replaces
    the evaluations in its row (training fields kept). Rows of runs the spec no longer has are left alone."""
    runs = {r.name: r for r in expand(config)}
    points = eval_points(config.sweep.get("eval", {}))
    for path in results_files(workdir):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        fresh = {}
        for row in rows:
            run = runs.get(row["run"])
            if run is None:
                continue
            run_dir = row["workdir"] if os.path.isdir(row["workdir"]) else os.path.join(workdir, "runs", run.name)
            logging.info("sweep: evaluating %s again", run.name)
            evals, minutes = _evaluate(run, run_dir, eval_fn, points)
            fresh[row["run"]] = {**row, "evals": evals, "eval_minutes": minutes}
        # read again before replacing: another host may have appended a row meanwhile
        with open(path) as f:
            current = [json.loads(line) for line in f if line.strip()]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(fresh.get(r["run"], r)) + "\n" for r in current)
        os.replace(path + ".tmp", path)
    return read_results(workdir)
