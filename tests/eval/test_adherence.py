"""Prompt adherence: the shapes checker wrapped per held-out / seen combination."""

import numpy as np
import pytest

from ldm_jax.data import shapes
from ldm_jax.eval import adherence


def _render(prompts, resolution=32):
    attrs = shapes.attrs_from_captions(prompts)
    size = np.where(attrs["size"] < 0, 1, attrs["size"])
    return np.stack([shapes.render(c, s, p, z, resolution)
                     for c, s, p, z in zip(attrs["color"], attrs["shape"], attrs["position"], size)])


def test_prompts_split_and_ground_truth_scores_perfectly():
    prompts = adherence.adherence_prompts(12, split="all", seed=0)
    attrs = shapes.attrs_from_captions(prompts)
    held = adherence.heldout_mask(attrs["color"], attrs["shape"])
    assert held.sum() == 6 and len(prompts) == 12
    assert all(adherence.heldout_mask(*[shapes.attrs_from_captions(adherence.adherence_prompts(
        5, split="heldout", seed=3))[k] for k in ("color", "shape")]))
    scores = adherence.prompt_adherence(_render(prompts), prompts)
    assert scores["all_acc"] == 1.0 and scores["heldout/all_acc"] == 1.0 and scores["seen/all_acc"] == 1.0
    assert scores["heldout/n"] == 6 and scores["seen/n"] == 6


def test_wrong_colors_on_heldout_prompts_show_up_in_the_heldout_group():
    prompts = adherence.adherence_prompts(8, split="all", seed=1)
    attrs = shapes.attrs_from_captions(prompts)
    held = adherence.heldout_mask(attrs["color"], attrs["shape"])
    # the "model" draws the right shape/position but a wrong color for every held-out prompt
    wrong = {k: v.copy() for k, v in attrs.items()}
    wrong["color"][held] = (wrong["color"][held] + 1) % len(shapes.COLORS)
    size = np.where(wrong["size"] < 0, 1, wrong["size"])
    images = np.stack([shapes.render(c, s, p, z, 32) for c, s, p, z in
                       zip(wrong["color"], wrong["shape"], wrong["position"], size)])
    scores = adherence.prompt_adherence(images, prompts)
    assert scores["heldout/color_acc"] == 0.0 and scores["heldout/shape_acc"] == 1.0
    assert scores["seen/color_acc"] == 1.0
    assert scores["color_acc"] == pytest.approx(1 - held.mean())
    # index-array attributes (as in a shapes batch) give the same result
    again = adherence.prompt_adherence(images, attrs)
    assert again["heldout/color_acc"] == 0.0 and again["n"] == 8


def test_generate_and_score_and_errors():
    scores = adherence.generate_and_score(_render, 6, seed=2, batch_size=4, split="seen")
    assert scores["all_acc"] == 1.0 and scores["heldout/n"] == 0 and np.isnan(scores["heldout/color_acc"])
    with pytest.raises(ValueError, match="must name a color and a shape"):
        adherence.prompt_adherence(np.zeros((1, 32, 32, 3), np.uint8), ["something at the top"])
    with pytest.raises(ValueError, match="unknown split"):
        adherence.adherence_prompts(3, split="train")
