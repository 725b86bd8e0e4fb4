"""ldm-jax plan --config=configs/X.py[:variant] --devices=N [--mesh=data=2,fsdp=4] [--batch_size=B] [--hbm_gib=80]

Plans one training step of the config on N devices without training: per device, the bytes of parameters,
gradients, AdamW state, EMA, batch and activations (with and without remat), the total, the FLOPs of a step and
the largest batch that fits --hbm_gib. State bytes are exact (the shards of the sharded state on the mesh);
activations and FLOPs per example come from the step's loss-and-gradient program compiled at two small batches
on this machine's devices; with N devices present (host CPU devices are forced for N <= 8) the real sharded step
is compiled too and XLA's own analysis is printed beside the model. Run it on one chip of the accelerator you
plan for: activation figures are those of this platform's compiler. --json prints the whole result.
"""

from __future__ import annotations

import json
import os
import re

from absl import flags
from ml_collections import config_flags

from ldm_jax.commands._app import fail, start

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/shapes_ldm.py:tiny",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 1, "Number of devices (chips) to plan for.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh axis sizes, e.g. data=2,fsdp=4 or fsdp=8 (default: config.mesh.fsdp, "
                                          "data over the remaining devices; -1 = the remaining devices).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch size (default: config.data.batch_size).")
_HBM = flags.DEFINE_float("hbm_gib", 80.0, "Device memory in GiB for the largest batch that fits.")
_REMAT = flags.DEFINE_boolean("remat", None, "Plan the totals with remat on / off (default: config.train.remat); "
                                             "activations are given for both.")
_COMPARE = flags.DEFINE_boolean("compare_remat", True, "Also plan the other remat setting (two more compiles).")
_CONTEXT = flags.DEFINE_string("context", None, "Text-state shape TOKENSxWIDTH (e.g. 77x768) instead of the text "
                                                "encoder's (which a CLIP encoder reads from its folder).")
_MEASURE = flags.DEFINE_boolean("measure", None, "Also compile the real sharded step and print XLA's analysis "
                                                 "(default: when this machine has the devices; host CPU devices "
                                                 "are forced for --devices <= 8).")
_CALIBRATION_DEVICES = flags.DEFINE_integer("calibration_devices", None, "Calibrate on at most this many devices "
                                                                         "(default: as many as the mesh and "
                                                                         "this machine have).")
_JSON = flags.DEFINE_boolean("json", False, "Print the full result as JSON.")
MAX_FORCED_HOST_DEVICES = 8


