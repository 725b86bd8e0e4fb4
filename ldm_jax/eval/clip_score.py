"""CLIP score: image-text agreement measured with a user-supplied CLIP model (no weights ship).

    scorer = CLIPScorer.from_pretrained("clip-vit-large-patch14")   # HF CLIPModel folder (+ tokenizer files)
    scorer(images, prompts)     # {"clip_score": mean, "clip_score_std": std}

CLIPScore (Hessel et al. 2021) is w * max(cos(E_I, E_T), 0) between the projected image and text
embeddings; diffusion papers and torchmetrics use w = 100 (our default), Hessel et al. use w = 2.5.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.hf_vision import CLIPWeights, load_clip
from ldm_jax.eval.frechet import ShardedFeatureFn
from ldm_jax.models.clip_vision import CLIPVisionEncoder, preprocess
from ldm_jax.models.text import CLIPTextEncoder


def clip_score(image_feats, text_feats, *, scale: float = 100.0) -> np.ndarray:
    """Per-pair CLIP score scale * max(cos(image_i, text_i), 0) of (B, P) image and text embeddings."""
    a, b = np.asarray(image_feats, np.float64), np.asarray(text_feats, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"image and text features must both be (B, P), got {a.shape} and {b.shape}")
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return scale * np.maximum(cos, 0.0)


class CLIPScorer:
    """Projected CLIP image and text embeddings, and their CLIP score.

    `tokenizer` maps prompts to int ids (B, L) (e.g. ``ldm_jax.models.tokenizers.CLIPTokenizer``).
    Image embeddings are computed with the batch sharded over all devices.
    """

    def __init__(self, weights: CLIPWeights, tokenizer=None, *, mesh=None, batch_size: int | None = None):
        self.weights = weights
        self.tokenizer = tokenizer
        vision = CLIPVisionEncoder(weights.vision_config)
        size = weights.vision_config.image_size
        self._images = ShardedFeatureFn(
            lambda p, x: vision.apply({"params": p}, preprocess(x, size)).image_embeds,
            weights.vision_params, mesh=mesh, batch_size=batch_size)
        text = CLIPTextEncoder(weights.text_config)
        proj = jnp.asarray(weights.text_projection)
        self._text = jax.jit(lambda p, ids: text.apply({"params": p}, ids, return_pooled=True)[1] @ proj)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> CLIPScorer:
        """An HF CLIPModel folder; its tokenizer files are used when present, else OpenAI's BPE offline."""
        from ldm_jax.models.tokenizers import CLIPTokenizer

        weights = load_clip(path)
        max_length = weights.text_config.max_length
        try:
            tokenizer = CLIPTokenizer.from_dir(Path(path), max_length=max_length)
        except FileNotFoundError:
            tokenizer = CLIPTokenizer.default(max_length=max_length)
        return cls(weights, tokenizer, **kwargs)

    def image_features(self, images) -> np.ndarray:
        """(B, H, W, 3) uint8 or float in [-1, 1] -> projected image embeddings (B, P)."""
        return self._images(images)

    def text_features_from_ids(self, input_ids) -> np.ndarray:
        return np.asarray(self._text(self.weights.text_params, jnp.asarray(input_ids, jnp.int32)))

    def text_features(self, prompts: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError("CLIPScorer has no tokenizer: pass one, or call text_features_from_ids")
        return self.text_features_from_ids(self.tokenizer(list(prompts)))

    def __call__(self, images, prompts: Sequence[str], *, scale: float = 100.0) -> dict[str, float]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        scores = clip_score(self.image_features(images), self.text_features(prompts), scale=scale)
        return {"clip_score": float(scores.mean()), "clip_score_std": float(scores.std())}
