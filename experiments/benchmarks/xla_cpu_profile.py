"""Where XLA:CPU spends the benchmark U-Net's training step: per-op time from a JAX profiler trace, grouped by op
kind, next to PyTorch's autograd profiler on the same U-Net (diffusers, same weights), and the step time under
XLA compile-option variants.

    python experiments/benchmarks/xla_cpu_profile.py        # -> experiments/benchmarks/xla_cpu_profile.json
    python experiments/benchmarks/xla_cpu_profile.py --batch=64 --variants=jit,no_ynn

Variants are unet_cpu.py's (`jit` = XLA's defaults; xla_cpu_profile.json was recorded when it was called
`default`). XLA:CPU's trace has one event per executed thunk (fusion, dot, convolution, custom call); events
are grouped by their name without its numeric suffix, and the largest groups split by the ops' result shapes
(`by_kind_shape_ms`: [ms per step, number of ops]).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import unet_cpu  # noqa: E402  (sets LDM_JAX_XLA_CPU_DEFAULTS=0 before ldm_jax is imported)
from bench_log import hlo_shapes, jax_profile  # noqa: E402
from unet_cpu import VARIANTS, jax_cases, jax_model, race, torch_fns, torch_model  # noqa: E402


def jax_step(batch: int, variant: str):
    """(zero-arg blocking training step, compile seconds, (config, params)) for one unet_cpu variant."""
    from ldm_jax import diffusion

    cfg, unet, params = jax_model()
    sizes = argparse.Namespace(train_batches=(batch,), forward_batches=(), sample_batches=(), steps=1)
    step, info = jax_cases(unet, params, diffusion.get_schedule("scaled_linear"), variant, sizes)[("train", batch)]
    return step, info["compile_s"], (cfg, params)


def torch_profile(cfg, params, batch: int, iters: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model = torch_model(cfg, params)
    step = torch_fns(model, torch)["train"](batch)
    timing = race({"torch": step}, 1, iters)["torch"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
    rows = sorted(prof.key_averages(), key=lambda r: -r.self_cpu_time_total)
    top = {r.key: round(r.self_cpu_time_total / 1000.0 / iters, 2) for r in rows[:40]}
    return {"step": timing, "top_self_ms": top}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--variants", default="jit,no_ynn,onednn,concurrency_sched")
    p.add_argument("--no_torch", action="store_true")
    p.add_argument("--no_profile", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "xla_cpu_profile.json"))
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    threads = len(os.sched_getaffinity(0))
    res = {"batch": args.batch, "unet": unet_cpu.BENCH_UNET, "variants": {}, "date": time.strftime("%Y-%m-%d"),
           "argv": sys.argv}
    model = None
    for name in args.variants.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] variant {name}", flush=True)
        try:
            step, compile_s, model = jax_step(args.batch, name)
        except Exception as e:  # an option this jaxlib rejects is a result
            res["variants"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(res["variants"][name], flush=True)
            continue
        rec = {"options": VARIANTS[name][0], "compile_s": compile_s, **race({name: step}, 1, args.iters)[name]}
        if not args.no_profile:
            rec["profile"] = jax_profile(step, 3, hlo_shapes(step.compiled.as_text()))
        res["variants"][name] = rec
        print(json.dumps({k: v for k, v in rec.items() if k != "profile"}), flush=True)
        _write(args.out, res)
    if not args.no_torch and model is not None:
        print(f"[{time.strftime('%H:%M:%S')}] torch eager", flush=True)
        res["torch_eager"] = torch_profile(*model, args.batch, args.iters, threads)
        print(json.dumps(res["torch_eager"]["step"]), flush=True)
    _write(args.out, res)
    print(f"wrote {args.out}")


def _write(path: str, res: dict):
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
