"""Shared, session-scoped prepared datasets for the data tests (built offline into a temp data dir)."""

import threading

import pytest

from ldm_jax.data import builders

SHAPES_KWARGS = {"num_train": 200, "num_test": 40, "num_heldout": 40}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def shapes32(data_dir):
    return builders.prepare("shapes", data_dir=data_dir, resolution=32, **SHAPES_KWARGS)


@pytest.fixture(scope="session")
def shapes_cfg(data_dir, shapes32):
    """A DataConfig mapping over the prepared shapes32 dataset."""
    return {"name": "shapes", "data_dir": data_dir, "resolution": 32, "builder_kwargs": SHAPES_KWARGS,
            "batch_size": 16, "num_threads": 2}


def as_processes(count: int, fn) -> None:
    """Runs ``fn(process_index, barrier)`` as `count` simulated processes (threads; ``barrier(name)`` returns when
    all have called it) and re-raises the first failure."""
    gate, errors = threading.Barrier(count), []

    def process(p):
        try:
            fn(p, lambda name: gate.wait(timeout=60))
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            gate.abort()

    threads = [threading.Thread(target=process, args=(p,)) for p in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
