"""openmoji, fashion_mnist, image_folder and tfds catalog datasets: offline builds that read back."""

import gzip
import io
import json
import logging
import os
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data import builders, fashion_mnist, openmoji
from ldm_jax.data.common import DataError, OutsideTfdsMixin, encode_png
from ldm_jax.data.pipeline import make_iterator
from ldm_jax.types import ConfigError


def _all(source):
    return [source[i] for i in range(len(source))]


def test_openmoji_subset_builds_and_reads_back(data_dir):
    result = builders.prepare("openmoji", data_dir=data_dir, resolution=32, limit=40)
    entries = openmoji.catalog()[:40]
    assert len(openmoji.catalog()) > 3500  # ~4k named emoji in the package
    expected = {split: {cp for cp, _, _ in entries if openmoji.split_of(cp) == split} for split in ("train", "test")}
    assert result.splits == {k: len(v) for k, v in expected.items()} and expected["test"]
    names = {cp: name for cp, _, name in entries}
    for split in ("train", "test"):
        records = _all(result.source(split))
        assert {r["codepoints"].decode() for r in records} == expected[split]
        for r in records:
            cp = r["codepoints"].decode()
            assert r["caption"].decode() == names[cp] and (zlib.crc32(cp.encode()) % 10 == 0) == (split == "test")
            image = r["image"]
            assert image.shape == (32, 32, 3) and (image[0, 0] == 255).all()  # white background
    assert openmoji.emoji_name("\U0001F600") == "grinning face"
    assert openmoji.emoji_name("\u00e9") == "latin small letter e with acute"  # Unicode-name fallback
    drawing = openmoji.render_emoji("\U0001F34E", 64, openmoji.openmoji_dir() / "font" / "glyf_colr0.ttf")
    red = (drawing[..., 0] > 150) & (drawing[..., 1] < 100) & (drawing[..., 2] < 100)
    assert red.mean() > 0.1  # a red apple, drawn in color


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _check_fashion(result, images, labels, split):
    records = _all(result.source(split))
    assert len(records) == len(labels)
    by_pixels = {im.tobytes(): int(lab) for im, lab in zip(images, labels, strict=True)}
    for r in records:
        assert r["image"].shape == (28, 28, 1)
        label = by_pixels[r["image"][..., 0].tobytes()]  # exact pixels, lossless PNG
        assert int(r["label"]) == label
        assert r["caption"].decode() == f"a photo of a {fashion_mnist.CLASS_NAMES[label]}"


def test_fashion_mnist_from_idx_files(data_dir, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, (img_name, lab_name) in fashion_mnist._FILES.items():
        n = 12 if split == "train" else 5
        arrays[split] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
        _write_idx(tmp_path / img_name, arrays[split][0])
        _write_idx(tmp_path / lab_name, arrays[split][1])
    result = builders.prepare("fashion_mnist", data_dir=data_dir, source_dir=str(tmp_path), limit_train=10)
    assert result.splits == {"train": 10, "test": 5}
    _check_fashion(result, arrays["train"][0][:10], arrays["train"][1][:10], "train")
    _check_fashion(result, *arrays["test"], "test")
    with open(tmp_path / "bad.gz", "wb") as f:
        f.write(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(DataError, match="truncated"):
        fashion_mnist.read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_without_local_files_uses_the_download_manager(tmp_path):
    arrays = (np.zeros((3, 28, 28), np.uint8), np.array([1, 2, 3], np.uint8))
    for img_name, lab_name in fashion_mnist._FILES.values():
        _write_idx(tmp_path / img_name, arrays[0])
        _write_idx(tmp_path / lab_name, arrays[1])

    class LocalDownloads:  # stands in for tfds' DownloadManager: "downloads" resolve to the local copies
        def download(self, urls):
            self.urls = urls
            return {key: tmp_path / url.rsplit("/", 1)[1] for key, url in urls.items()}

    dl = LocalDownloads()
    builder = builders.make_builder("fashion_mnist", data_dir=str(tmp_path / "d"), source_dir=str(tmp_path / "no"))
    generators = builder._split_generators(dl)
    names = [f for pair in fashion_mnist._FILES.values() for f in pair]
    assert sorted(dl.urls.values()) == sorted(fashion_mnist._MIRROR + f for f in names)
    captions = [example["caption"] for _, example in generators["test"]]
    assert captions == ["a photo of a trouser", "a photo of a pullover", "a photo of a dress"]


@pytest.mark.skipif(not os.path.exists(fashion_mnist.DEBIAN_DIR), reason="Debian dataset-fashion-mnist absent")
def test_fashion_mnist_debian_subset(data_dir):
    result = builders.prepare("fashion_mnist", data_dir=data_dir, limit_train=64, limit_test=16)
    files = fashion_mnist._FILES
    for split, n in (("train", 64), ("test", 16)):
        images = fashion_mnist.read_idx(os.path.join(fashion_mnist.DEBIAN_DIR, files[split][0]))[:n]
        labels = fashion_mnist.read_idx(os.path.join(fashion_mnist.DEBIAN_DIR, files[split][1]))[:n]
        _check_fashion(result, images, labels, split)
    batch = next(make_iterator({"name": "fashion_mnist", "data_dir": data_dir, "resolution": 32, "channels": 3,
                                "batch_size": 8, "num_threads": 0,
                                "builder_kwargs": {"limit_train": 64, "limit_test": 16}}))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].shape == (8,)
    assert np.allclose(batch["image"][..., 0], batch["image"][..., 2])  # gray replicated to RGB


def _folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(root / "sub" / f"im{i}.png")
        (root / "sub" / f"im{i}.txt").write_text(f"caption number {i}\n")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "photo.jpg", quality=95)
    (root / "photo.txt").write_text("a jpeg photo")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half
    rgba[:, 4:, 3] = 255
    Image.fromarray(rgba).save(root / "alpha.png")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
    (root / "broken.png").write_bytes(buffer.getvalue()[:60])  # truncated: header only
    (root / "notes.md").write_text("not an image")
    return root


