"""The one set of image helpers: uint8 conversion, input images and masks, PNG files with metadata, grids.

Everything that reads, writes or scores images (generation, training grids, evaluation, the image_folder dataset,
the demo) uses these, so one rounding rule holds everywhere; every image file is read by `load_rgb` (or its
siblings `load_mask` and `read_image`), which turns any mode Pillow reads into the RGB a viewer shows.
Interfaces are uint8 (B, H, W, 3); inside jitted code images are float in [-1, 1] (the VAE's range):
``x = u8 / 127.5 - 1`` and back ``u8 = round(255 clip((x + 1) / 2, 0, 1))`` with round-half-to-even (the
rounding diffusers' ``numpy_to_pil`` uses), in and out of jit. Masks are (B, H, W, 1) floats, binarised at 0.5:
1 where new content is generated, 0 where the input image is kept (diffusers' convention: white = repaint).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from ldm_jax.types import Array, ConfigError


def to_uint8(images: Array) -> Array:
    """[-1, 1] floats -> uint8 with round(255 clip((x + 1) / 2, 0, 1)), in float32; in jit a jax array, on numpy
    input a numpy array (the same values)."""
    xp = np if isinstance(images, np.ndarray) else jnp
    x = xp.asarray(images, xp.float32)
    return xp.round(xp.clip(x * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(xp.uint8)


def as_image_batch(image, what: str = "image") -> np.ndarray:
    """A PIL image, a path, an (H, W, 3) or (B, H, W, 3) uint8 array (or a list of those) -> uint8 (B, H, W, 3).

    Files and PIL images go through `load_rgb` (every mode, EXIF orientation, transparency over white). Float
    arrays are taken as [0, 1] images; (..., 1) arrays are gray, (..., 4) arrays RGBA composited over white.
    """
    if isinstance(image, (list, tuple)):
        parts = [as_image_batch(i, what) for i in image]
        sizes = {p.shape[1:3] for p in parts}
        if len(sizes) > 1:
            raise ConfigError(f"{what}: all images must have the same size, got {sorted(sizes)}")
        return np.concatenate(parts, axis=0)
    if isinstance(image, (str, os.PathLike, Image.Image)):
        return load_rgb(image, what)[None]
    arr = np.asarray(image)
    if arr.ndim in (3, 4) and arr.shape[-1] in (1, 4):
        arr = _to_u8(arr, what)
        arr = arr.repeat(3, -1) if arr.shape[-1] == 1 else _over(arr[..., :3], arr[..., 3], 255)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ConfigError(f"{what} has shape {arr.shape}; expected (H, W, 3) or (B, H, W, 3) RGB")
    return _to_u8(arr, what)


def as_mask_batch(mask, what: str = "mask") -> np.ndarray:
    """A PIL image, a path, an (H, W), (H, W, 1) or (B, H, W[, 1]) array -> float32 (B, H, W, 1) in {0, 1}.

    Files and PIL images go through `load_mask` (luminance; transparent pixels count as black = keep); uint8
    arrays are divided by 255; then binarised: 1 where the value is >= 0.5 (repaint), 0 below (keep).
    """
    if isinstance(mask, (list, tuple)):
        return np.concatenate([as_mask_batch(m, what) for m in mask], axis=0)
    if isinstance(mask, (str, os.PathLike, Image.Image)):
        mask = load_mask(mask, what)
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


# 16-bit (and 32-bit integer) grayscale modes: values in [0, 65535] are mapped to 8 bits by round(v / 257).
_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# What Pillow's decoders raise on a damaged or unsupported file.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


def load_rgb(source: str | os.PathLike | Image.Image, what: str = "image") -> np.ndarray:
    """The one image reader: a file or PIL image of any mode Pillow reads -> uint8 (H, W, 3), as a viewer shows it.

    - EXIF orientation is applied (the array is upright);
    - "I;16"/"I;16B"/"I;16L"/"I" (16-bit gray; "I" read as the same 0..65535 range, clipped): v -> round(v / 257);
    - "F": values in [0, 1] are scaled by 255, otherwise read as the 0..65535 range of "I" (NaN -> 0);
      (so a PIL image that Pillow itself converted from "L" to "I", "I;16" or "F", which keeps 0..255, loads
      dark: pass such images as "L" or as arrays);
    - 16-bit RGB/RGBA PNGs (no 48-bit mode in Pillow; it keeps the high byte): floor(v / 256), within one level
      of round(v / 257) and exact for 8-bit images stored as v * 257;
    - transparency ("RGBA", "LA", "PA", "RGBa", "P" or "L"/"RGB"/"I;16" with a transparent colour) is
      composited over white;
    - "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV": Pillow's conversion to RGB (embedded ICC profiles are not
      applied; CMYK is converted without one).
    Animated files give their first frame. Missing, unreadable or empty (0-pixel) images raise a one-line
    ConfigError naming the file.
    """
    color, alpha = _decode(source, what)[:2]
    return color if alpha is None else _over(color, alpha, 255)


def load_mask(source: str | os.PathLike | Image.Image, what: str = "mask") -> np.ndarray:
    """A mask file or PIL image of any mode -> uint8 (H, W) luminance (ITU-R 601, Pillow's "L").

    Decoded as `load_rgb` does, except that transparency is composited over black: transparent pixels are 0
    (keep), so white strokes on a transparent layer mark the repainted region.
    """
    color, alpha = _decode(source, what)[:2]
    rgb = color if alpha is None else _over(color, alpha, 0)
    return np.asarray(Image.fromarray(rgb).convert("L"))


def read_image(path: str | os.PathLike, what: str = "image") -> tuple[np.ndarray, dict[str, str]]:
    """(`load_rgb`'s uint8 (H, W, 3), the file's PNG text chunks) from one decode of `path`."""
    color, alpha, text = _decode(path, what)
    return (color if alpha is None else _over(color, alpha, 255)), text


def _decode(source, what: str) -> tuple[np.ndarray, np.ndarray | None, dict[str, str]]:
    """(uint8 (H, W, 3) colour, uint8 (H, W) alpha or None, PNG text chunks) of an upright image."""
    where = what
    if not isinstance(source, Image.Image):
        source = os.fspath(source)
        if not os.path.isfile(source):
            raise ConfigError(f"{what} file '{source}' not found")
        where = f"{what} '{source}'"
    try:
        if isinstance(source, Image.Image):
            return _pixels(_upright(source, where), where) + ({},)
        with Image.open(source) as im:
            im.load()
            text = dict(getattr(im, "text", None) or {})
            return _pixels(_upright(im, where), where) + (text,)
    except ConfigError:
        raise
    except _DECODE_ERRORS as e:
        raise ConfigError(f"cannot read {where}: {_one_line(e)}") from None


def _upright(im: Image.Image, where: str) -> Image.Image:
    if im.width == 0 or im.height == 0:
        raise ConfigError(f"{where} has no pixels ({im.width}x{im.height})")
    return ImageOps.exif_transpose(im)


def _pixels(im: Image.Image, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 (H, W, 3) colour, uint8 (H, W) alpha or None) of a PIL image (see `load_rgb` for the rules)."""
    if im.mode in _WIDE_GRAY or im.mode == "F":
        values = np.nan_to_num(np.asarray(im, np.float64), nan=0.0, posinf=65535.0, neginf=0.0)
        alpha = None
        if im.mode != "F" and "transparency" in im.info:
            alpha = np.where(values == im.info["transparency"], 0, 255).astype(np.uint8)
        scale = 255.0 if im.mode == "F" and values.max() <= 1.0 else 1.0 / 257.0
        gray = np.round(np.clip(values * scale, 0.0, 255.0)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1), alpha
    try:
        if im.has_transparency_data:
            rgba = np.asarray(im.convert("RGBA"))
            return rgba[..., :3], rgba[..., 3]
        return np.asarray(im.convert("RGB")), None
    except ValueError as e:  # a mode Pillow cannot convert to RGB
        raise ConfigError(f"{where}: cannot convert mode {im.mode} to RGB ({_one_line(e)})") from None


def _over(color: np.ndarray, alpha: np.ndarray, background: int) -> np.ndarray:
    """uint8 colour composited over a flat `background` grey level with uint8 `alpha` (..., H, W)."""
    a = alpha[..., None].astype(np.float32) / 255.0
    return np.round(color * a + background * (1.0 - a)).astype(np.uint8)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


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
    return read_image(path)[1]


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
