"""Shapes dataset: captions, held-out split, build/reuse, and the analytic checker on true and wrong images."""

import itertools
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm_jax.data import builders, shapes
from ldm_jax.data.shapes_checker import ShapesChecker, largest_component, score_images

KEYS = ("color", "shape", "position", "size")


def _examples(n, resolution, split="train", seed=7):
    pairs = shapes.allowed_pairs(split)
    exs = [shapes.sample_example(np.random.default_rng([seed, i]), resolution, pairs) for i in range(n)]
    images = np.stack([e["image"] for e in exs])
    return images, {k: np.array([e[k] for e in exs]) for k in KEYS}, [e["caption"] for e in exs]


def test_caption_to_attrs_inverts_every_template():
    for color, shape, position, size, template in itertools.product(
        range(6), range(3), range(9), range(2), range(len(shapes.TEMPLATES))
    ):
        caption = shapes.make_caption(color, shape, position, size, template)
        attrs = shapes.caption_to_attrs(caption)
        assert attrs["color"] == shapes.COLORS[color], caption
        assert attrs["shape"] == shapes.SHAPES[shape], caption
        assert attrs["position"] == shapes.POSITIONS[position], caption
        assert attrs["size"] == (shapes.SIZES[size] if "{size}" in shapes.TEMPLATES[template] else None)
    assert shapes.make_caption(0, 0, 0, 0, 0) == "a red circle in the top left"
    assert shapes.make_caption(2, 1, 7, 1, 1) == "a large blue square at the bottom"
    assert shapes.caption_to_attrs("a photo of a cat")["color"] is None


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_checker_scores_ground_truth_perfectly(resolution, split):
    images, attrs, captions = _examples(100, resolution, split)
    if split == "train":
        result = score_images(images, attrs)
        assert result["detected"] == 1.0
    else:  # float input in [-1, 1] scored against the captions
        result = score_images(images.astype(np.float32) / 127.5 - 1.0, captions)
    assert result["all_acc"] >= 0.99, result


def test_checker_is_not_fooled():
    images, attrs, _ = _examples(40, 32)
    wrong_color = np.stack([
        shapes.render((c + 1) % 6, s, p, z, 32) for c, s, p, z in zip(*(attrs[k] for k in KEYS), strict=True)
    ])
    result = score_images(wrong_color, attrs)
    assert result["color_acc"] == 0.0 and result["shape_acc"] >= 0.99 and result["position_acc"] >= 0.99
    wrong_shape = np.stack([
        shapes.render(c, (s + 1) % 3, p, z, 32) for c, s, p, z in zip(*(attrs[k] for k in KEYS), strict=True)
    ])
    result = score_images(wrong_shape, attrs)
    assert result["shape_acc"] == 0.0 and result["color_acc"] >= 0.99
    blank = np.full_like(images, 255)
    result = score_images(blank, attrs)
    assert result["detected"] == 0.0 and result["all_acc"] == 0.0 and result["color_acc"] == 0.0
    mirrored = score_images(images[:, :, ::-1], attrs)
    off_center = attrs["position"] % 3 != 1
    assert mirrored["position_acc"] == pytest.approx(1.0 - off_center.mean())


def test_checker_tolerates_noise_and_blur():
    images, attrs, _ = _examples(50, 64)
    noisy = images.astype(np.float32) / 127.5 - 1.0
    noisy = noisy + np.random.default_rng(0).normal(0.0, 0.1, noisy.shape).astype(np.float32)
    assert score_images(noisy, attrs)["all_acc"] >= 0.95
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.0))) for im in images])
    assert score_images(blurred, attrs)["all_acc"] >= 0.95


def test_largest_component_and_predict_shapes():
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:3] = True
    mask[5:9, 4:9] = True
    mask[0, 9] = True
    out = largest_component(mask)
    assert out.sum() == 20 and out[5:9, 4:9].all()
    preds = ShapesChecker().predict(shapes.render(3, 2, 8, 1, 48))  # one (H, W, 3) image
    assert {k: int(v[0]) for k, v in preds.items()} == {"color": 3, "shape": 2, "position": 8, "size": 1}


def test_built_dataset_reads_back_and_holds_out_pairs(shapes32):
    assert shapes32.splits == {"train": 200, "test": 40, "heldout": 40}
    heldout = {(shapes.COLORS.index(c), shapes.SHAPES.index(s)) for c, s in shapes.HELDOUT_PAIRS}
    for split in ("train", "test", "heldout"):
        src = shapes32.source(split)
        records = [src[i] for i in range(len(src))]
        pairs = {(int(r["color"]), int(r["shape"])) for r in records}
        assert (pairs <= heldout) if split == "heldout" else not (pairs & heldout)
        images = np.stack([r["image"] for r in records])
        assert images.shape == (len(src), 32, 32, 3) and images.dtype == np.uint8
        if split == "train":
            result = score_images(images, {k: np.array([r[k] for r in records]) for k in KEYS})
            assert result["all_acc"] >= 0.99, (split, result)
        else:
            captions = [r["caption"].decode() for r in records]
            assert score_images(images, captions)["all_acc"] >= 0.99
    train = shapes32.source("train")
    assert {int(train[i]["color"]) for i in range(len(train))} == set(range(6))


def test_build_is_reused_and_resolution_is_configurable(data_dir, shapes32):
    files = sorted(os.listdir(shapes32.builder.data_dir))
    stamps = [os.stat(os.path.join(shapes32.builder.data_dir, f)).st_mtime_ns for f in files]
    again = builders.prepare("shapes", data_dir=data_dir, resolution=32, num_train=200, num_test=40,
                             num_heldout=40)
    assert again.builder.data_dir == shapes32.builder.data_dir
    assert [os.stat(os.path.join(again.builder.data_dir, f)).st_mtime_ns for f in files] == stamps
    small = builders.prepare("shapes", data_dir=data_dir, resolution=16, num_train=8, num_test=0, num_heldout=0)
    assert small.builder.data_dir != shapes32.builder.data_dir
    assert small.splits == {"train": 8} and small.source("train")[0]["image"].shape == (16, 16, 3)
