"""Fixtures of the training tests (the session's compilation cache is tests/conftest.py's)."""

import os
import socket

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """``free_port() -> int``: a TCP port on 127.0.0.1 nothing listens on (a jax.distributed coordinator)."""
    return _free_port


@pytest.fixture(scope="session")
def tiny_autoencoder(tmp_path_factory):
    """(workdir, data_dir) of configs/shapes_autoencoder.py:tiny trained 2 steps: the stage-1 model of the tests
    that train a latent-diffusion stage on top of it (one per test process)."""
    from ldm_jax.configlib import load_config
    from ldm_jax.training import run

    root = tmp_path_factory.mktemp("tiny_autoencoder")
    ae = load_config(os.path.join(ROOT, "configs", "shapes_autoencoder.py:tiny"))
    ae.data.data_dir = str(root / "data")
    ae.train.num_steps, ae.sample.every_steps, ae.checkpoint.every_steps = 2, 0, 2
    run(ae, str(root / "ae"))
    return str(root / "ae"), str(root / "data")
