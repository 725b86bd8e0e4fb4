"""FID Inception-v3 port vs pytorch-fid's own model (torchvision blocks) with shared random weights."""

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
    return model, path


def test_pool_features_match_pytorch_fid(reference, tmp_path):
    model, path = reference
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
