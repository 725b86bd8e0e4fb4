"""A small Fashion-MNIST classifier whose penultimate features give the "FD-FMNIST" metric.

No registry ships Inception weights, so the framework trains its own feature network on Fashion-MNIST
(Xiao et al. 2017): three 3x3 conv + ReLU + 2x2 max-pool stages (32, 64, 128 channels; 28 -> 14 -> 7 -> 3),
a 128-unit ReLU layer (the features) and a 10-way linear head. Trained with Adam and a fixed seed by
``experiments/fmnist_features/train.py``; the weights ship in ``ldm_jax/eval/weights/fmnist_net.safetensors``
(~1.2 MB), and their test accuracy is stored in the file's metadata.

    feature_fn = fmnist_feature_fn()                 # committed weights, sharded over all devices
    feats = feature_fn(images)         # (B, H, W, 1 or 3), uint8 or float in [-1, 1] -> (B, 128)

Images of another size are resized to 28x28 (antialiased bilinear); RGB is averaged to gray.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.convert.common import check_tree, flatten, read_safetensors, unflatten, write_safetensors
from ldm_jax.data.fashion_mnist import DEBIAN_DIR, read_idx
from ldm_jax.types import Array, PyTree

WEIGHTS = Path(__file__).parent / "weights" / "fmnist_net.safetensors"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# ---------------------------------------------------------------------------- data
def load_fashion_mnist(split: str, data_dir: str | os.PathLike | None = None,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int32 (N,)) of the 'train' (60k) or 'test' (10k) split.

    Reads Debian's ``dataset-fashion-mnist`` idx files (``/usr/share/datasets/fashion-mnist``) or `data_dir`
    with the data package's idx reader.
    """
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split '{split}'; choose 'train' or 'test'")
    root = Path(data_dir or DEBIAN_DIR)
    paths = [root / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST file {missing[0]} not found: `apt-get install dataset-fashion-mnist` or pass "
            "data_dir= a folder with the four *-ubyte.gz files"
        )
    return read_idx(paths[0]), read_idx(paths[1]).astype(np.int32)


# ---------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class FMNISTNetConfig:
    widths: tuple[int, ...] = (32, 64, 128)
    features: int = 128
    num_classes: int = 10
    dropout: float = 0.3


