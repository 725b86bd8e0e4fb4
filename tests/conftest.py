"""Test-wide setup: 8 forced CPU devices (set before jax is imported), float32 matmuls, no network, and one
persistent XLA compilation cache for the whole session.

The cache: identical programs (the tiny autoencoder's train step in the demo and in the sweep, a sampler a
CLI subprocess compiles again) compile once per session instead of once per test or process. Its directory
is also exported as ``JAX_COMPILATION_CACHE_DIR``, so subprocesses started by tests share it. It only stores
compiled executables, so results are unchanged. Each session starts with an empty cache (under pytest's
basetemp), so CI measures cold compiles as a fresh machine would.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TFDS_DATA_DIR", "/tmp/ldm_jax_tfds_unused")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    # Under pytest-xdist every worker has its own basetemp inside the session's: share the session's.
    path = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # inherited by the subprocesses tests start
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return path


# Files that run for minutes (training compiles, CLI subprocesses), longest first. They are moved to the front
# of the collection so that under pytest-xdist (`--dist=loadfile --no-loadscope-reorder`, see the Makefile)
# each worker starts on one of them and the many short files fill in around them. xdist's default order
# (files with the most tests first) left them to the end of the session, where one of them ran alone.
SLOW_FILES = ("tests/training/test_pod_scale.py", "tests/test_sweeps.py", "tests/training/test_stages.py",
              "tests/test_bad_inputs.py", "tests/training/test_sdxl_training.py", "tests/pipelines/test_sdxl.py",
              "tests/models/test_lpips.py", "tests/training/test_plan.py", "tests/training/test_backbones.py",
              "tests/training/test_lora_training.py", "tests/training/test_loop.py", "tests/pipelines/test_parity.py",
              "tests/training/test_finetune.py", "tests/eval/test_evaluate_cli.py",
              "tests/training/test_distributed.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
