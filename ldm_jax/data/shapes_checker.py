"""Analytic attribute checker for shapes images: scores any image (generated, noisy, ...) against a caption.

Per image, with no learned component:

1. Object: pixels farther than ``fg_threshold`` (RGB Euclidean) from the white background are foreground;
   the largest 4-connected foreground component is the object.
2. Color: the palette color whose direction from the background best matches the median offset of the
   object's most saturated half (cosine score), so colors washed out by blur still classify.
3. Coverage: each pixel near the object is unmixed as ``pixel = (1 - a) * background + a * color``.
4. Shape: the coverage's mass and centroid fix, for each candidate shape, the square box it would occupy
   (area ratios 1, pi/4, 1/2; the apex-up triangle's centroid sits 2/3 down its box); the candidate whose
   template (the dataset's own coverage function, optionally Gaussian-blurred) has the highest soft IoU
   ``sum(min(a, t)) / sum(max(a, t))`` with the coverage wins.
5. Position: the 3x3 grid cell of the winning box's center. Size: small/large by its side relative to a
   cell, thresholded halfway between the two rendered sizes.

Ground-truth images score 100% at 32, 48, 64 and 128 px, also under Gaussian noise (std 0.15 in [-1, 1])
and a 1-px Gaussian blur.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ldm_jax.data import shapes

_KEYS = ("color", "shape", "position", "size")


def _to_rgb255(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (B, H, W, 3) or (B, H, W, 1), got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.dtype.kind in "ui":
        return images.astype(np.float32)
    # Float images are taken to be in [-1, 1], the pipeline's range.
    return np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0.0, 255.0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of the largest 4-connected component of `mask` (label propagation)."""
    out = np.zeros_like(mask)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return out
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    mask = mask[crop]
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    for _ in range(h * w):
        grown = labels.copy()
        grown[1:, :] = np.maximum(grown[1:, :], labels[:-1, :])
        grown[:-1, :] = np.maximum(grown[:-1, :], labels[1:, :])
        grown[:, 1:] = np.maximum(grown[:, 1:], labels[:, :-1])
        grown[:, :-1] = np.maximum(grown[:, :-1], labels[:, 1:])
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    out[crop] = labels == ids[np.argmax(counts)]
    return out


