"""`ldm-jax evaluate --images`: FD / KID / precision-recall against a folder or a dataset, CLIP features and
CLIP score, and the one-line errors. (Trained workdirs go through the CLI in tests/training/test_stages.py.)"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm_jax.data import DataConfig, make_iterator
from ldm_jax.eval.clip_score import CLIPScorer
from ldm_jax.eval.fmnist_net import fmnist_feature_fn, load_fashion_mnist
from ldm_jax.eval.frechet import fid_from_features
from tests.convert.test_hf_vision import save_tiny_clip


def _folder(path, images, prompts=None):
    path.mkdir()
    for i, im in enumerate(images):
        info = PngImagePlugin.PngInfo()
        if prompts is not None:
            info.add_text("prompt", prompts[i])
        Image.fromarray(im).save(path / f"{i:03d}.png", pnginfo=info)
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ldm_jax", "evaluate", *args], capture_output=True, text=True,
                          timeout=300)


def _cli_many(*arg_lists):
    """Runs the commands side by side (each is mostly a Python / jax start-up); results in order."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda args: _cli(*args), arg_lists))


@pytest.fixture(scope="module")
def fmnist():
    return fmnist_feature_fn()


def _json(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])


def _fd(fn, real, fake):
    return fid_from_features(np.asarray(fn(real), np.float64), np.asarray(fn(fake), np.float64))


def test_folders_fd_kid_and_errors(tmp_path, fmnist):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (12, 28, 28, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    a, b = _folder(tmp_path / "fake", fake), _folder(tmp_path / "real", real)
    out, lines = tmp_path / "eval.json", tmp_path / "prompts.txt"
    lines.write_text("a prompt\n" * 12)
    errors = (([f"--images={a}"], "--reference"),
              ([f"--images={tmp_path / 'nope'}", f"--reference={b}"], "not a folder"),
              ([f"--images={a}", f"--reference={tmp_path / 'nope'}"], "neither a folder"),
              ([f"--images={a}", "--reference=fashion_mnist:val"], "unknown Fashion-MNIST split"),
              ([f"--images={a}", f"--reference={b}", "--features=vgg"], "unknown --features"),
              ([f"--images={a}", f"--reference={b}", "--features=inception"], "--inception_weights"),
              ([f"--images={a}", f"--reference={b}", "--features=inception",
                f"--inception_weights={tmp_path / 'no.pth'}"], "pt_inception-2015-12-05"),
              ([f"--images={a}", f"--reference={b}", "--features=clip"], "--clip=PATH"),
              ([f"--images={a}", f"--clip={tmp_path}"], "--prompts=FILE"),  # the PNGs carry no prompts
              ([f"--images={a}", f"--clip={tmp_path}", f"--prompts={lines}"], "config.json"),
              ([f"--workdir={tmp_path}"], "no checkpoints"),
              ([f"--images={a}", "--inception_score"], "--inception_weights"))
    proc, *failed = _cli_many(
        [f"--images={a}", f"--reference={b}", "--features=fmnist", "--precision_recall", f"--out={out}"],
        *(args for args, _ in errors))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    np.testing.assert_allclose(result["fd"], _fd(fmnist, real, fake), rtol=1e-6)
    assert result["fd"] > 0 and result["num_real"] == result["num_fake"] == 12
    assert {"kid_mean", "kid_std", "precision", "recall"} <= set(result)
    for (args, words), proc in zip(errors, failed):
        assert proc.returncode == 2, (args, proc.stderr[-1000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert words in last and "Traceback" not in proc.stderr, proc.stderr[-1000:]


def test_dataset_references(tmp_path, fmnist):
    """--reference=fashion_mnist[:split] reads Debian's files; other names go through the data pipeline."""
    images = np.random.default_rng(1).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    a, data_dir = _folder(tmp_path / "gen", images), tmp_path / "tfds"
    fm, sh = map(_json, _cli_many(
        [f"--images={a}", "--reference=fashion_mnist", "--num_reference=50"],
        [f"--images={a}", "--reference=shapes:heldout", "--num_reference=40", f"--data_dir={data_dir}"]))

    test, _ = load_fashion_mnist("test")
    assert fm["num_real"] == 50 and fm["num_fake"] == 10
    np.testing.assert_allclose(fm["fd"], _fd(fmnist, np.repeat(test[:50, ..., None], 3, -1), images), rtol=1e-6)

    cfg = DataConfig(name="shapes", split="heldout", data_dir=str(data_dir), resolution=16, batch_size=40,
                     shuffle=False, num_epochs=1, drop_remainder=False)
    shapes = next(iter(make_iterator(cfg)))["image"]  # the dataset the command prepared, read again
    assert shapes.shape == (40, 16, 16, 3) and sh["num_real"] == 40
    np.testing.assert_allclose(sh["fd"], _fd(fmnist, shapes, images), rtol=1e-6)


def test_clip_features_and_clip_score(tmp_path):
    clip = tmp_path / "clip"
    save_tiny_clip(clip)
    rng = np.random.default_rng(2)
    real = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fake = rng.integers(0, 128, (6, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle", "a photo of a cat", "a blue square", "a dog", "a green triangle", "a ship"]
    a, b = _folder(tmp_path / "fake", fake, prompts), _folder(tmp_path / "real", real)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    both, from_file = _cli_many(
        [f"--images={a}", f"--reference={b}", "--features=clip", f"--clip={clip}"],
        [f"--images={b}", f"--clip={clip}", f"--prompts={tmp_path / 'prompts.txt'}"])  # b's PNGs carry no text

    scorer = CLIPScorer.from_pretrained(clip)
    got = _json(both)
    np.testing.assert_allclose(got["fd"], _fd(scorer.image_features, real, fake), rtol=1e-5)
    per_image = scorer(fake, prompts)
    assert per_image["clip_score"] != scorer(fake, prompts[::-1])["clip_score"]  # the pairing matters
    np.testing.assert_allclose(got["clip_score"], per_image["clip_score"], rtol=1e-5)
    np.testing.assert_allclose(got["clip_score_std"], per_image["clip_score_std"], rtol=1e-5)
    np.testing.assert_allclose(_json(from_file)["clip_score"], scorer(real, prompts)["clip_score"], rtol=1e-5)
