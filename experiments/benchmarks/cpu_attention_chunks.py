"""How large a batch chunk the CPU attention should take: the benchmark U-Net (unet_cpu.py, ldm_jax's XLA
defaults) compiled once per score budget of `ldm_jax.models.attention.CPU_SCORE_BYTES`, then raced call by
call (training step, forward, guided DDIM loop).

    .venv/bin/python experiments/benchmarks/cpu_attention_chunks.py --budgets_mib=2,4,0 --train=16,64 --sample=16,64

A budget of 0 means no chunking (one score tensor for the whole batch). Writes cpu_attention_chunks.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import types

os.environ["LDM_JAX_XLA_CPU_DEFAULTS"] = "0"  # unet_cpu's convention: the no_ynn variant applies ldm_jax's
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import unet_cpu  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets_mib", default="2,4,0")
    p.add_argument("--train", default="16,64", help="training-step batches")
    p.add_argument("--forward", default="", help="forward batches")
    p.add_argument("--sample", default="16,64", help="guided DDIM loop batches")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the sampling loop")
    p.add_argument("--iters", type=int, default=9)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "cpu_attention_chunks.json"))
    a = p.parse_args(argv)
    import ldm_jax.models.attention as attention
    from ldm_jax import diffusion

    _, unet, params = unet_cpu.jax_model()
    schedule = diffusion.get_schedule("scaled_linear")
    cases = types.SimpleNamespace(train_batches=_ints(a.train), forward_batches=_ints(a.forward),
                                  sample_batches=_ints(a.sample), steps=a.steps)
    sets, compile_s = {}, {}
    for mib in _ints(a.budgets_mib):
        name = f"{mib} MiB" if mib else "whole batch"
        attention.CPU_SCORE_BYTES = (mib << 20) if mib else 1 << 60
        sets[name] = unet_cpu.jax_cases(unet, params, schedule, "no_ynn", cases)
        compile_s[name] = {f"{c}/{b}": round(v[1]["compile_s"], 1) for (c, b), v in sets[name].items()}
        print(name, "compiled", compile_s[name], flush=True)
    rows = []
    for case in next(iter(sets.values())):
        iters = a.iters if case[0] != "sample" else max(3, a.iters // 3)
        res = unet_cpu.race({n: s[case][0] for n, s in sets.items()}, 1, iters)
        for name, stats in res.items():
            rows.append({"case": case[0], "batch": case[1], "budget": name, **stats})
            print(case, name, f"{stats['median_s']:.4f} s ({stats['min_s']:.3f}-{stats['max_s']:.3f})", flush=True)
    with open(a.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "argv": sys.argv[1:], "sample_steps": a.steps,
                   "compile_s": compile_s, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
