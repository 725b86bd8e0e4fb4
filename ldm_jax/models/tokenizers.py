"""Tokenizers for the text encoders, returning fixed-length int32 numpy arrays ready for jit.

- `CLIPTokenizer`: CLIP's byte-level BPE through transformers' (>= 5) ``CLIPTokenizer``, from an HF
  tokenizer folder or, offline, from the BPE merges shipped in the ``open_clip_torch`` wheel.
  Every prompt becomes ``[BOS, tokens..., EOS, PAD...]`` of exactly `max_length` (77) ids, truncated to
  keep BOS and EOS, padded with the folder's pad token (SD-1.x: ``<|endoftext|>`` = 49407; SD-2.x:
  ``!`` = 0), as Stable Diffusion pipelines do.
- `WordPieceTokenizer`: BERT WordPiece through the ``tokenizers`` library from a ``tokenizer.json``
  (``[CLS] tokens... [SEP] [PAD]...``), for the MiniLM default encoder.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_OPEN_CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # OpenAI's vocabulary: 256 bytes x 2 (+ "</w>"), merges, BOS, EOS = 49408


def _as_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {bad[0]}; pass a list of str")
    return prompts


# ---------------------------------------------------------------------------- CLIP BPE
def byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for the bytes 0..255.

    Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, in that
    order; the remaining bytes, in increasing order, take the code points 256, 257, ...
    Returned in vocabulary order (the printable ones first); ``byte_alphabet()[i]`` is not byte i.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def open_clip_bpe_file() -> Path:
    """Path of ``open_clip/bpe_simple_vocab_16e6.txt.gz`` in the installed open_clip_torch wheel."""
    try:
        files = importlib.metadata.files("open_clip_torch") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == _OPEN_CLIP_BPE:
            return Path(f.locate())
    raise FileNotFoundError(
        f"{_OPEN_CLIP_BPE} not found: run `pip install --no-deps open_clip_torch` (only its vocab is used)"
    )


def clip_vocab_and_merges(bpe_file: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple]]:
    """OpenAI CLIP's vocab (49408 entries) and merges (48894 pairs) from the gzipped BPE merge list.

    Vocabulary order: the byte alphabet, the same with the end-of-word mark "</w>", one entry per merge
    (the two halves joined), then BOS and EOS.
    """
    path = Path(bpe_file) if bpe_file is not None else open_clip_bpe_file()
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    alphabet = byte_alphabet()
    words = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    return {w: i for i, w in enumerate(words)}, merges


class CLIPTokenizer:
    """Fixed-length CLIP tokenization: ``tok(["a photo of a cat"]) -> int32 (1, 77)``."""

    def __init__(self, hf_tokenizer, max_length: int = 77):
        self.hf = hf_tokenizer
        self.max_length = int(max_length)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, max_length: int | None = None) -> CLIPTokenizer:
        """An HF tokenizer folder (vocab.json + merges.txt, or tokenizer.json; e.g. SD's ``tokenizer/``).

        Special tokens (pad!) and ``model_max_length`` come from the folder's config files.
        """
        from transformers import CLIPTokenizer as HFCLIPTokenizer

        path = Path(path)
        has_files = (path / "tokenizer.json").is_file() or (
            (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
        )
        if not has_files:
            raise FileNotFoundError(
                f"'{path}' holds no CLIP tokenizer: expected vocab.json + merges.txt or tokenizer.json"
            )
        hf = HFCLIPTokenizer.from_pretrained(str(path))
        if max_length is None:
            folder_max = hf.model_max_length
            max_length = folder_max if isinstance(folder_max, int) and folder_max <= 4096 else 77
        return cls(hf, max_length)

    @classmethod
    def default(cls, max_length: int = 77, pad_token: str = EOS) -> CLIPTokenizer:
        """OpenAI's CLIP tokenizer built offline from open_clip's BPE file (SD-1.x pads with EOS;
        pass ``pad_token="!"`` for SD-2.x's padding with id 0)."""
        from transformers import CLIPTokenizer as HFCLIPTokenizer

        vocab, merges = clip_vocab_and_merges()
        hf = HFCLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length)
        return cls(hf, max_length)

    @property
    def pad_id(self) -> int:
        return int(self.hf.pad_token_id)

    @property
    def bos_id(self) -> int:
        return int(self.hf.bos_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def tokenize(self, prompts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids, mask), both int32 (B, max_length); mask is 1 on BOS, tokens and EOS, 0 on padding."""
        out = self.hf(
            _as_prompts(prompts), padding="max_length", truncation=True, max_length=self.max_length,
            return_tensors="np",
        )
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    def __call__(self, prompts: Sequence[str] | str) -> np.ndarray:
        return self.tokenize(prompts)[0]

    def save(self, path: str | os.PathLike) -> None:
        """Writes an HF tokenizer folder (vocab.json, merges.txt, tokenizer.json, configs)."""
        self.hf.save_pretrained(str(path))


# ---------------------------------------------------------------------------- WordPiece
class WordPieceTokenizer:
    """BERT WordPiece from a ``tokenizer.json``: ``tokenize(prompts) -> (ids, mask)`` int32 (B, max_length)."""

    def __init__(self, tokenizer, max_length: int = 32):
        self.max_length = int(max_length)
        padding = tokenizer.padding or {}
        pad_token = padding.get("pad_token", "[PAD]")
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"tokenizer has no pad token '{pad_token}' in its vocabulary")
        tokenizer.enable_truncation(self.max_length)
        tokenizer.enable_padding(length=self.max_length, pad_id=pad_id, pad_token=pad_token)
        self.tokenizer = tokenizer
        self.pad_id = pad_id

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_length: int = 32) -> WordPieceTokenizer:
        """`path`: a tokenizer.json, or a folder holding one."""
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at '{path}'")
        return cls(Tokenizer.from_file(str(path)), max_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def tokenize(self, prompts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch(_as_prompts(prompts))
        ids = np.array([e.ids for e in encodings], dtype=np.int32).reshape(-1, self.max_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int32).reshape(-1, self.max_length)
        return ids, mask

    def __call__(self, prompts: Sequence[str] | str) -> np.ndarray:
        return self.tokenize(prompts)[0]