class FMNISTNet(nn.Module):
    """conv-ReLU-maxpool stages, then a ReLU dense layer (the features) and a linear class head.

    ``apply(p, x)`` -> (logits (B, 10), features (B, 128)); `x` is (B, 28, 28, 1) in [-1, 1].
    """

    config: FMNISTNetConfig = FMNISTNetConfig()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        cfg = self.config
        x = x.astype(self.dtype)
        for i, width in enumerate(cfg.widths):
            x = nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
                        name=f"conv_{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        feats = nn.relu(nn.Dense(cfg.features, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x))
        h = nn.Dropout(cfg.dropout, deterministic=not train)(feats)
        logits = nn.Dense(cfg.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(h)
        return logits, feats


def preprocess(images: Array) -> Array:
    """(B, H, W, C) uint8 or float in [-1, 1], C in {1, 3} -> (B, 28, 28, 1) float32 in [-1, 1]."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (B, H, W, 1 or 3), got shape {tuple(images.shape)}")
    if jnp.issubdtype(images.dtype, jnp.integer):
        images = images.astype(jnp.float32) / 127.5 - 1.0
    x = jnp.mean(images.astype(jnp.float32), axis=-1, keepdims=True)
    if x.shape[1:3] != (28, 28):
        x = jax.image.resize(x, (x.shape[0], 28, 28, 1), method="linear", antialias=True)
    return x


def init_params(config: FMNISTNetConfig = FMNISTNetConfig(), seed: int = 0) -> PyTree:
    init = jax.jit(lambda key: FMNISTNet(config).init(key, jnp.zeros((1, 28, 28, 1)))["params"])
    return init(jax.random.key(seed))


# ---------------------------------------------------------------------------- training
def _batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless shuffled index batches, one permutation per epoch (drops the last partial batch)."""
    epoch = 0
    while True:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        for i in range(n // batch_size):
            yield perm[i * batch_size:(i + 1) * batch_size]
        epoch += 1


def train(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_steps: int,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    config: FMNISTNetConfig = FMNISTNetConfig(),
    params: PyTree | None = None,
    log_every: int = 0,
    log_fn: Callable[[int, float], None] | None = None,
) -> tuple[PyTree, list[float]]:
    """Trains FMNISTNet with Adam, cosine-decayed learning rate and cross-entropy; returns (params, losses).

    `images` uint8 (N, 28, 28) or (N, 28, 28, 1); every random choice derives from `seed`. Training starts
    from `params` when given, else from Flax's default initialization drawn with `seed`.
    """
    x_all = (np.asarray(images, np.float32).reshape(-1, 28, 28, 1) / 127.5 - 1.0).astype(np.float32)
    y_all = np.asarray(labels, np.int32)
    if len(x_all) != len(y_all) or len(x_all) < batch_size:
        raise ValueError(f"need as many labels as images and at least {batch_size}; "
                         f"got {len(x_all)}, {len(y_all)}")
    model = FMNISTNet(config)
    params = init_params(config, seed) if params is None else params
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, opt_state, x, y, key, i):
        def loss_fn(p):
            rngs = {"dropout": jax.random.fold_in(key, i)}
            logits, _ = model.apply({"params": p}, x, train=True, rngs=rngs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    key = jax.random.key(seed + 1)
    for i, idx in zip(range(num_steps), _batches(len(x_all), batch_size, seed)):
        params, opt_state, loss = step(params, opt_state, x_all[idx], y_all[idx], key, i)
        losses.append(float(loss))
        if log_fn is not None and log_every and (i + 1) % log_every == 0:
            log_fn(i + 1, float(np.mean(losses[-log_every:])))
    return params, losses


def accuracy(params: PyTree, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 2000,
             config: FMNISTNetConfig = FMNISTNetConfig()) -> float:
    """Top-1 accuracy of the classifier head on uint8 (N, 28, 28[, 1]) images."""
    model = FMNISTNet(config)
    predict = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, preprocess(x))[0], axis=-1))
    images = np.asarray(images).reshape(-1, 28, 28, 1)
    preds = np.concatenate([np.asarray(predict(params, images[i:i + batch_size]))
                            for i in range(0, len(images), batch_size)])
    return float(np.mean(preds == np.asarray(labels)))


# ---------------------------------------------------------------------------- weights
def save_weights(path: str | os.PathLike, params: PyTree, *, config: FMNISTNetConfig = FMNISTNetConfig(),
                 metadata: dict | None = None) -> None:
    meta = {"config": json.dumps(dataclasses.asdict(config))}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(jax.device_get(params)).items()}
    write_safetensors(path, flat, metadata=meta)


def load_weights(path: str | os.PathLike | None = None) -> tuple[FMNISTNetConfig, PyTree, dict]:
    """(config, params, metadata) from a safetensors file (default: the committed weights)."""
    from safetensors import safe_open

    path = Path(path or WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(
            f"no FMNIST feature-net weights at '{path}': "
            "run experiments/fmnist_features/train.py to create them"
        )
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
    raw = json.loads(meta.get("config", "{}"))
    config = FMNISTNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    flat = read_safetensors(path)
    shapes = jax.eval_shape(lambda: init_params(config))
    check_tree({k: v.shape for k, v in flatten(shapes).items()}, flat, "FMNIST feature net")
    return config, unflatten(flat), meta


def fmnist_feature_fn(params: PyTree | None = None, *, config: FMNISTNetConfig | None = None, mesh=None,
                      batch_size: int | None = None):
    """Sharded host callable: images (B, H, W, 1|3) uint8 or [-1, 1] float -> (B, 128) penultimate features.

    Without `params` the committed weights are loaded.
    """
    from ldm_jax.eval.frechet import ShardedFeatureFn

    if params is None:
        config, params, _ = load_weights()
    model = FMNISTNet(config or FMNISTNetConfig())
    return ShardedFeatureFn(lambda p, x: model.apply({"params": p}, preprocess(x))[1], params,
                            mesh=mesh, batch_size=batch_size)
