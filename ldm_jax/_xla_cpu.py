"""XLA:CPU defaults ldm_jax sets before JAX starts its CPU backend.

XLA:CPU (jaxlib 0.10) hands convolutions and dots to YNNPACK fusions by default. On the U-Nets of this project
(16x16 to 32x32 latents, 32 to 256 channels) that is slower than XLA's own Eigen kernels: the benchmark U-Net's
training step takes 1.04 s with YNNPACK and 0.81 s without on 2 cores (experiments/benchmarks/xla_cpu_profile.py,
experiments/benchmarks/README.md). ``apply()`` therefore adds ``--xla_cpu_experimental_ynn_fusion_type=`` (no
YNNPACK fusions) to XLA_FLAGS, unless

- the user already set that flag in XLA_FLAGS (theirs wins),
- LDM_JAX_XLA_CPU_DEFAULTS=0 is set, or
- the installed jaxlib is outside the versions where the flag is known to exist (an unknown flag in XLA_FLAGS
  aborts XLA), see `_KNOWN`.

XLA reads XLA_FLAGS when its first backend starts, so this takes effect when ldm_jax is imported before the
first JAX computation (the CLI always is). GPU and TPU backends ignore XLA:CPU flags.
"""

from __future__ import annotations

import os
from importlib import metadata

OPTION = "xla_cpu_experimental_ynn_fusion_type"
COMPILE_OPTIONS = {OPTION: ""}  # the same choice as per-program XLA compile options
FLAG = f"--{OPTION}="
_KNOWN = ((0, 8), (0, 12))  # [first, last) jaxlib (major, minor) with the flag


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def known_jaxlib() -> bool:
    """Whether the installed jaxlib is one where the flag exists."""
    version = _jaxlib_version()
    return version is not None and _KNOWN[0] <= version < _KNOWN[1]


def apply(environ=os.environ) -> bool:
    """Adds the CPU defaults to ``environ['XLA_FLAGS']``; returns whether it changed anything."""
    if environ.get("LDM_JAX_XLA_CPU_DEFAULTS", "1") == "0":
        return False
    flags = environ.get("XLA_FLAGS", "")
    if OPTION in flags or not known_jaxlib():
        return False
    environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True
