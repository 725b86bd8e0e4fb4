"""Ablation sweeps: a base config x a product/zip spec over config fields -> runs -> results -> report.

    runs = expand(config)                       # one (name, overrides, config) per grid point
    run_sweep(config, workdir, train_fn, eval_fn)   # sequential or one run per host; resumable
    render_report(workdir)                      # workdir/report.md + plots from results.jsonl
"""

from ldm_jax.sweeps.report import render_report
from ldm_jax.sweeps.runner import run_sweep
from ldm_jax.sweeps.spec import Run, expand

__all__ = ["Run", "expand", "render_report", "run_sweep"]
