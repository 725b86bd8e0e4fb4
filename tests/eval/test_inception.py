"""FID Inception-v3 port vs pytorch-fid's own model (torchvision blocks) with shared random weights; its
classifier logits and the Inception Score vs a PyTorch reference of torch-fidelity's conventions."""

import importlib
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from ldm_jax.convert.common import ConversionError
from ldm_jax.eval import inception
from ldm_jax.eval.frechet import data_mesh
from ldm_jax.eval.inception_score import inception_score

# pytorch-fid and torchvision live outside site-packages (`make setup` installs them with `pip install --no-deps
# --target .venv/torch-refs pytorch-fid==0.3.0 torchvision==0.28.0`): PyPI's torchvision wheel is built against
# CUDA torch, and an importable-but-broken torchvision would break diffusers / transformers imports elsewhere.
REFS = Path(sys.prefix) / "torch-refs"


def _import_pytorch_fid():
    """pytorch-fid's inception module (built on torchvision's Inception3 blocks), imported in isolation.

    torchvision's compiled ops (nms, roi_align, ...) do not load beside the CPU torch 2.13.0 wheel, and
    registering their meta kernels fails at import; Inception uses none of them, so that registration
    module is replaced by an empty one. Afterwards the path and the torchvision modules are removed again,
    so that later imports of diffusers / transformers in this process do not see torchvision.
    """
    if not (REFS / "pytorch_fid").is_dir() or not (REFS / "torchvision").is_dir():
        raise RuntimeError(f"pytorch-fid / torchvision reference not installed in {REFS}: run `make setup`")
    saved = list(sys.path)
    sys.path.append(str(REFS))  # after site-packages: the venv's torch wins over anything in the refs dir
    name = "torchvision._meta_registrations"
    sys.modules.setdefault(name, types.ModuleType(name))
    try:
        return importlib.import_module("pytorch_fid.inception")
    finally:
        sys.path[:] = saved
        for key in [k for k in sys.modules if k.split(".")[0] in ("torchvision", "pytorch_fid")]:
            del sys.modules[key]


def _random_state_dict(pfi, seed=0):
    template = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in template.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = 0.5 + torch.rand(value.shape, generator=g)
        else:  # bn bias, running_mean, fc
            state[key] = 0.2 * (torch.rand(value.shape, generator=g) - 0.5)
    return state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pfi = _import_pytorch_fid()
    state = _random_state_dict(pfi)
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: state  # stands in for the download
    try:
        model = pfi.InceptionV3([3]).eval()  # the FID network, resize_input and normalize_input on
    finally:
        pfi.load_state_dict_from_url = original
    path = tmp_path_factory.mktemp("inception") / inception.FID_WEIGHTS_FILE
    torch.save(state, path)
    return model, path, state


