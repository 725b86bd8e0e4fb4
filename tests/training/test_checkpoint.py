import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.ldm.workdirs import read_config, restore_params
from ldm_jax.training.checkpoint import Checkpointer, _is_finite
from ldm_jax.training.optim import tree_all_finite
from ldm_jax.training.state import create_state


def _state(value):
    params = {"w": jnp.full((4,), value, jnp.float32)}
    return create_state(params, optax.sgd(0.1), jax.random.PRNGKey(0))


def test_retention_keeps_last_n_plus_every_k(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=2, keep_every=3, async_save=False)
    for step in range(1, 8):
        assert ckpt.save(step, _state(step), {"next_index": step}, {"train": {"seed": 0}})
    ckpt.close()
    assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == [3, 6, 7]
    assert read_config(str(tmp_path)) == {"train": {"seed": 0}}
    np.testing.assert_array_equal(restore_params(str(tmp_path), ema=False)["w"], np.full((4,), 7.0))


def test_nan_params_are_never_saved_and_bytes_data_state_round_trips(tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
    good = _state(1.0)
    assert ckpt.save(1, good, b"\x00grain-bytes")
    with caplog.at_level(logging.WARNING, logger="ldm_jax.training"):
        assert not ckpt.save(2, _state(float("nan")), {"next_index": 2})
    assert "NOT checkpointing" in caplog.text and ckpt.all_steps() == [1]
    # the jitted check (multi-host or accelerator arrays) gives the same answers as the host one
    for value, finite in ((1.0, True), (float("nan"), False), (float("inf"), False)):
        tree = (_state(value).params, {"step": jnp.int32(3)})
        assert _is_finite(tree) is finite and bool(jax.jit(tree_all_finite)(tree)) is finite
    step, state, data = ckpt.restore_latest(jax.eval_shape(lambda: good))
    assert step == 1 and data == b"\x00grain-bytes"
    np.testing.assert_array_equal(state.params["w"], good.params["w"])
    ckpt.close()


def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(float(step)), {"next_index": step})
    for root, _, files in os.walk(tmp_path / "checkpoints" / "2" / "state"):
        for name in files:  # truncate every array file of the newest checkpoint
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    with caplog.at_level(logging.WARNING, logger="ldm_jax.training"):
        step, state, data = ckpt.restore_latest(jax.eval_shape(lambda: _state(0.0)))
    assert step == 1 and data == {"next_index": 1}
    np.testing.assert_array_equal(state.params["w"], np.full((4,), 1.0))
    assert "unreadable" in caplog.text and "falling back" in caplog.text
    assert os.listdir(tmp_path / "checkpoints_corrupt")  # moved aside, so step 2 can be written again
    assert ckpt.save(2, _state(2.0), {"next_index": 2})
    ckpt.close()