def test_image_folder_skips_corrupt_images_and_reports(data_dir, tmp_path, caplog):
    root = _folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ldm_jax.data"):
        result = builders.prepare("image_folder", data_dir=data_dir, path=str(root))
    assert result.num_skipped == 1 and result.skipped[0].startswith("broken.png:")
    assert "skipped 1 unreadable image(s) of 7" in caplog.text
    records = {r["file_name"].decode(): r for r in _all(result.source("train"))}
    assert sorted(records) == ["alpha.png", "photo.jpg"] + [f"sub/im{i}.png" for i in range(4)]
    assert records["sub/im2.png"]["caption"].decode() == "caption number 2"
    assert records["sub/im2.png"]["image"].shape == (22, 30, 3)
    assert records["alpha.png"]["caption"].decode() == ""
    alpha = records["alpha.png"]["image"]
    assert (alpha[:, :4] == 255).all() and (alpha[:, 4:] == [255, 0, 0]).all()  # composited on white
    again = builders.prepare("image_folder", data_dir=data_dir, path=str(root))
    assert again.num_skipped == 1 and again.builder.data_dir == result.builder.data_dir  # reused, still reported
    batch = next(make_iterator({"name": "image_folder", "builder_kwargs": {"path": str(root)}, "data_dir": data_dir,
                                "resolution": 16, "batch_size": 6, "num_threads": 0}))
    assert batch["image"].shape == (6, 16, 16, 3)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_image_folder_caption_files(data_dir, tmp_path, fmt):
    root = tmp_path / "cap"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    if fmt == "jsonl":
        lines = [json.dumps({"file_name": f"{i}.png", "text": f"gray level {i}"}) for i in range(3)]
        (root / "metadata.jsonl").write_text("\n".join(lines))
    else:
        rows = "".join(f"{i}.png,gray level {i}\n" for i in range(3))
        (root / "captions.csv").write_text("file_name,caption\n" + rows)
    result = builders.prepare("image_folder", data_dir=data_dir, path=str(root), test_fraction=0.5)
    records = _all(result.source("train")) + _all(result.source("test"))
    got = {r["file_name"].decode(): r["caption"].decode() for r in records}
    assert got == {f"{i}.png": f"gray level {i}" for i in range(3)} and result.num_skipped == 0


def test_bad_paths_and_names_give_one_line_errors(data_dir, tmp_path):
    cases = [
        (dict(name="image_folder", path=str(tmp_path / "missing")), DataError, "does not exist"),
        (dict(name="image_folder", path=str(tmp_path)), DataError, "no images"),
        (dict(name="image_folder"), ConfigError, "needs a folder"),
        (dict(name="shapes", resolutoin=32), ConfigError, "did you mean 'resolution'"),
        (dict(name="shapse"), DataError, "did you mean 'shapes'"),
        (dict(name="mnist"), DataError, "not prepared"),
    ]
    for kwargs, error, text in cases:
        name = kwargs.pop("name")
        with pytest.raises(error, match=text) as info:
            builders.prepare(name, data_dir=str(tmp_path / "empty_dir"), **kwargs)
        assert "\n" not in str(info.value)


class _Mnist(OutsideTfdsMixin, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes files laid out like tfds' own prepared `mnist` (same name, version and features)."""

    name = "mnist"
    VERSION = tfds.core.Version("3.0.1")

    def _info(self):
        features = {"image": tfds.features.Image(shape=(28, 28, 1)), "label": tfds.features.ClassLabel(num_classes=10)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(20), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": encode_png(np.full((28, 28, 1), 10 * i, np.uint8)), "label": i % 10}


def test_catalog_dataset_by_name_when_prepared(tmp_path):
    _Mnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    result = builders.prepare("mnist", data_dir=str(tmp_path))
    assert type(result.builder).__module__.startswith("tensorflow_datasets")  # tfds' own catalog class
    assert result.splits == {"train": 20, "test": 4}
    cfg = {"name": "tfds:mnist", "data_dir": str(tmp_path), "split": "test", "resolution": 28, "channels": 1,
           "batch_size": 4, "shuffle": False, "num_epochs": 1, "num_threads": 0}
    batch = next(make_iterator(cfg))
    src = result.source("test")
    for row, i in enumerate(batch["index"]):
        assert batch["caption"][row] == f"a photo of a {int(src[int(i)]['label'])}"
        assert np.allclose(batch["image"][row], src[int(i)]["image"] / 127.5 - 1.0)
