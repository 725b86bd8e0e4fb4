"""LPIPS-VGG vs the lpips package's own PyTorch model (torchvision VGG16 trunk) with shared random weights."""

import importlib
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.models.lpips import LPIPS, load_lpips
from ldm_jax.types import ConfigError

REFS = Path(sys.prefix) / "torch-refs"  # lpips + torchvision live here (see tests/eval/test_inception.py)


def _import_lpips():
    if not (REFS / "lpips").is_dir():
        raise RuntimeError(f"the lpips reference is not installed in {REFS}: run `make setup`")
    saved = list(sys.path)
    sys.path.insert(0, str(REFS))
    name = "torchvision._meta_registrations"  # its compiled ops do not load beside CPU torch; VGG needs none
    sys.modules.setdefault(name, types.ModuleType(name))
    try:
        return importlib.import_module("lpips")
    finally:
        sys.path[:] = saved
        for key in [k for k in sys.modules if k.split(".")[0] in ("torchvision", "lpips")]:
            del sys.modules[key]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    lp = _import_lpips()
    torch.manual_seed(0)
    model = lp.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).eval()
    with torch.no_grad():  # random, non-negative lin weights (the released ones are non-negative too)
        for lin in model.lins:
            lin.model[-1].weight.copy_(torch.rand_like(lin.model[-1].weight))
    root = tmp_path_factory.mktemp("lpips")
    trunk = {}
    for name, value in model.net.state_dict().items():  # slice<k>.<i>.weight -> features.<i>.weight
        trunk["features." + name.split(".", 1)[1]] = value
    torch.save(trunk, root / "vgg16.pth")
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("lin")}, root / "vgg.pth")
    return model, root


def test_distance_matches_the_lpips_package(reference):
    model, root = reference
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2)).numpy()
    params = load_lpips(root / "vgg16.pth", root / "vgg.pth")
    got = np.asarray(LPIPS().apply({"params": params}, jnp.asarray(x), jnp.asarray(y)))
    assert want.reshape(-1).min() > 1e-4
    np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-4, atol=1e-6)
    same = np.asarray(LPIPS().apply({"params": params}, jnp.asarray(x), jnp.asarray(x)))
    np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_missing_or_wrong_files_fail_clearly(reference, tmp_path):
    _, root = reference
    with pytest.raises(ConfigError, match="not found"):
        load_lpips(tmp_path / "nope.pth", root / "vgg.pth")
    with pytest.raises(ConfigError, match="lack"):
        load_lpips(root / "vgg.pth", root / "vgg.pth")  # lin file given as the trunk


def test_autoencoder_stage_with_perceptual_loss(reference, tmp_path):
    """A tiny stage-1 run with perceptual_weight > 0 and the PatchGAN switched on at step 2: the LPIPS term is
    logged and part of the reconstruction loss, the adaptive adversarial weight (whose numerator is the
    gradient of that loss) is 0 before disc_start and positive after."""
    from ldm_jax.configlib import load_config
    from ldm_jax.training import run
    from ldm_jax.training.writers import read_metrics

    _, root = reference
    c = load_config("configs/shapes_autoencoder.py:tiny")
    c.data.data_dir = str(tmp_path / "data")
    c.train.num_steps, c.train.log_every_steps, c.sample.every_steps = 2, 1, 0
    c.autoencoder.perceptual_weight = 0.5
    c.autoencoder.disc_start = 1  # state.step 0 (logged as step 1) is before it, step 2 after
    c.autoencoder.lpips_vgg, c.autoencoder.lpips_lin = str(root / "vgg16.pth"), str(root / "vgg.pth")
    run(c, str(tmp_path / "ae"))
    rows = [r for r in read_metrics(str(tmp_path / "ae")) if "lpips" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["lpips"]) and r["lpips"] > 0 and r["rec_loss"] > 0.5 * r["lpips"] for r in rows)
    assert rows[0]["adv_weight"] == 0 and 0 < rows[1]["adv_weight"] <= 1e4 and np.isfinite(rows[1]["d_loss"])
    c.autoencoder.lpips_lin = ""
    with pytest.raises(ValueError):  # a one-line ConfigError (the CLI prints it and exits 2)
        run(c, str(tmp_path / "ae2"))
