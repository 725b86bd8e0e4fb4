"""`ldm-jax evaluate --images --reference`: FD / KID / precision-recall between folders, and its errors."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from ldm_jax.eval.fmnist_net import fmnist_feature_fn
from ldm_jax.eval.frechet import fid_from_features


def _folder(path, images):
    path.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:03d}.png")
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ldm_jax", "evaluate", *args], capture_output=True, text=True,
                          timeout=300)


def test_folders_fd_kid_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (12, 28, 28, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    a, b = _folder(tmp_path / "fake", fake), _folder(tmp_path / "real", real)
    out = tmp_path / "eval.json"
    proc = _cli(f"--images={a}", f"--reference={b}", "--features=fmnist", "--precision_recall", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    feats = fmnist_feature_fn()
    want = fid_from_features(np.asarray(feats(real), np.float64), np.asarray(feats(fake), np.float64))
    np.testing.assert_allclose(result["fd"], want, rtol=1e-6)
    assert result["fd"] > 0 and result["num_real"] == result["num_fake"] == 12
    assert {"kid_mean", "kid_std", "precision", "recall"} <= set(result)

    same = _cli(f"--images={b}", f"--reference={b}")  # a set against itself: FD ~0, JSON to stdout
    assert same.returncode == 0, same.stderr[-2000:]
    assert abs(json.loads(same.stdout[:same.stdout.rindex("}") + 1])["fd"]) < 1e-6

    for args, words in (([f"--images={a}"], "--reference"),
                        ([f"--images={tmp_path / 'nope'}", f"--reference={b}"], "not a folder"),
                        ([f"--images={a}", f"--reference={b}", "--features=inception"], "--inception_weights"),
                        ([f"--workdir={tmp_path}"], "no checkpoints")):
        proc = _cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-1000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert words in last and "Traceback" not in proc.stderr, proc.stderr[-1000:]
