"""Fashion-MNIST (Xiao et al., 2017) with captions "a photo of a {class}".

The idx files come from Debian's `dataset-fashion-mnist` package (``/usr/share/datasets/fashion-mnist``) when
present; otherwise tfds' download manager fetches the same four files from the dataset's official mirror.
Images are stored as 28x28x1 PNG; the grain pipeline turns them into 1 or 3 channels (``DataConfig.channels``).
"""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.data.common import DataError, OutsideTfdsMixin, encode_png

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES: tuple[str, ...] = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an idx file (optionally gzipped): big-endian uint8 data of the shape in its header."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {values.size} values (truncated file?)")
    return values.reshape(shape)


def caption_for(label: int) -> str:
    return f"a photo of a {CLASS_NAMES[label]}"


@dataclasses.dataclass(eq=False)
class FashionMnistConfig(tfds.core.BuilderConfig):
    source_dir: str | None = DEBIAN_DIR  # folder with the four idx .gz files; None = download
    limit_train: int | None = None  # keep the first N examples of a split (None = all)
    limit_test: int | None = None


class FashionMnistBuilder(OutsideTfdsMixin, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds builder for Fashion-MNIST with captions (splits: train 60k, test 10k)."""

    name = "fashion_mnist"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIG_CLASS = FashionMnistConfig

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST 28x28 grayscale articles, captioned 'a photo of a {class}'.",
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1), encoding_format="png"),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            }),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        folder = Path(cfg.source_dir) if cfg.source_dir else None
        if folder is not None and all((folder / f).exists() for pair in _FILES.values() for f in pair):
            paths = {split: tuple(folder / f for f in pair) for split, pair in _FILES.items()}
        else:
            urls = {f"{split}_{i}": _MIRROR + f for split, pair in _FILES.items() for i, f in enumerate(pair)}
            got = dl_manager.download(urls)
            paths = {split: (got[f"{split}_0"], got[f"{split}_1"]) for split in _FILES}
        limits = {"train": cfg.limit_train, "test": cfg.limit_test}
        return {split: self._generate_examples(*paths[split], limits[split]) for split in _FILES}

    def _generate_examples(self, images_path, labels_path, limit):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if len(images) != len(labels):
            raise DataError(f"{images_path} has {len(images)} images but {labels_path} {len(labels)} labels")
        for i in range(len(images) if limit is None else min(limit, len(images))):
            label = int(labels[i])
            yield i, {"image": encode_png(images[i][..., None]), "caption": caption_for(label), "label": label}