def parse_mesh(text: str | None) -> dict | None:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; None -> None."""
    if text is None:
        return None
    out = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", part)
        if not m:
            fail(f"--mesh={text}: write axis=size pairs separated by commas, e.g. data=2,fsdp=4")
        out[m.group(1)] = int(m.group(2))
    return out


def parse_context(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or not all(int(g) > 0 for g in m.groups()):
        fail(f"--context={text}: write TOKENSxWIDTH with positive integers, e.g. 77x768")
    return int(m.group(1)), int(m.group(2))


def force_host_devices(n: int) -> None:
    """Asks XLA:CPU for `n` host devices; effective only before JAX starts its CPU backend (as in this command)."""
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in current:
        os.environ["XLA_FLAGS"] = f"{current} --xla_force_host_platform_device_count={n}".strip()


def size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


MEMORY_ROWS = (("params", "parameters (float32)", "exact"), ("gradients", "gradients", "exact"),
               ("optimizer", "optimizer (AdamW moments)", "exact"), ("ema", "EMA parameters", "exact"),
               ("extra", "stage state (extra)", "exact"), ("frozen", "frozen arrays", "exact"),
               ("batch", "batch", "exact"), ("activations", "activations", "calibrated"),
               ("full_gradients", "whole gradient before reduce-scatter", "modelled"),
               ("grad_accumulator", "gradient accumulator", "modelled"),
               ("update_temporaries", "update temporaries (4 x gradients)", "modelled"),
               ("temp", "temporaries = max(update, backward)", "modelled"), ("total", "total", "modelled"))


def render(res: dict) -> str:
    """The plan as a readable table (per device)."""
    variants = res["variants"]
    names = [n for n in ("no_remat", "remat") if n in variants]
    cal = variants["remat" if res["remat"] else "no_remat"]["calibration"]
    mesh = res["mesh"]
    lines = [f"{res['stage']} stage, {res['param_count']:,} parameters, {res['dtype']} compute, remat "
             f"{'on' if res['remat'] else 'off'} (totals); mesh data={mesh['data']} x fsdp={mesh['fsdp']} "
             f"({res['devices']} devices), global batch {res['global_batch']} = {res['per_device_batch']} per "
             f"device, grad_accum {res['grad_accum']}",
             f"calibration: {cal['platform']} ({cal['device_kind']}), mesh {cal['mesh']['data']} x "
             f"{cal['mesh']['fsdp']}, per-device batches {cal['batches_per_device']}, {cal['compile_s']} s", "",
             f"{'per device':<40}" + "".join(f"{n.replace('_', ' '):>14}" for n in names) + "   source"]
    for key, label, source in MEMORY_ROWS:
        values = [variants[n]["memory"][key] for n in names]
        if key in ("extra", "frozen", "grad_accumulator") and not any(values):
            continue
        lines.append(f"  {label:<38}" + "".join(f"{size(v):>14}" for v in values) + f"   {source}")
    per_ex = [variants[n]["calibration"] for n in names]
    lines.append(f"  {'activations per example (XLA)':<38}" + "".join(
        f"{size(c['activation_bytes_per_example']):>14}" for c in per_ex) + "   calibrated")
    lines.append(f"  {'  residuals jax keeps per example':<38}" + "".join(
        f"{size(c['residual_bytes_per_example']):>14}" for c in per_ex) + "   jax.vjp (abstract)")
    measured = res.get("measured")
    if measured:
        lines.append(f"  {'compiled real step (XLA)':<38}{size(measured['total']):>14}   measured: model / "
                     f"compiled = {measured['total_model_over_compiled']:.3f}")
    lines.append("")
    f = res["flops"]
    lines.append(f"FLOPs per step: {flops(f['per_device'])} per device, {flops(f['global'])} in all "
                 f"({flops(f['per_example'])} per example, update {flops(f['update'])}; lowered program)")
    if measured:
        lines.append(f"  real step: {flops(measured['flops_global'])} lowered (model / lowered = "
                     f"{measured['flops_global_model_over_lowered']:.4f}), {flops(measured['flops_per_device'])} "
                     f"per device compiled ({measured['flops_per_device_model_over_compiled']:.3f})")
    fits = ", ".join(f"{n.replace('_', ' ')} {variants[n]['largest_batch_per_device']} per device "
                     f"({variants[n]['largest_batch_per_device'] * res['devices']} global)" for n in names)
    anchor = " (from the compiled total)" if measured else ""
    lines.append(f"largest batch in {res['hbm_gib']:g} GiB{anchor}: {fits}")
    if "step" in res["notes"]:
        lines.append(f"step: {res['notes']['step']}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags look like --devices=8")
    if _CONFIG.value is None:
        fail("plan needs --config=configs/<name>.py[:variant]")
    if _DEVICES.value < 1:
        fail(f"--devices={_DEVICES.value} must be >= 1")
    if _HBM.value <= 0:
        fail(f"--hbm_gib={_HBM.value} must be > 0")
    if _BATCH.value is not None and _BATCH.value < 1:
        fail(f"--batch_size={_BATCH.value} must be >= 1")
    mesh, context = parse_mesh(_MESH.value), parse_context(_CONTEXT.value)
    if 1 < _DEVICES.value <= MAX_FORCED_HOST_DEVICES and _MEASURE.value is not False or _MEASURE.value:
        force_host_devices(_DEVICES.value)  # the real step can then be compiled on a CPU-only machine
    from ldm_jax.training import plan

    res = plan.plan(_CONFIG.value, devices=_DEVICES.value, mesh=mesh, batch_size=_BATCH.value, hbm_gib=_HBM.value,
                    remat=_REMAT.value, context=context, measure=_MEASURE.value, compare_remat=_COMPARE.value,
                    calibration_devices=_CALIBRATION_DEVICES.value)
    print(json.dumps(res, indent=1) if _JSON.value else render(res))


def run_cli(argv):
    start(main, argv, uses_config=True)
