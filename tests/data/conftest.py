"""Shared, session-scoped prepared datasets for the data tests (built offline into a temp data dir)."""

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