def test_pool_features_match_pytorch_fid(reference, tmp_path):
    model, path, _ = reference
    images = np.random.default_rng(0).integers(0, 256, size=(2, 37, 53, 3), dtype=np.uint8)
    with torch.no_grad():
        want = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0][:, :, 0, 0].numpy()
    # two of the eight test devices: the batch of 2 is not padded to 8 images at 299x299
    feature_fn = inception.inception_feature_fn(path, mesh=data_mesh(jax.devices()[:2]))
    got = feature_fn(images)
    assert got.shape == (2, 2048)
    assert np.abs(want).max() > 0.1  # the random network is not degenerate
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # the torch-free safetensors copy holds the same parameters
    inception.convert_weights(path, tmp_path / "fid.safetensors")
    from_copy = jax.tree_util.tree_leaves(inception.load_params(tmp_path / "fid.safetensors"))
    assert len(from_copy) == len(jax.tree_util.tree_leaves(feature_fn.params))
    for a, b in zip(from_copy, jax.tree_util.tree_leaves(feature_fn.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("n_in,n_out", [(37, 299), (299, 299), (512, 299), (8, 3)])
def test_bilinear_matrix_matches_torch_interpolate(n_in, n_out):
    x = torch.randn(1, 1, n_in, 5, dtype=torch.float64)
    want = torch.nn.functional.interpolate(x, size=(n_out, 5), mode="bilinear", align_corners=False)
    got = np.einsum("oi,iw->ow", inception.bilinear_matrix(n_in, n_out), x[0, 0].numpy())
    np.testing.assert_allclose(got, want[0, 0].numpy(), atol=1e-12)


def test_missing_and_wrong_weights_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        inception.load_params(tmp_path / "nope.pth")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ConversionError, match="missing"):
        inception.load_params(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="not a readable"):
        inception.load_params(tmp_path / "junk.pth")


# ---------------------------------------------------------------------------- classifier logits and IS
def _torch_inception_score(logits: torch.Tensor, splits: int) -> tuple[float, float]:
    """Reference IS in torch: float64 softmax, per-chunk marginal and KL, exp of the mean KL; chunk j is rows
    j N // splits .. (j + 1) N // splits - 1; population std (ddof 0) over the chunk scores."""
    z = logits.double()
    p, log_p, n = torch.softmax(z, dim=1), torch.log_softmax(z, dim=1), len(z)
    scores = []
    for j in range(splits):
        rows = slice(j * n // splits, (j + 1) * n // splits)
        marginal = p[rows].mean(dim=0, keepdim=True)
        kl = (p[rows] * (log_p[rows] - torch.log(marginal))).sum(dim=1)
        scores.append(torch.exp(kl.mean()))
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(correction=0).item()


def _smooth_images(n: int, size: int, seed: int = 1) -> np.ndarray:
    """uint8 (n, size, size, 3) plane waves of random direction, frequency, phase, colour and contrast: the
    random network's logits vary far more between such images than between white-noise images (IS ~1.06
    instead of ~1.002), so the IS comparison below resolves differences in the logits."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = []
    for _ in range(n):
        fx, fy, phase = rng.uniform(-3, 3, 3)
        wave = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None]
        out.append(255 * np.clip(wave * rng.uniform(0.1, 0.5, 3) + rng.uniform(0.2, 0.8, 3), 0, 1))
    return np.stack(out).astype(np.uint8)


def test_logits_and_inception_score_match_torch(reference):
    model, path, state = reference
    images = _smooth_images(20, 24)
    with torch.no_grad():
        pool = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0][:, :, 0, 0]
        want = pool.mm(state["fc.weight"].T)  # torch-fidelity's "logits_unbiased": the fc without its bias
    logits_fn = inception.inception_logits_fn(path, mesh=data_mesh(jax.devices()[:2]))
    got = logits_fn(images)
    assert got.shape == (20, inception.NUM_CLASSES)
    scale = want.abs().max().item()
    assert scale > 0.5 and want.std(dim=0).mean().item() > 0.01  # logits differ between classes and images
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * scale)
    for splits in (1, 3, 4):  # 3: chunks of 6, 7, 7 rows
        want_is = _torch_inception_score(want, splits)
        np.testing.assert_allclose(inception_score(got, splits), want_is, rtol=1e-5, atol=1e-12)
    assert inception_score(got, 4)[0] > 1.03  # a score that the comparison above can resolve
    # the biased head (bias=True) is torch's nn.Linear; checked on the torch pool features
    head = inception.Classifier(use_bias=True).apply({"params": logits_fn.params["fc"]}, pool.numpy())
    with torch.no_grad():
        want_biased = torch.nn.functional.linear(pool, state["fc.weight"], state["fc.bias"])
    np.testing.assert_allclose(head, want_biased.numpy(), rtol=1e-5, atol=1e-5 * scale)


def test_evaluate_cli_inception_score(reference, tmp_path):
    """`ldm-jax evaluate --images=DIR --inception_score` reads the PNGs and gives the torch reference's score."""
    import json
    import subprocess
    import sys

    from PIL import Image

    model, path, state = reference
    images = _smooth_images(20, 24)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    out = tmp_path / "is.json"
    proc = subprocess.run([sys.executable, "-m", "ldm_jax", "evaluate", f"--images={folder}", "--inception_score",
                           f"--inception_weights={path}", f"--out={out}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    with torch.no_grad():
        pool = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0][:, :, 0, 0]
    want = _torch_inception_score(pool.mm(state["fc.weight"].T), 10)
    np.testing.assert_allclose((result["inception_score"], result["inception_score_std"]), want, rtol=1e-5)


def test_inception_score_matches_torch_on_synthetic_logits():
    logits = np.random.default_rng(0).normal(size=(103, 50)) * np.linspace(0.1, 8.0, 103)[:, None]
    for splits in (1, 7, 10):  # 103 rows: unequal chunks
        np.testing.assert_allclose(inception_score(logits, splits),
                                   _torch_inception_score(torch.from_numpy(logits), splits), rtol=1e-12)
    # shuffle_seed=2020: rows permuted as torch-fidelity does by default before splitting
    perm = np.random.RandomState(2020).permutation(len(logits))
    np.testing.assert_allclose(inception_score(logits, 10, shuffle_seed=2020),
                               _torch_inception_score(torch.from_numpy(logits[perm]), 10), rtol=1e-12)


def test_inception_score_closed_forms():
    # p(y|x) uniform (any per-row constant): every KL is 0 -> IS = 1 in every chunk
    flat = np.repeat(np.arange(30.0)[:, None], 1008, axis=1)
    np.testing.assert_allclose(inception_score(flat, 10), (1.0, 0.0), atol=1e-12)
    # confident labels over k classes, each equally often in every chunk -> IS = k (KL = log k per image)
    k, n = 5, 60
    logits = np.zeros((n, 20))
    logits[np.arange(n), np.arange(n) % k] = 60.0
    for splits in (1, 4, 12):
        mean, std = inception_score(logits, splits)
        np.testing.assert_allclose(mean, k, rtol=1e-9)
        assert std < 1e-9
    # a class with (numerically) zero probability everywhere contributes 0, not 0 * log 0 = nan
    dead = np.concatenate([logits, np.full((n, 1), -1e4)], axis=1)
    np.testing.assert_allclose(inception_score(dead, 4), inception_score(logits, 4), rtol=1e-12)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits[:3], 10)
    with pytest.raises(ValueError, match="NaN"):
        inception_score(np.full((10, 3), np.nan), 2)


def test_classifier_weights_are_optional_for_features(reference, tmp_path):
    _, _, state = reference
    numpy_state = {k: v.numpy() for k, v in state.items()}
    full = inception.params_from_state_dict(numpy_state)
    assert full["fc"]["kernel"].shape == (2048, inception.NUM_CLASSES) and full["fc"]["bias"].shape == (1008,)
    np.testing.assert_array_equal(full["fc"]["kernel"], numpy_state["fc.weight"].T)
    assert set(inception.param_shapes(fc=True)) - set(inception.param_shapes()) == {"fc/kernel", "fc/bias"}
    # without fc: loads (FID features need no classifier), and only logits fail, naming the missing key
    trunk = inception.params_from_state_dict({k: v for k, v in numpy_state.items() if not k.startswith("fc.")})
    assert "fc" not in trunk and not inception.has_classifier(trunk)
    inception.inception_feature_fn(trunk, mesh=data_mesh(jax.devices()[:1]))
    with pytest.raises(ConversionError, match=r"fc\.weight") as info:
        inception.inception_logits_fn(trunk)
    assert "\n" not in str(info.value)
    with pytest.raises(ConversionError, match=r"fc\.weight"):
        inception.inception_apply(trunk, np.zeros((1, 8, 8, 3), np.uint8), output="logits")
    with pytest.raises(ValueError, match="output must be one of"):
        inception.inception_apply(full, np.zeros((1, 8, 8, 3), np.uint8), output="probs")
    # a torch-free copy without fc loads the same way
    from ldm_jax.convert.common import flatten, write_safetensors
    write_safetensors(tmp_path / "trunk.safetensors", flatten(trunk))
    assert not inception.has_classifier(inception.load_params(tmp_path / "trunk.safetensors"))
    # a half or foreign classifier is a strict-check error, not silently dropped
    with pytest.raises(ConversionError, match="missing 1: fc/bias"):
        inception.params_from_state_dict({k: v for k, v in numpy_state.items() if k != "fc.bias"})
    wrong = dict(numpy_state, **{"fc.weight": np.zeros((1000, 2048), np.float32),
                                 "fc.bias": np.zeros(1000, np.float32)})
    with pytest.raises(ConversionError, match="shape mismatch 2"):
        inception.params_from_state_dict(wrong)
