"""FLOPs of one training step (forward + backward + AdamW update, batch 32, latent-cache batches) of the
backbone study's configurations, from XLA's cost analysis of the lowered program (`ldm_jax.training.plan`).

    python experiments/backbones/flops.py [--json experiments/backbones/flops.json] [name=dotted.key=value,... ...]

With no arguments it prints the study's three networks; extra arguments try other sizes, e.g.
``dit:model.dit.hidden_size=192,model.dit.depth=6``.
"""

import argparse
import json
import os
import sys

import jax

from ldm_jax.configlib import load_config
from ldm_jax.training import plan
from ldm_jax.training import sharding as shd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from configs.backbone_study import BACKBONES  # noqa: E402  (the study's sizes: one place)

CONTEXT = (16, 384)  # MiniLM-L6 states of 16 tokens, as the shapes configs use


def step_flops(overrides: dict) -> dict:
    config = load_config(os.path.join(ROOT, "configs", "shapes_ldm.py"))
    config.model.vae.workdir = ""  # plan with the shapes autoencoder's preset config (f = 4, 8 latent channels)
    config.model.vae.update(load_config(os.path.join(ROOT, "configs", "shapes_autoencoder.py")).model.vae)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    setup = plan.make_setup(config, context=CONTEXT)
    one = shd.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    batch = int(config.data.batch_size)
    # per example from the batch-1 program (a cost analysis counts a loop body once, and XLA:CPU's attention
    # loops over the batch), plus the optimizer update
    per_example = plan.flops_of(plan.lower_step(setup, one, 1, grads_only=True))
    update = plan.flops_of(plan.lower_step(setup, one, 1)) - per_example
    params = plan.state_bytes(setup, plan.abstract_mesh(1, 1))["param_count"]
    return {"flops_per_step": batch * per_example + update, "flops_per_example": per_example, "batch": batch,
            "params": params}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="")
    parser.add_argument("variants", nargs="*")
    args = parser.parse_args()
    todo = {name: dict(overrides) for name, overrides in BACKBONES.items()}
    for spec in args.variants:
        name, _, rest = spec.partition(":")
        base = dict(BACKBONES[name]) if name in BACKBONES else {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            base[key] = json.loads(value) if value[:1] in "0123456789[-tfn" else value
        todo[spec] = base
    rows = {}
    for name, overrides in todo.items():
        rows[name] = {**step_flops(overrides), "overrides": overrides}
        r = rows[name]
        print(f"{name:40s} {r['flops_per_step'] / 1e9:8.2f} GFLOP/step  {r['params'] / 1e6:6.2f} M params", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
