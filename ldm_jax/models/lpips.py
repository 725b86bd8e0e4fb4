"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features"), VGG16.

    d(x, y) = sum_l  mean_hw  sum_c  w_l[c] * (f_l(x)[h, w, c] / |f_l(x)[h, w]| - f_l(y)[h, w, c] / |f_l(y)[h, w]|)^2

f_l are VGG16's activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (Simonyan & Zisserman 2015)
of the input rescaled by LPIPS's per-channel shift/scale; |.| is the channel L2 norm (+1e-10); w_l >= 0 are
the learned "lin" layers (1x1 convolutions without bias). Inputs are NHWC images in [-1, 1].

Weights come only from local files (nothing is downloaded): the VGG16 trunk from torchvision's ImageNet
state dict (``vgg16-397923af.pth``, keys ``features.<i>.weight|bias``) and the lin layers from the lpips
package's ``weights/v0.1/vgg.pth`` (keys ``lin<l>.model.1.weight``). The LDM autoencoder recipe adds
``perceptual_weight * LPIPS(x, x_rec)`` to the reconstruction loss (``autoencoder.perceptual_weight``).
"""

from __future__ import annotations

import os
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ldm_jax.types import Array, ConfigError, PyTree

# torchvision's vgg16().features indices of the 3x3 convolutions, grouped by the tap that ends each block
BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class LPIPS(nn.Module):
    """``LPIPS()({"params": p}, x, y) -> (B,)`` distances of NHWC image pairs in [-1, 1] (see module doc)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS takes two (B, H, W, 3) batches of one shape, got {x.shape} and {y.shape}")
        b = x.shape[0]
        h = (jnp.concatenate([x, y]).astype(jnp.float32) - SHIFT) / SCALE  # one trunk pass for both
        total = jnp.zeros((b,), jnp.float32)
        for level, (block, chans) in enumerate(zip(BLOCKS, CHANNELS)):
            if level:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for index in block:
                h = nn.relu(nn.Conv(chans, (3, 3), padding=1, dtype=self.dtype, name=f"features_{index}")(h))
            f = h.astype(jnp.float32)
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
            diff = jnp.square(f[:b] - f[b:])
            w = self.param(f"lin{level}", nn.initializers.ones_init(), (chans,), jnp.float32)
            total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", diff, w), axis=(1, 2))
        return total


def _read_torch(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"{what} not found at '{path}': give the local file's path (nothing is downloaded)")
    try:
        import torch
    except ImportError:
        raise ConfigError(f"reading {what} ('{path}') needs torch: pip install torch") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file
        raise ConfigError(f"'{path}' is not a readable PyTorch state dict ({type(e).__name__})") from None
    return {k: v.detach().float().numpy() for k, v in state.items()}


def params_from_state_dicts(vgg: dict, lin: dict) -> PyTree:
    """Flax params from torchvision VGG16 (``features.<i>.*``) and lpips lin (``lin<l>.model.1.weight``) dicts."""
    params, missing = {}, []
    for block in BLOCKS:
        for i in block:
            w, b = vgg.get(f"features.{i}.weight"), vgg.get(f"features.{i}.bias")
            if w is None or b is None:
                missing.append(f"features.{i}.weight/bias")
                continue
            params[f"features_{i}"] = {"kernel": np.transpose(w, (2, 3, 1, 0)), "bias": b}
    for level, chans in enumerate(CHANNELS):
        key = next((k for k in (f"lin{level}.model.1.weight", f"lin{level}.model.0.weight") if k in lin), None)
        if key is None:
            missing.append(f"lin{level}.model.1.weight")
            continue
        if lin[key].shape != (1, chans, 1, 1):
            raise ConfigError(f"LPIPS lin layer {key} has shape {lin[key].shape}, expected (1, {chans}, 1, 1)")
        params[f"lin{level}"] = lin[key].reshape(chans)
    if missing:
        raise ConfigError(f"LPIPS weights lack {len(missing)} entries (first: {missing[0]}): give torchvision's "
                          "vgg16 state dict and the lpips package's weights/v0.1/vgg.pth")
    return params


def load_lpips(vgg_path: str | os.PathLike, lin_path: str | os.PathLike) -> PyTree:
    """LPIPS-VGG params from the two local weight files (see the module doc)."""
    return params_from_state_dicts(_read_torch(Path(vgg_path), "the VGG16 weights"),
                                   _read_torch(Path(lin_path), "the LPIPS lin-layer weights"))
