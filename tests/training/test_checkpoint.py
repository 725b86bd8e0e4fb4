import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax.ldm.workdirs import portable_config, read_config, resolve_paths, restore_params
from ldm_jax.training.checkpoint import Checkpointer, CheckpointMismatch, RestoreOutOfMemory, SaveError, _is_finite
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
    assert "is damaged" in caplog.text and "falling back" in caplog.text
    assert os.listdir(tmp_path / "checkpoints_corrupt")  # moved aside, so step 2 can be written again
    assert ckpt.save(2, _state(2.0), {"next_index": 2})
    ckpt.close()


def test_running_out_of_memory_while_restoring_moves_nothing(tmp_path, monkeypatch):
    """Device memory exhausted during a restore is not file damage: the error names it and the step stays."""
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3, async_save=False)
    ckpt.save(1, _state(1.0), {"next_index": 1})
    before = _tree_bytes(tmp_path)

    def exhausted(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.2GiB")

    monkeypatch.setattr(ckpt, "restore", exhausted)
    with pytest.raises(RestoreOutOfMemory, match="ran out of memory .* left as it is"):
        ckpt.restore_latest(jax.eval_shape(lambda: _state(0.0)))
    ckpt.close()
    assert _tree_bytes(tmp_path) == before and not os.path.exists(tmp_path / "checkpoints_corrupt")


def _tree_bytes(root):
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


def test_a_readable_checkpoint_of_another_model_stops_and_touches_nothing(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(float(step)), {"next_index": step})
    before = _tree_bytes(tmp_path)
    other = create_state({"w": jnp.zeros((8,), jnp.float32)}, optax.sgd(0.1), jax.random.PRNGKey(0))
    with pytest.raises(CheckpointMismatch, match=r"params/w is \(4,\) float32 in the checkpoint and \(8,\) float32"):
        ckpt.restore_latest(jax.eval_shape(lambda: other))
    renamed = create_state({"v": jnp.zeros((4,), jnp.float32)}, optax.sgd(0.1), jax.random.PRNGKey(0))
    with pytest.raises(CheckpointMismatch, match="params/v"):
        ckpt.restore_latest(jax.eval_shape(lambda: renamed))
    adam = create_state({"w": jnp.zeros((4,), jnp.float32)}, optax.adam(0.1), jax.random.PRNGKey(0))
    with pytest.raises(CheckpointMismatch, match="optimizer/extra state differs"):
        ckpt.restore_latest(jax.eval_shape(lambda: adam))
    ckpt.close()
    assert _tree_bytes(tmp_path) == before and not os.path.exists(tmp_path / "checkpoints_corrupt")


def test_a_failed_save_raises_save_error_naming_the_newest_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3, async_save=False)
    assert ckpt.save(1, _state(1.0), {"next_index": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", full_disk)
    with pytest.raises(SaveError, match=r"step 2 .* failed \(OSError: \[Errno 28\] No space left on device\).*newest "
                                        r"complete checkpoint is step 1"):
        ckpt.save(2, _state(2.0), {"next_index": 2})
    ckpt.close()


def test_saved_paths_are_absolute_and_found_again_after_a_move(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "ae" / "checkpoints" / "3").mkdir(parents=True)
    saved = portable_config({"model": {"vae": {"workdir": "runs/ae"}}, "data": {"latent_cache": "auto"}},
                            "runs/ldm")
    assert saved["model"]["vae"]["workdir"] == str(tmp_path / "runs" / "ae")
    assert saved["data"]["latent_cache"] == "auto" and saved["_origin"]["workdir"] == str(tmp_path / "runs" / "ldm")
    os.rename(tmp_path / "runs", tmp_path / "moved")  # both workdirs moved together
    resolved = resolve_paths(json.loads(json.dumps(saved)), str(tmp_path / "moved" / "ldm"))
    assert resolved["model"]["vae"]["workdir"] == str(tmp_path / "moved" / "ae")
    # a path that exists stays; one found nowhere stays as saved (the loader names it)
    assert resolve_paths(json.loads(json.dumps(saved)), str(tmp_path / "elsewhere"))["model"]["vae"][
        "workdir"] == str(tmp_path / "runs" / "ae")
