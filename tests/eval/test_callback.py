"""EvalCallback: period, EMA parameters, logging through MetricWriter; the metric builders."""

from typing import NamedTuple

import jax
import numpy as np
import pytest

from ldm_jax.data import shapes
from ldm_jax.eval import callback as cb
from ldm_jax.eval.frechet import FeatureStats, fid_from_features
from ldm_jax.training.writers import MetricWriter, read_metrics


class State(NamedTuple):
    params: dict
    ema_params: dict


def _mean_features(images):
    return np.asarray(images, np.float64).reshape(len(images), -1, 3).mean(1)


def test_callback_period_ema_and_writer(tmp_path):
    seen = []
    metric = lambda params, step: seen.append(step) or {"w": params["w"]}  # noqa: E731
    state = State(params={"w": np.float32(1.0)}, ema_params={"w": np.float32(2.0)})
    writer = MetricWriter(str(tmp_path), tensorboard=False)
    callback = cb.EvalCallback(3, {"toy": metric}, writer=writer)
    for step in range(8):
        assert callback(step, state) is None
    assert seen == [3, 6]
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [3, 6]
    assert rows[0]["eval/toy/w"] == 2.0 and rows[0]["eval/toy/seconds"] >= 0
    # without a writer the scalars go back to the loop; use_ema=False reads state.params
    raw = cb.EvalCallback(2, {"toy": metric}, use_ema=False, at_start=True)
    assert raw(0, state)["eval/toy/w"] == 1.0 and raw(1, state) is None
    with pytest.raises(ValueError, match="at least one metric"):
        cb.EvalCallback(2, {})


def test_frechet_metric_matches_direct_computation():
    rng = np.random.default_rng(0)
    real = rng.uniform(-1, 1, size=(40, 4, 4, 3)).astype(np.float32)
    ref, ref_feats = cb.reference_stats(_mean_features, real, batch_size=16, reservoir=40)

    def generate(params, key, n):
        # numpy noise seeded by the key (jax.random.uniform would compile threefry once per batch shape)
        noise = np.random.default_rng(np.asarray(jax.random.key_data(key))).uniform(-1, 1, size=(n, 4, 4, 3))
        return noise * params["scale"] + params["shift"]

    params = {"scale": 0.5, "shift": 0.2}
    metric = cb.frechet_metric(generate, _mean_features, ref, num_samples=30, batch_size=8,
                               reference_features=ref_feats, kid_subset_size=20)
    out = metric(params, 0)
    fake = np.concatenate([generate(params, jax.random.fold_in(jax.random.key(0), i), n)
                           for i, n in enumerate((8, 8, 8, 6))])
    assert out["fd"] == pytest.approx(fid_from_features(_mean_features(real), _mean_features(fake)), rel=1e-9)
    assert out["fd"] > 0.03 and out["kid"] > 0
    assert metric(params, 5) == out  # same noise at every evaluation
    assert isinstance(ref, FeatureStats) and ref.count == 40


def test_adherence_and_reconstruction_metrics():
    prompts = ["a red circle in the top left", "a blue triangle at the bottom",
               "a large green square on the right"]

    def draw(params, batch, key):
        attrs = shapes.attrs_from_captions(batch)
        size = np.where(attrs["size"] < 0, 1, attrs["size"])
        return np.stack([shapes.render(c, s, p, z, 32) for c, s, p, z in
                         zip(attrs["color"], attrs["shape"], attrs["position"], size)])

    out = cb.adherence_metric(draw, prompts, batch_size=2)({}, 0)
    assert out["all_acc"] == 1.0 and "n" not in out and "heldout/n" not in out
    images = np.random.default_rng(1).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    rec = cb.reconstruction_metric(lambda p, x: x * p["gain"], images, feature_fn=_mean_features)
    assert rec({"gain": 1.0}, 0)["psnr"] == np.inf
    assert rec({"gain": 0.5}, 0)["ssim"] < rec({"gain": 0.9}, 0)["ssim"] < 1.0
