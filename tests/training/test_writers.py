import os

from ldm_jax.training.writers import MetricWriter, read_metrics


def test_jsonl_and_tensorboard(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write_scalars(1, {"loss": 0.5, "lr": 1e-4})
    w.write_scalars(2, {"loss": float("inf")})
    w.close()
    rows = read_metrics(str(tmp_path))
    assert rows[0] == {"step": 1, "loss": 0.5, "lr": 1e-4}
    assert rows[1]["step"] == 2 and rows[1]["loss"] != rows[1]["loss"]  # non-finite logged as NaN
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)
