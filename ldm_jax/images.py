"""The one set of image helpers: uint8 conversion, input images and masks, PNG files with metadata, grids.

Everything that writes or scores images (generation, training grids, evaluation, the demo) uses these, so one
rounding rule holds everywhere. Interfaces are uint8 (B, H, W, 3); inside jitted code images are float in
[-1, 1] (the VAE's range): ``x = u8 / 127.5 - 1`` and back ``u8 = round(255 clip((x + 1) / 2, 0, 1))`` with
round-half-to-even (the rounding diffusers' ``numpy_to_pil`` uses), in and out of jit.
Masks are (B, H, W, 1) floats, binarised at 0.5: 1 where new
content is generated, 0 where the input image is kept (diffusers' convention: white = repaint).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image, PngImagePlugin

from ldm_jax.types import Array, ConfigError


def to_uint8(images: Array) -> Array:
    """[-1, 1] floats -> uint8 with round(255 clip((x + 1) / 2, 0, 1)), in float32; in jit a jax array, on numpy
    input a numpy array (the same values)."""
    xp = np if isinstance(images, np.ndarray) else jnp
    x = xp.asarray(images, xp.float32)
    return xp.round(xp.clip(x * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(xp.uint8)


def as_image_batch(image, what: str = "image") -> np.ndarray:
    """A PIL image, a path, an (H, W, 3) or (B, H, W, 3) uint8 array (or a list of those) -> uint8 (B, H, W, 3).

    Float arrays are taken as [0, 1] images. Grayscale and RGBA inputs are converted to RGB.
    """
    if isinstance(image, (list, tuple)):
        parts = [as_image_batch(i, what) for i in image]
        sizes = {p.shape[1:3] for p in parts}
        if len(sizes) > 1:
            raise ConfigError(f"{what}: all images must have the same size, got {sorted(sizes)}")
        return np.concatenate(parts, axis=0)
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (1, 4):
        arr = arr[..., :1].repeat(3, -1) if arr.shape[-1] == 1 else arr[..., :3]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ConfigError(f"{what} has shape {arr.shape}; expected (H, W, 3) or (B, H, W, 3) RGB")
    return _to_u8(arr, what)


def as_mask_batch(mask, what: str = "mask") -> np.ndarray:
    """A PIL image, a path, an (H, W), (H, W, 1) or (B, H, W[, 1]) array -> float32 (B, H, W, 1) in {0, 1}.

    uint8 masks are divided by 255, color masks converted to luminance (PIL's "L"); then binarised:
    1 where the value is >= 0.5 (repaint), 0 below (keep).
    """
    if isinstance(mask, (list, tuple)):
        return np.concatenate([as_mask_batch(m, what) for m in mask], axis=0)
    if isinstance(mask, (str, os.PathLike)):
        mask = load_image(mask, mode="L")
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    arr = np.asarray(mask)
    if arr.ndim == 2:
        arr = arr[None, ..., None]
    elif arr.ndim == 3:
        arr = arr[..., None] if arr.shape[-1] != 1 else arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 1:
        raise ConfigError(f"{what} has shape {np.shape(mask)}; expected (H, W), (H, W, 1) or (B, H, W, 1)")
    values = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    return (values >= 0.5).astype(np.float32)


def _to_u8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
            raise ConfigError(f"{what}: float images must lie in [0, 1] (got [{arr.min():.3g}, {arr.max():.3g}])")
        return np.round(arr * 255.0).astype(np.uint8)
    raise ConfigError(f"{what}: dtype {arr.dtype} is not supported; pass uint8 or float [0, 1] images")


def to_model_range(images_u8: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (x / 127.5 - 1, i.e. 2 (x / 255) - 1)."""
    return images_u8.astype(np.float32) / 127.5 - 1.0


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Opens an image file with a one-line error when it is missing or unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"image file '{path}' not found")
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except OSError as e:
        raise ConfigError(f"cannot read image '{path}': {e}") from None


def resize(images: np.ndarray, height: int, width: int, *, mask: bool = False) -> np.ndarray:
    """Resizes a uint8 (B, H, W, 3) batch (Lanczos) or a float mask batch (nearest) to (height, width)."""
    if images.shape[1:3] == (height, width):
        return images
    out = []
    for im in images:
        if mask:
            pil = Image.fromarray((im[..., 0] * 255).astype(np.uint8), "L").resize((width, height), Image.NEAREST)
            out.append((np.asarray(pil)[..., None] >= 128).astype(np.float32))
        else:
            out.append(np.asarray(Image.fromarray(im).resize((width, height), Image.LANCZOS)))
    return np.stack(out)


def save_png(path: str | os.PathLike, image: np.ndarray, metadata: Mapping[str, object] | None = None) -> None:
    """Writes a uint8 (H, W, 3) image as PNG with `metadata` as tEXt chunks (values converted with str).

    The file appears whole or not at all (written beside it, then renamed)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), "" if value is None else str(value))
    path = os.fspath(path)
    tmp = path + ".tmp.png"
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, pnginfo=info)
    os.replace(tmp, path)


def generated_names(count: int, seed: int) -> list[str]:
    """File names of `count` generated images of a call with `seed`: ``{i:04d}-seed{seed + i}.png``."""
    return [f"{i:04d}-seed{seed + i}.png" for i in range(count)]


def save_generated(folder: str | os.PathLike, images: np.ndarray, prompts: Sequence[str], seed: int,
                   metadata: Mapping[str, object]) -> list[str]:
    """Writes generated image i as `generated_names`' file with its prompt, its seed (seed + i) and `metadata` in
    PNG text chunks (what ``ldm-jax sample`` and ``ldm-jax evaluate --save_images`` write); returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (name, image) in enumerate(zip(generated_names(len(images), seed), images, strict=True)):
        path = os.path.join(os.fspath(folder), name)
        save_png(path, image, dict(prompt=prompts[i], seed=seed + i, **metadata))
        paths.append(path)
    return paths


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The tEXt chunks of a PNG file as a dict."""
    with Image.open(os.fspath(path)) as im:
        im.load()
        return dict(getattr(im, "text", {}) or {})


def make_grid(images: Sequence[np.ndarray] | np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles uint8 (H, W, 3) images row by row into one image; `cols` defaults to ceil(sqrt(n))."""
    images = np.asarray(images)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = im
    return grid
