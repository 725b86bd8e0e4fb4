"""Tokenizer adapters: anything that turns a list of captions into fixed-length integer arrays.

The pipeline accepts a plain callable ``list[str] -> (B, L) int array | dict of (B, L) arrays``, a
transformers tokenizer (called with ``padding="max_length", truncation=True``) or a `tokenizers.Tokenizer`
(e.g. the ``tokenizer.json`` of a BERT/CLIP checkpoint, padded and truncated on a private copy).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class HFTokenizerFn:
    """A transformers tokenizer as list[str] -> {"input_ids", "attention_mask"} of (B, max_length)."""

    tokenizer: Any
    max_length: int

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        out = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return {k: np.asarray(out[k], np.int32) for k in ("input_ids", "attention_mask") if k in out}


class FastTokenizerFn:
    """A `tokenizers.Tokenizer` as list[str] -> {"input_ids", "attention_mask"} of (B, max_length)."""

    def __init__(self, tokenizer, max_length: int):
        from tokenizers import Tokenizer

        self.max_length = max_length
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())  # private copy: padding is stateful
        padding = tokenizer.padding or {}
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.enable_padding(
            length=max_length, pad_id=padding.get("pad_id", 0), pad_token=padding.get("pad_token", "[PAD]")
        )

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self._tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.asarray([e.ids for e in encodings], np.int32),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int32),
        }

    def __reduce__(self):  # picklable for multiprocess readers
        return (_fast_from_str, (self._tokenizer.to_str(), self.max_length))


def _fast_from_str(text: str, max_length: int) -> FastTokenizerFn:
    from tokenizers import Tokenizer

    return FastTokenizerFn(Tokenizer.from_str(text), max_length)


def as_tokenize_fn(tokenizer, max_length: int):
    """Wraps `tokenizer` (see module docstring) into a list[str] -> array(s) callable."""
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "to_str"):
        return FastTokenizerFn(tokenizer, max_length)
    if hasattr(tokenizer, "model_max_length") and hasattr(tokenizer, "pad_token_id"):
        return HFTokenizerFn(tokenizer, max_length)
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer must be callable or a (transformers/tokenizers) tokenizer, got {type(tokenizer)}")
