"""Training tests share one persistent XLA compilation cache (also handed to their subprocesses).

Identical programs (the same toy step on the same mesh) then compile once per session instead of once per
run; the cache only stores compiled executables, so results are unchanged.
"""

import os

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    # Under pytest-xdist every worker has its own basetemp inside the session's: share the session's.
    path = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


@pytest.fixture
def reap():
    """Collects subprocesses and kills any still running when the test ends (pass or fail)."""
    procs = []
    yield procs.append
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="session")
def subprocess_env(compilation_cache):
    """Environment for training subprocesses: same devices, precision and compilation cache as this process."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        JAX_COMPILATION_CACHE_DIR=compilation_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p),
    )
    return env
