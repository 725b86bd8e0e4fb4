"""The committed Fashion-MNIST feature net: accuracy, FD-FMNIST floor, feature function; training runs."""

import jax
import numpy as np
import pytest

from ldm_jax.eval import fmnist_net
from ldm_jax.eval.frechet import fid_from_features


@pytest.fixture(scope="module")
def test_outputs():
    images, labels = fmnist_net.load_fashion_mnist("test")
    config, params, meta = fmnist_net.load_weights()
    model = fmnist_net.FMNISTNet(config)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, fmnist_net.preprocess(x)))
    outs = [apply(params, images[i:i + 2500, ..., None]) for i in range(0, len(images), 2500)]
    logits = np.concatenate([np.asarray(o[0]) for o in outs])
    feats = np.concatenate([np.asarray(o[1]) for o in outs])
    return images, labels, params, meta, logits, feats


def test_committed_weights_reach_90_percent_on_the_test_split(test_outputs):
    images, labels, _, meta, logits, feats = test_outputs
    assert images.shape == (10000, 28, 28) and feats.shape == (10000, 128)
    accuracy = float(np.mean(logits.argmax(-1) == labels))
    assert accuracy >= 0.90
    assert accuracy == pytest.approx(float(meta["test_accuracy"]), abs=1e-3)
    assert fmnist_net.WEIGHTS.stat().st_size < 2_000_000


def test_fd_fmnist_separates_real_from_shifted_data(test_outputs):
    _, labels, _, _, _, feats = test_outputs
    floor = fid_from_features(feats[:5000], feats[5000:])  # two halves of the real test split
    classes = fid_from_features(feats[labels < 5], feats[labels >= 5])  # different garments
    assert 0 < floor < 0.02 * classes


def test_feature_fn_accepts_rgb_float_and_other_sizes(test_outputs):
    images, _, params, _, _, feats = test_outputs
    fn = fmnist_net.fmnist_feature_fn()  # committed weights, sharded over the 8 test devices
    gray = images[:10, ..., None]
    np.testing.assert_allclose(fn(gray), feats[:10], rtol=1e-4, atol=1e-4)
    rgb = np.repeat(gray.astype(np.float32) / 127.5 - 1.0, 3, axis=-1)
    np.testing.assert_allclose(fn(rgb), feats[:10], rtol=1e-4, atol=1e-4)
    up = np.repeat(np.repeat(gray, 2, axis=1), 2, axis=2)  # 56x56 -> resized back to 28x28
    assert fn(up).shape == (10, 128)
    assert np.corrcoef(fn(up).ravel(), feats[:10].ravel())[0, 1] > 0.9
    with pytest.raises(ValueError, match="1 or 3"):
        fmnist_net.preprocess(np.zeros((1, 28, 28, 2), np.float32))


def test_training_lowers_the_loss():
    images, labels = fmnist_net.load_fashion_mnist("test")
    # A small net without dropout, He-initialized with numpy: XLA's CPU compile of threefry random
    # draws (init, dropout) costs tens of seconds on a loaded 2-core machine.
    small = fmnist_net.FMNISTNetConfig(widths=(8, 16), features=32, dropout=0.0)
    shapes = jax.eval_shape(lambda: fmnist_net.init_params(small))
    rng = np.random.default_rng(0)
    def he_normal(s):
        if len(s.shape) == 1:
            return np.zeros(s.shape, np.float32)
        return (rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))).astype(np.float32)

    init = jax.tree.map(he_normal, shapes)
    _, losses = fmnist_net.train(images[:512], labels[:512], num_steps=16, batch_size=32, learning_rate=3e-3,
                                 config=small, params=init)
    assert len(losses) == 16 and np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < losses[0] - 0.2


def test_missing_files_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fmnist_net.load_fashion_mnist("test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split"):
        fmnist_net.load_fashion_mnist("validation")
    with pytest.raises(FileNotFoundError, match="experiments/fmnist_features"):
        fmnist_net.load_weights(tmp_path / "none.safetensors")
