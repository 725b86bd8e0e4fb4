"""The memory/FLOP planner (`ldm_jax.training.plan`, `ldm-jax plan`) against XLA's analyses of the real program, and
the README's planning table for SD-1.5's and SDXL's U-Nets, a text DiT-XL/2 and SD3-medium's MMDiT.

    .venv/bin/python experiments/benchmarks/plan_check.py check     # benchmark U-Net on 8 host CPU devices
    .venv/bin/python experiments/benchmarks/plan_check.py table     # SD-1.5 / SDXL calibrations (CPU, ~15 min)
    .venv/bin/python experiments/benchmarks/plan_check.py table --reuse_calibration   # re-plan from the saved ones
    .venv/bin/python experiments/benchmarks/plan_check.py markdown  # the README table from plan_check.json

`check` plans the benchmark U-Net of `unet_cpu.py` (5.3M parameters, 16x16x4 latents, 77 x 768 context, float32)
at global batch 64 on 8 devices for three meshes, twice: calibrated on the mesh itself and calibrated on one
device (the way 64..1024 devices are planned), and compares both with the compiled real step's memory analysis
and the lowered real step's FLOPs. `table` calibrates SD-1.5's and SDXL's U-Nets (bf16 compute, with and without
remat) on one CPU device and writes their per-chip plans; `markdown` prints the table. Results: plan_check.json
(each part replaces its own key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before JAX starts

import jax  # noqa: E402
from bench_log import emit, phase  # noqa: E402

from ldm_jax.configlib import base_config  # noqa: E402
from ldm_jax.training import plan as pl  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_check.json")
# unet_cpu.py's BENCH_UNET (not imported: that module changes XLA's CPU defaults at import)
BENCH_UNET = dict(block_out_channels=(32, 64, 128), layers_per_block=2, attention_levels=(True, True, False),
                  head_dim=32, sample_size=16, zero_init=False)
# SDXL-base's U-Net (2,567,463,684 parameters, the text_time embedding of the pooled bigG text and 6 time ids
# included: the planner feeds them as the stage does)
SDXL_UNET = dict(preset="sdxl")
MESHES = ((8, 1, 8), (64, 1, 64), (256, 4, 64), (256, 1, 256), (1024, 16, 64), (1024, 1, 1024))  # chips, data, fsdp
HBM = {"H100-80G": 80.0, "TPU v5p": 95.0}
# the H100 measurement of experiments/benchmarks/gpu_jax_train.json (SD-1.5, 64x64 latents, bf16, cuDNN attention,
# no remat): XLA's static memory 25.80 GiB at batch 16 and 40.51 GiB at batch 32
H100_SD15 = {16: 25.798603013157845, 32: 40.51228637993336}


def ldm_config(unet: dict, resolution: int, dtype: str = "float32", backbone: str = "unet",
               latent_channels: int = 4):
    c = base_config()
    c.train.stage = "ldm"
    c.train.dtype = dtype
    c.data.resolution = resolution
    c.model.vae.preset = "sd"  # f = 8, 4 latent channels (SD3: 16)
    c.model.vae.latent_channels = latent_channels
    c.model.backbone = backbone
    c.model.unet.preset = "sd15"
    for k, v in unet.items():
        c.model[backbone][k] = v
    return c


# DiT-XL/2 (28 blocks of 1152, 16 heads, patch 2) made text-to-image as our DiT does it: cross-attention straight to
# 120 T5-XXL states (4096 wide) in every block and the pooled-text term; 1.02B parameters (PixArt-alpha, the same
# trunk, first projects the T5 states to 1152 and has 0.61B); 512 px (64x64x4 latents)
XL2_TEXT_DIT = dict(preset="xl_2", num_classes=None, out_channels=4, sample_size=64)
# SD3-medium's MMDiT (2,028,328,000 parameters in diffusers) at 1024 px (128x128x16 latents), text = 77 CLIP + 256
# T5 states of 4096; its pooled input is the mean of the context here (pooled_projection_dim 4096, not 2048:
# +3.1M parameters)
SD3_MMDIT = dict(preset="sd3_medium")


def check(args) -> dict:
    config = ldm_config(BENCH_UNET, 16 * 8)
    rows = []
    for mesh in ({"data": 1, "fsdp": 8}, {"data": 8, "fsdp": 1}, {"data": 2, "fsdp": 4}):
        phase(f"mesh {mesh}: calibration on the mesh + the real step")
        start = time.perf_counter()
        on_mesh = pl.plan(config, devices=8, mesh=mesh, batch_size=args.batch, context=(77, 768), measure=True,
                          compare_remat=False)
        phase(f"mesh {mesh}: calibration on one device")
        one = pl.plan(config, devices=8, mesh=mesh, batch_size=args.batch, context=(77, 768), measure=False,
                      compare_remat=False, calibration_devices=1)
        real = on_mesh["measured"]
        rec = {"mesh": mesh, "global_batch": args.batch, "params": on_mesh["param_count"],
               "compiled_total_mib": real["total"] / 2**20, "compiled_temp_mib": real["temp"] / 2**20,
               "compiled_argument_mib": real["argument"] / 2**20,
               "planned_total_mib_calibrated_on_mesh": on_mesh["memory"]["total"] / 2**20,
               "planned_total_mib_calibrated_on_1_device": one["memory"]["total"] / 2**20,
               "ratio_on_mesh": on_mesh["memory"]["total"] / real["total"],
               "ratio_1_device": one["memory"]["total"] / real["total"],
               "flops_global_lowered": real["flops_global"], "flops_global_planned": on_mesh["flops"]["global"],
               "flops_per_device_compiled": real["flops_per_device"],
               "flops_per_device_planned": on_mesh["flops"]["per_device"],
               "flops_per_device_planned_1_device": one["flops"]["per_device"],
               "memory_planned_on_mesh": on_mesh["memory"], "memory_planned_1_device": one["memory"],
               "calibration_on_mesh": on_mesh["variants"]["no_remat"]["calibration"],
               "calibration_1_device": one["variants"]["no_remat"]["calibration"],
               "compile_real_s": real["compile_s"], "wall_s": round(time.perf_counter() - start, 1)}
        emit(rec)
        rows.append(rec)
    return {"rows": rows, "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d")}


def _models():
    return {"SD-1.5": (ldm_config({}, 512, "bfloat16"), (77, 768), 16),
            "SDXL": (ldm_config(SDXL_UNET, 1024, "bfloat16"), (77, 2048, 1280), 4),
            "DiT-XL/2 + text": (ldm_config(XL2_TEXT_DIT, 512, "bfloat16", "dit"), (120, 4096), 16),
            "SD3-medium MMDiT": (ldm_config(SD3_MMDIT, 1024, "bfloat16", "mmdit", 16), (333, 4096), 4)}


def table(args) -> dict:
    """Per model: one-device CPU calibrations (no remat / remat), then the modelled plans on 8..1024 chips."""
    out = {"models": {}, "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__}
    previous = args.previous.get("table", {}).get("models", {}) if args.reuse_calibration else {}
    models = _models()
    only = [m for m in args.models.split(",") if m] if args.models else list(models)
    if args.models:  # keep the other models' rows of the previous table
        out["models"].update({k: v for k, v in args.previous.get("table", {}).get("models", {}).items()
                              if k not in only})
    for name, (config, context, per_chip) in ((k, models[k]) for k in only):
        cals = dict(previous.get(name, {}).get("calibration", {}))
        for remat in () if cals else (False, True):
            phase(f"{name}: calibration remat={remat}")
            setup = pl.make_setup(pl._override(config, **{"train.remat": remat}), context=context)
            cals["remat" if remat else "no_remat"] = pl.calibrate(setup, (2, 4))
            emit({"model": name, "remat": remat, **cals["remat" if remat else "no_remat"]})
        setup = pl.make_setup(config, context=context)
        rows = []
        for chips, data, fsdp in MESHES:
            sb = pl.state_bytes(setup, pl.abstract_mesh(data, fsdp))
            row = {"chips": chips, "mesh": {"data": data, "fsdp": fsdp}, "per_chip_batch": per_chip,
                   "state_bytes": sb}
            for variant, cal in cals.items():
                row[variant] = {
                    "memory": pl.memory_model(sb, cal, per_chip, 1),
                    "flops": pl.flops_model(cal, per_chip, per_chip * chips, fsdp),
                    "largest_batch": {hw: pl.largest_batch(sb, cal, gib * pl.GIB, 1) for hw, gib in HBM.items()}}
            rows.append(row)
        out["models"][name] = {"param_count": sb["param_count"], "context": list(context), "calibration": cals,
                               "rows": rows}
        if name == "SD-1.5":  # the one accelerator measurement: one H100, the benchmark's step (AdamW, no EMA)
            one = pl.state_bytes(setup, pl.abstract_mesh(1, 1))
            out["sd15_one_h100"] = [
                {"batch": b, "measured_gib": H100_SD15[b],
                 "planned_cpu_calibrated_gib": (pl.memory_model(one, cals["no_remat"], b, 1)["total"]
                                                - one["ema"]) / pl.GIB} for b in sorted(H100_SD15)]
            emit({"sd15_one_h100": out["sd15_one_h100"]})
    return out


def _gib(x: float) -> str:
    return f"{x / pl.GIB:.1f}"


def markdown(res: dict) -> str:
    lines = ["| model, batch per chip | chips | data x fsdp | params + grads + Adam + EMA per chip (GiB) | "
             "activations per example: XLA:CPU / jax residuals, no remat (GiB) | same with remat (GiB) | total per "
             "chip at that batch (GiB) | largest batch per chip: H100-80G / TPU v5p-95G | TFLOP per chip per step |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in res["table"]["models"].items():
        cal = m["calibration"]
        acts = [f"{_gib(c['activation_bytes_per_example'])} / {_gib(c['residual_bytes_per_example'])}"
                for c in (cal["no_remat"], cal["remat"])]
        for r in m["rows"]:
            a = r["no_remat"]
            mem = a["memory"]
            state = mem["params"] + mem["gradients"] + mem["optimizer"] + mem["ema"]
            lines.append(
                f"| {name}, {r['per_chip_batch']} | {r['chips']} | {r['mesh']['data']} x {r['mesh']['fsdp']} | "
                f"{_gib(state)} | {acts[0]} | {acts[1]} | {_gib(mem['total'])} | "
                f"{a['largest_batch']['H100-80G']} / {a['largest_batch']['TPU v5p']} | "
                f"{a['flops']['per_device'] / 1e12:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("check", "table", "markdown"))
    p.add_argument("--batch", type=int, default=64, help="check: global batch")
    p.add_argument("--out", default=OUT)
    p.add_argument("--reuse_calibration", action="store_true", help="table: the calibrations already in --out")
    p.add_argument("--models", default="", help="table: only these models (comma-separated names of _models)")
    args = p.parse_args(argv)
    res = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            res = json.load(f)
    args.previous = res
    if args.part == "markdown":
        print(markdown(res))
        return
    if args.part == "check" and len(jax.devices()) < 8:
        sys.exit("check needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    start = time.perf_counter()
    res[args.part] = {"check": check, "table": table}[args.part](args)
    res[args.part]["wall_s"] = round(time.perf_counter() - start, 1)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    phase(f"wrote {args.out}")


if __name__ == "__main__":
    main()
