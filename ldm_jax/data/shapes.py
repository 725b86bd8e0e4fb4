"""Procedural captioned shapes: one flat-colored shape on a white background, with its attributes.

Every image shows one shape (circle, square or triangle) in one of six distinct colors, at one of the nine
cells of a 3x3 grid, in one of two sizes; its caption names the attributes through one of several templates
("a red circle in the top left", "a large blue square at the bottom", ...). The attributes are stored with
each example so that `ldm_jax.data.shapes_checker` can score any image (e.g. a generated one) against them.

The ``heldout`` split holds the color x shape pairs of ``HELDOUT_PAIRS``, which never occur in ``train`` or
``test``: a compositional-generalization probe in the spirit of CLEVR's CoGenT splits (Johnson et al., 2017).

Rendering is analytic: a pixel's coverage ``a`` is the fraction of its ``SUPERSAMPLE**2`` sub-pixel samples
inside the shape, and the pixel is ``(1 - a) * background + a * color``. The checker uses the same shape
definitions, so ground-truth images score perfectly.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.data.common import OutsideTfdsMixin, encode_png

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 205, 0),
    "purple": (150, 40, 190),
    "cyan": (0, 195, 205),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Row-major 3x3 grid: index = 3 * row + col.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
PHRASES: tuple[str, ...] = (
    "in the top left", "at the top", "in the top right", "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)
SIZES: tuple[str, ...] = ("small", "large")
# Shape extent (bounding-box side) as a fraction of a grid cell, and the center jitter allowed per size.
SIZE_FRACTION: tuple[float, ...] = (0.6, 0.9)
JITTER_FRACTION: tuple[float, ...] = (0.15, 0.05)
TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} {where}",
    "a {size} {color} {shape} {where}",
    "there is a {color} {shape} {where}",
    "a {size} {shape} colored {color}, {where}",
)
# Color x shape pairs that appear only in the `heldout` split.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
SUPERSAMPLE = 4


def shape_coverage(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of `shape` in its unit bounding box; u (x) and v (y, downwards) in [0, 1]."""
    if shape == "circle":
        return (2 * u - 1) ** 2 + (2 * v - 1) ** 2 <= 1.0
    if shape == "square":
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "triangle":  # apex at the top center, base along the bottom edge
        return (np.abs(2 * u - 1) <= v) & (v <= 1)
    raise ValueError(f"unknown shape '{shape}'; expected one of {SHAPES}")


def coverage_map(shape: str, box: tuple[float, float, float, float], resolution: int) -> np.ndarray:
    """Fraction of each pixel of a (resolution, resolution) canvas covered by `shape` drawn in `box`.

    `box` is (x0, y0, x1, y1) in pixel units (pixel i spans [i, i + 1)).
    """
    x0, y0, x1, y1 = box
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(resolution)[:, None] + offsets[None, :]).reshape(-1)
    u = (xs - x0) / max(x1 - x0, 1e-6)
    v = (xs - y0) / max(y1 - y0, 1e-6)
    inside = shape_coverage(shape, u[None, :], v[:, None])
    return inside.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))


def shape_box(position: int, size: int, resolution: int, jitter=(0.0, 0.0)) -> tuple[float, ...]:
    """Bounding box (x0, y0, x1, y1) of a shape at grid `position` with `size`; jitter in [-1, 1]^2."""
    cell = resolution / 3
    row, col = divmod(position, 3)
    extent = SIZE_FRACTION[size] * cell
    cx = (col + 0.5 + JITTER_FRACTION[size] * jitter[0]) * cell
    cy = (row + 0.5 + JITTER_FRACTION[size] * jitter[1]) * cell
    return (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)


def render(color: int, shape: int, position: int, size: int, resolution: int, jitter=(0.0, 0.0)) -> np.ndarray:
    """uint8 (resolution, resolution, 3) image of one shape; attributes are indices into the vocabularies."""
    alpha = coverage_map(SHAPES[shape], shape_box(position, size, resolution, jitter), resolution)[..., None]
    rgb = np.asarray(RGB[COLORS[color]], np.float64)
    image = (1 - alpha) * np.asarray(BACKGROUND, np.float64) + alpha * rgb
    return np.round(image).astype(np.uint8)


