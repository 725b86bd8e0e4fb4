"""Small helpers shared by the dataset builders: PNG encoding, config naming, text decoding."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging

import numpy as np
from PIL import Image

logger = logging.getLogger("ldm_jax.data")


class DataError(ValueError):
    """A dataset, path or data file is missing or unusable (one-line message)."""


class OutsideTfdsMixin:
    """For tfds builders that live outside the tfds package (put it first among the bases).

    tfds looks for a checksums file next to a builder's code via ``code_path``, which for a module of an
    ordinary package imports the optional ``importlib_resources`` backport. Our builders download nothing
    with registered checksums, so they have no code path.
    """

    code_path = None


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataError(f"encode_png expects uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return decode_text(value.item())
    return str(value)


def options_digest(options) -> str:
    """Eight hex digits identifying a JSON-serializable mapping of options."""
    text = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def config_fields(config_cls) -> dict:
    """The dataset-specific fields of a tfds BuilderConfig dataclass and their defaults."""
    import tensorflow_datasets as tfds

    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {f.name: f.default for f in dataclasses.fields(config_cls) if f.name not in base}
