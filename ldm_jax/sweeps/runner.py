"""Runs a sweep: trains every run (each resumable), evaluates it at several samplers x NFEs, and appends
one JSON row per finished run to ``results.jsonl``. Rerunning the same command skips finished runs and
resumes an interrupted one from its checkpoints. With ``num_hosts > 1`` host i takes runs i, i+n, ...
and writes ``results.host<i>.jsonl``; the report merges them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from absl import logging

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


def _run_one(run: Run, run_dir: str, train_fn: TrainFn, eval_fn: EvalFn, points) -> dict:
    t0 = time.time()
    train_fn(run.config, run_dir)
    train_minutes = (time.time() - t0) / 60
    t1, evals = time.time(), []
    for sampler, nfe in points:
        metrics = eval_fn(run.config, run_dir, sampler=sampler, num_steps=int(nfe))
        evals.append({"sampler": sampler, "nfe": int(nfe), **{k: float(v) for k, v in metrics.items()}})
    return {"run": run.name, "overrides": {k: v for k, v in run.overrides}, "workdir": run_dir,
            "train_minutes": train_minutes, "eval_minutes": (time.time() - t1) / 60,
            "final_loss": _final_loss(run_dir), "evals": evals}


def run_sweep(config, workdir: str, *, train_fn: TrainFn, eval_fn: EvalFn, host_index: int = 0,
              num_hosts: int = 1) -> list[dict]:
    """Trains and evaluates every run of ``config.sweep`` this host owns; returns all finished rows."""
    runs = expand(config)
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
        logging.info("sweep: run %d/%d %s", k + 1, len(mine), run.name)
        row = _run_one(run, os.path.join(workdir, "runs", run.name), train_fn, eval_fn, points)
        with open(os.path.join(workdir, out_name), "a") as f:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump({"runs": [r.name for r in runs], "evals": points}, f, indent=1)
    return read_results(workdir)