def make_caption(color: int, shape: int, position: int, size: int, template: int) -> str:
    return TEMPLATES[template].format(
        color=COLORS[color], shape=SHAPES[shape], where=PHRASES[position], size=SIZES[size]
    )


def caption_to_attrs(caption: str) -> dict[str, str | None]:
    """Parses a shapes caption into attribute names; a missing attribute is None.

    Works on any template: it looks for one color word, one shape word, an optional size word and the
    vertical (top/bottom) and horizontal (left/right) words of the position ("center" when neither).
    """
    words = re.findall(r"[a-z]+", caption.lower())
    found = {
        "color": next((w for w in words if w in COLORS), None),
        "shape": next((w for w in words if w in SHAPES), None),
        "size": next((w for w in words if w in SIZES), None),
    }
    row = 0 if "top" in words else 2 if "bottom" in words else 1
    col = 0 if "left" in words else 2 if "right" in words else 1
    has_position = row != 1 or col != 1 or "center" in words or "middle" in words
    found["position"] = POSITIONS[3 * row + col] if has_position else None
    return found


def attrs_from_captions(captions) -> dict[str, np.ndarray]:
    """Index arrays {"color", "shape", "position", "size"} parsed from captions; -1 where not named."""
    vocab = {"color": COLORS, "shape": SHAPES, "position": POSITIONS, "size": SIZES}
    out = {k: np.full(len(captions), -1, np.int64) for k in vocab}
    for i, caption in enumerate(captions):
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8")
        for key, name in caption_to_attrs(str(caption)).items():
            if name is not None:
                out[key][i] = vocab[key].index(name)
    return out


def allowed_pairs(split: str, heldout=HELDOUT_PAIRS) -> list[tuple[int, int]]:
    """(color, shape) index pairs a split draws from: the held-out pairs for 'heldout', the rest otherwise."""
    held = {(COLORS.index(c), SHAPES.index(s)) for c, s in heldout}
    pairs = [(c, s) for c in range(len(COLORS)) for s in range(len(SHAPES))]
    return [p for p in pairs if (p in held) == (split == "heldout")]


def sample_example(rng: np.random.Generator, resolution: int, pairs) -> dict:
    """Draws attributes, a template and a jitter from `rng` and renders the example."""
    color, shape = pairs[rng.integers(len(pairs))]
    position = int(rng.integers(len(POSITIONS)))
    size = int(rng.integers(len(SIZES)))
    template = int(rng.integers(len(TEMPLATES)))
    jitter = tuple(rng.uniform(-1.0, 1.0, size=2))
    return {
        "image": render(color, shape, position, size, resolution, jitter),
        "caption": make_caption(color, shape, position, size, template),
        "color": int(color), "shape": int(shape), "position": position, "size": size, "template": template,
    }


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    resolution: int = 32
    num_train: int = 5000
    num_test: int = 500
    num_heldout: int = 500
    seed: int = 0


class ShapesBuilder(OutsideTfdsMixin, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds builder for the procedural shapes dataset (splits: train, test, heldout)."""

    name = "shapes"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIG_CLASS = ShapesConfig

    def _info(self) -> tfds.core.DatasetInfo:
        res = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description="One flat-colored shape per image on white, captioned with its attributes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(res, res, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "color": tfds.features.ClassLabel(names=list(COLORS)),
                "shape": tfds.features.ClassLabel(names=list(SHAPES)),
                "position": tfds.features.ClassLabel(names=list(POSITIONS)),
                "size": tfds.features.ClassLabel(names=list(SIZES)),
                "template": tfds.features.Scalar(dtype=np.int32),
            }),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        sizes = {"train": cfg.num_train, "test": cfg.num_test, "heldout": cfg.num_heldout}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, num_examples: int):
        cfg = self.builder_config
        pairs = allowed_pairs(split)
        split_code = ("train", "test", "heldout").index(split)
        for i in range(num_examples):
            rng = np.random.default_rng([cfg.seed, split_code, i])
            example = sample_example(rng, cfg.resolution, pairs)
            example["image"] = encode_png(example["image"])
            yield i, example
