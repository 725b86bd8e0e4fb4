"""ldm_jax's XLA:CPU defaults: YNNPACK fusions off unless the user chose otherwise."""

import os
import subprocess
import sys

from ldm_jax import _xla_cpu


def test_apply_adds_flag_and_keeps_existing_flags(monkeypatch):
    monkeypatch.setattr(_xla_cpu, "_jaxlib_version", lambda: (0, 10))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert _xla_cpu.apply(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type="
    assert not _xla_cpu.apply(env)  # idempotent
    assert env["XLA_FLAGS"].count("ynn") == 1


def test_user_choice_wins(monkeypatch):
    monkeypatch.setattr(_xla_cpu, "_jaxlib_version", lambda: (0, 10))
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"}
    assert not _xla_cpu.apply(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    env = {"LDM_JAX_XLA_CPU_DEFAULTS": "0"}
    assert not _xla_cpu.apply(env) and "XLA_FLAGS" not in env


def test_unknown_jaxlib_leaves_flags_alone(monkeypatch):
    # an XLA flag the installed jaxlib does not know aborts the process, so only known versions get it
    for version in (None, (0, 7), (0, 12), (1, 0)):
        monkeypatch.setattr(_xla_cpu, "_jaxlib_version", lambda v=version: v)
        env = {}
        assert not _xla_cpu.apply(env) and env == {}


_PROBE = """
import ldm_jax, os, sys
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
text = jax.jit(conv).lower(jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))).compile().as_text()
print("ynn_fusion" in text, "ynn_fusion_type=" in os.environ.get("XLA_FLAGS", ""))
"""


def test_import_turns_ynn_fusions_off_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LDM_JAX_XLA_CPU_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    has_ynn, flag_set = out.stdout.split()
    if _xla_cpu.known_jaxlib():
        assert (has_ynn, flag_set) == ("False", "True")
    else:
        assert flag_set == "False"
