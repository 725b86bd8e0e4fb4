"""CLIP score vs transformers' CLIPModel (tiny random config), and its closed form."""

import numpy as np
import pytest
import torch

from ldm_jax.eval.clip_score import CLIPScorer, clip_score
from ldm_jax.models.clip_vision import CLIP_MEAN, CLIP_STD, preprocess
from ldm_jax.models.tokenizers import CLIPTokenizer
from tests.convert.test_hf_vision import save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    return save_tiny_clip(path), path


def test_clip_score_matches_transformers(clip_dir):
    model, path = clip_dir
    scorer = CLIPScorer.from_pretrained(path)  # no tokenizer files there: OpenAI's BPE, built offline
    tokenizer = scorer.tokenizer
    assert isinstance(tokenizer, CLIPTokenizer) and tokenizer.max_length == 16
    images = np.random.default_rng(2).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle", "a photo of a cat"]
    ids = tokenizer(prompts)
    pixels = np.asarray(preprocess(images, 32))
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        txt = model.get_text_features(input_ids=torch.from_numpy(ids).long())
    img = getattr(img, "pooler_output", img).numpy()
    txt = getattr(txt, "pooler_output", txt).numpy()
    np.testing.assert_allclose(scorer.image_features(images), img, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(scorer.text_features(prompts), txt, atol=1e-4, rtol=1e-4)
    cos = (img * txt).sum(-1) / np.linalg.norm(img, axis=-1) / np.linalg.norm(txt, axis=-1)
    got = scorer(images, prompts)
    assert got["clip_score"] == pytest.approx(float(np.mean(100 * np.maximum(cos, 0))), abs=1e-3)


def test_clip_score_closed_form_and_preprocess():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    np.testing.assert_allclose(clip_score(a, b, scale=2.5), [2.5, 2.5 / np.sqrt(2), 0.0])
    # 64x48 -> shorter side 32, center crop; a constant image maps to (c - mean) / std everywhere
    x = np.full((1, 64, 48, 3), 255, np.uint8)
    out = np.asarray(preprocess(x, 32))
    assert out.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(out[0, 5, 7], (1.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD), atol=1e-5)
    with pytest.raises(ValueError, match="RGB"):
        preprocess(np.zeros((1, 8, 8, 1)), 32)