# Area of each shape relative to its (square) bounding box.
_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (taps to 4 sigma) with zero padding: mass leaving the canvas is dropped."""
    if sigma <= 0:
        return image
    radius = int(np.ceil(4 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    h, w = image.shape
    padded = np.zeros((h + 2 * radius, w))
    padded[radius:radius + h] = image
    image = sum(t * padded[k:k + h] for k, t in enumerate(taps))
    padded = np.zeros((h, w + 2 * radius))
    padded[:, radius:radius + w] = image
    return sum(t * padded[:, k:k + w] for k, t in enumerate(taps))


def _coverage_estimate(rgb: np.ndarray, color: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per-pixel coverage a in [0, 1] from pixel = (1 - a) * background + a * color, inside `region`."""
    bg = np.asarray(shapes.BACKGROUND, np.float32)
    direction = color - bg
    alpha = ((rgb - bg) @ direction) / float(direction @ direction)
    return np.where(region, np.clip(alpha, 0.0, 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class ShapesChecker:
    """Predicts (color, shape, position, size) indices of shapes images and scores them against attributes.

    Attributes:
      fg_threshold: RGB distance from the background above which a pixel is foreground. The palette
        colors lie 248-320 away from white, so 100 keeps anti-aliased edges and ignores moderate noise.
      blur_sigmas: Gaussian blurs (pixels) applied to the shape templates before matching, so that soft
        images (an autoencoder's or a sampler's) are matched against equally soft templates.
    """

    fg_threshold: float = 100.0
    blur_sigmas: tuple[float, ...] = (0.0, 0.75, 1.5)

    def predict(self, images) -> dict[str, np.ndarray]:
        """Index arrays {"color", "shape", "position", "size"}; -1 where no object was found."""
        rgb = _to_rgb255(images)
        dist = np.linalg.norm(rgb - np.asarray(shapes.BACKGROUND, np.float32), axis=-1)
        preds = {k: np.full(rgb.shape[0], -1, np.int64) for k in _KEYS}
        for i in range(rgb.shape[0]):
            obj = largest_component(dist[i] > self.fg_threshold)
            if obj.any():
                for key, value in self._predict_one(rgb[i], dist[i], obj).items():
                    preds[key][i] = value
        return preds

    def _predict_one(self, rgb: np.ndarray, dist: np.ndarray, obj: np.ndarray) -> dict[str, int]:
        h, w = obj.shape
        bg = np.asarray(shapes.BACKGROUND, np.float32)
        palette = np.asarray([shapes.RGB[c] for c in shapes.COLORS], np.float32)
        core = dist[obj] >= np.median(dist[obj])
        # Nearest palette direction from the background: robust to colors washed out by blur.
        offset = np.median(rgb[obj][core], axis=0) - bg
        directions = (palette - bg) / np.linalg.norm(palette - bg, axis=-1, keepdims=True)
        color = int(np.argmax(directions @ offset))
        alpha = _coverage_estimate(rgb, palette[color], _dilate(_dilate(obj)))
        mass = alpha.sum()
        if mass <= 1e-6:
            return {"color": color}
        ys, xs = np.mgrid[:h, :w] + 0.5
        cx, cy = (alpha * xs).sum() / mass, (alpha * ys).sum() / mass
        # Match templates inside a window around the object (cheap at any resolution).
        half = int(np.ceil(np.sqrt(mass / _AREA["triangle"]) + 3 * max(self.blur_sigmas) + 2))
        ox, oy = int(cx) - half, int(cy) - half
        window = np.pad(alpha, 2 * half)[oy + 2 * half:oy + 4 * half, ox + 2 * half:ox + 4 * half]
        best = (-1.0, 0, 0.0, (cx, cy))
        for index, name in enumerate(shapes.SHAPES):
            side = np.sqrt(mass / _AREA[name])
            y0 = cy - (2 / 3 if name == "triangle" else 1 / 2) * side  # centroid of the apex-up triangle
            box = (cx - side / 2 - ox, y0 - oy, cx + side / 2 - ox, y0 + side - oy)
            sharp = shapes.coverage_map(name, box, 2 * half)
            for sigma in self.blur_sigmas:
                template = _gaussian_blur(sharp, sigma)
                iou = np.minimum(window, template).sum() / np.maximum(window, template).sum()
                if iou > best[0]:
                    best = (iou, index, side, (cx, y0 + side / 2))
        _, shape, side, (bx, by) = best
        col, row = min(max(int(bx / (w / 3)), 0), 2), min(max(int(by / (h / 3)), 0), 2)
        size = int(side / (max(h, w) / 3) > 0.5 * (shapes.SIZE_FRACTION[0] + shapes.SIZE_FRACTION[1]))
        return {"color": color, "shape": shape, "position": 3 * row + col, "size": size}

    def score(self, images, attrs) -> dict[str, float]:
        """Accuracy per attribute of `images` against `attrs` (see `score_images`)."""
        target = _as_index_attrs(attrs)
        preds = self.predict(images)
        n = len(preds["color"])
        if any(len(v) != n for v in target.values()):
            raise ValueError(f"got {n} images but attributes for {len(next(iter(target.values())))}")
        result: dict[str, float] = {}
        all_ok = np.ones(n, bool)
        for key in _KEYS:
            given = target.get(key, np.full(n, -1))
            named = given >= 0
            ok = preds[key] == given
            all_ok &= ok | ~named
            result[f"{key}_acc"] = float(ok[named].mean()) if named.any() else float("nan")
        result["all_acc"] = float(all_ok.mean()) if n else float("nan")
        result["detected"] = float((preds["color"] >= 0).mean()) if n else float("nan")
        result["n"] = n
        return result


def _as_index_attrs(attrs) -> dict[str, np.ndarray]:
    """Attribute index arrays from captions (sequence of str) or a mapping of index or name arrays."""
    if isinstance(attrs, Mapping):
        vocab = {"color": shapes.COLORS, "shape": shapes.SHAPES, "position": shapes.POSITIONS,
                 "size": shapes.SIZES}
        out = {}
        for key in _KEYS:
            if key not in attrs:
                continue
            values = np.asarray(attrs[key])
            if values.dtype.kind in "USO":
                values = np.asarray([vocab[key].index(str(v)) if v else -1 for v in values])
            out[key] = values.astype(np.int64).reshape(-1)
        if "color" not in out or "shape" not in out:
            raise ValueError(f"attrs need at least 'color' and 'shape', got keys {sorted(attrs)}")
        return out
    if isinstance(attrs, Sequence | np.ndarray):
        return shapes.attrs_from_captions(list(attrs))
    raise ValueError(f"attrs must be a mapping of arrays or a list of captions, got {type(attrs).__name__}")


def score_images(images, attrs, *, fg_threshold: float = 100.0) -> dict[str, float]:
    """Scores images against shapes attributes.

    Args:
      images: uint8 in [0, 255] or float in [-1, 1], shape (B, H, W, 3), any resolution.
      attrs: a list of B captions (parsed with `shapes.caption_to_attrs`; attributes a caption does not
        name are not scored) or a mapping {"color", "shape", "position", "size"} of (B,) index or name
        arrays, as in a shapes batch (-1 = not scored).

    Returns:
      {"color_acc", "shape_acc", "position_acc", "size_acc", "all_acc", "detected", "n"}; an image with no
      object counts as wrong on every attribute.
    """
    return ShapesChecker(fg_threshold=fg_threshold).score(images, attrs)
