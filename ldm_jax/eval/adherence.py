"""Prompt adherence on the procedural `shapes` data: does the generated image show what the prompt says?

The analytic checker of ``ldm_jax.data.shapes_checker`` reads color, shape, position (3x3 grid) and size
off any image; we score generated images against their prompts overall, and separately for prompts whose
color x shape pair was held out of training (``shapes.HELDOUT_PAIRS``): the compositional-generalization
probe. Keys: ``color_acc``, ``shape_acc``, ``position_acc``, ``size_acc``, ``all_acc`` (every named
attribute right), ``detected`` (an object was found), ``n``; the same under ``seen/`` and ``heldout/``.

    prompts = adherence_prompts(64, split="heldout", seed=0)
    scores = prompt_adherence(pipe(prompts, seed=0), prompts)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ldm_jax.data import shapes
from ldm_jax.data.shapes_checker import ShapesChecker

_ATTRS = ("color", "shape", "position", "size")


def _target_attrs(prompts_or_attrs) -> dict[str, np.ndarray]:
    if isinstance(prompts_or_attrs, Mapping):
        out = {}
        for key in _ATTRS:
            if key in prompts_or_attrs:
                values = np.asarray(prompts_or_attrs[key])
                if values.dtype.kind in "USO":
                    vocab = {"color": shapes.COLORS, "shape": shapes.SHAPES, "position": shapes.POSITIONS,
                             "size": shapes.SIZES}[key]
                    values = np.asarray([vocab.index(str(v)) if v else -1 for v in values])
                out[key] = values.astype(np.int64).reshape(-1)
        return out
    return shapes.attrs_from_captions(list(prompts_or_attrs))


def heldout_mask(color: np.ndarray, shape: np.ndarray, heldout=shapes.HELDOUT_PAIRS) -> np.ndarray:
    """True where the (color, shape) index pair is one of the held-out combinations."""
    held = {(shapes.COLORS.index(c), shapes.SHAPES.index(s)) for c, s in heldout}
    return np.asarray([(int(c), int(s)) in held for c, s in zip(color, shape)], bool)


def prompt_adherence(images, prompts_or_attrs, *, checker: ShapesChecker | None = None,
                     heldout=shapes.HELDOUT_PAIRS) -> dict[str, float]:
    """Attribute accuracies of `images` (B, H, W, 3; uint8 or float in [-1, 1]) against their prompts.

    `prompts_or_attrs`: B shapes captions, or a mapping of (B,) index or name arrays as in a shapes batch.
    Groups without images report NaN accuracies and n = 0.
    """
    images = np.asarray(images)
    target = _target_attrs(prompts_or_attrs)
    if "color" not in target or "shape" not in target or any(len(v) != len(images) for v in target.values()):
        raise ValueError(f"need a color and a shape for each of the {len(images)} images; got "
                         f"{ {k: len(v) for k, v in target.items()} }")
    if np.any(target["color"] < 0) or np.any(target["shape"] < 0):
        raise ValueError("every prompt must name a color and a shape (e.g. 'a red circle at the top')")
    checker = checker or ShapesChecker()
    out = dict(checker.score(images, target))
    held = heldout_mask(target["color"], target["shape"], heldout)
    for name, mask in (("seen", ~held), ("heldout", held)):
        if mask.any():
            group = checker.score(images[mask], {k: v[mask] for k, v in target.items()})
        else:
            group = {**{f"{k}_acc": float("nan") for k in (*_ATTRS, "all")}, "detected": float("nan"), "n": 0}
        out.update({f"{name}/{k}": v for k, v in group.items()})
    return out


def adherence_prompts(num: int, *, split: str = "all", seed: int = 0,
                      heldout=shapes.HELDOUT_PAIRS) -> list[str]:
    """`num` random shapes captions; `split` "heldout" draws only held-out color x shape pairs, "seen" only
    training pairs, "all" half of each (rounded up for heldout)."""
    if split not in ("all", "seen", "heldout"):
        raise ValueError(f"unknown split '{split}'; choose 'all', 'seen' or 'heldout'")
    rng = np.random.default_rng(seed)
    if split == "all":
        n_held = (num + 1) // 2
        return (adherence_prompts(n_held, split="heldout", seed=seed, heldout=heldout)
                + adherence_prompts(num - n_held, split="seen", seed=seed + 1, heldout=heldout))
    pairs = shapes.allowed_pairs("heldout" if split == "heldout" else "train", heldout)
    prompts = []
    for _ in range(num):
        color, shape = pairs[rng.integers(len(pairs))]
        prompts.append(shapes.make_caption(color, shape, int(rng.integers(len(shapes.POSITIONS))),
                                           int(rng.integers(len(shapes.SIZES))),
                                           int(rng.integers(len(shapes.TEMPLATES)))))
    return prompts


def generate_and_score(generate_fn: Callable[[Sequence[str]], np.ndarray], num: int, *, seed: int = 0,
                       batch_size: int = 32, split: str = "all") -> dict[str, float]:
    """Draws `num` prompts, generates batch by batch with ``generate_fn(prompts) -> images``, scores."""
    prompts = adherence_prompts(num, split=split, seed=seed)
    images = np.concatenate([np.asarray(generate_fn(prompts[i:i + batch_size]))
                             for i in range(0, num, batch_size)])
    return prompt_adherence(images, prompts)


def demo_prompts():
    """(prompts, held-out flags): every color x shape pair once at a position cycling over the grid."""
    prompts, heldout = [], []
    for i, (color, shape) in enumerate((c, s) for c in shapes.COLORS for s in shapes.SHAPES):
        where = shapes.PHRASES[(i * 4) % len(shapes.PHRASES)]
        prompts.append(f"a {color} {shape} {where}")
        heldout.append((color, shape) in shapes.HELDOUT_PAIRS)
    return prompts, heldout


def score_demo(images, prompts, heldout) -> dict:
    """color/shape/position accuracy of `images` over seen prompts, plus heldout_* over held-out ones."""
    from ldm_jax.data import score_images

    seen = [i for i, h in enumerate(heldout) if not h]
    held = [i for i, h in enumerate(heldout) if h]
    main = score_images(images[seen], [prompts[i] for i in seen])
    out = {k: float(main[k]) for k in ("color_acc", "shape_acc", "position_acc")}
    if held:
        hs = score_images(images[np.array(held)], [prompts[i] for i in held])
        out.update(heldout_color_acc=float(hs["color_acc"]), heldout_shape_acc=float(hs["shape_acc"]),
                   heldout_position_acc=float(hs["position_acc"]))
    return out
