"""Latent cache records and their reader, `LatentCache` (a grain data source); `latent_cache.py` writes them.

A cache directory holds array_record files of one record per example (``latents.array_record``, or one file per
building process or per source shard), ``manifest.json`` (record layout, shapes, dtypes, encoder ids, source
settings, and the record files in example order) and ``uncond.npz`` (the text arrays of the empty caption).
Record layout: the raw bytes of every array field in manifest order, then the UTF-8 caption.

The input pipeline reads caches through this module; the writer (`build_latent_cache`) runs the pipeline, so
it lives above it, in `latent_cache.py`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ldm_jax.data.common import DataError

MANIFEST = "manifest.json"
UNCOND = "uncond.npz"
RECORDS = "latents.array_record"
_FORMAT_VERSION = 1


def encode_record(fields: list[dict], arrays: Mapping[str, np.ndarray], i: int, caption: str) -> bytes:
    parts = [np.ascontiguousarray(arrays[f["name"]][i], dtype=np.dtype(f["dtype"])).tobytes() for f in fields]
    return b"".join(parts) + caption.encode("utf-8")


def decode_record(fields: list[dict], record: bytes) -> dict:
    out, offset = {}, 0
    for f in fields:
        dtype = np.dtype(f["dtype"])
        count = math.prod(f["shape"])
        value = np.frombuffer(record, dtype, count, offset).reshape(f["shape"])
        out[f["name"]] = value.astype(np.float32) if dtype.kind == "f" else value.copy()
        offset += count * dtype.itemsize
    out["caption"] = record[offset:].decode("utf-8")
    return out


class LatentCache:
    """Random-access reader of a latent cache directory (a grain data source)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise DataError(f"no latent cache at {self.path} ({MANIFEST} missing); build it with build_latent_cache")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format_version") != _FORMAT_VERSION:
            raise DataError(f"latent cache {self.path} has format {self.manifest.get('format_version')}, "
                            f"this code reads {_FORMAT_VERSION}; rebuild it")
        import grain

        records = self.manifest.get("records", [RECORDS])  # in example order
        self._source = grain.sources.ArrayRecordDataSource([str(self.path / name) for name in records])
        with np.load(self.path / UNCOND) as uncond:
            self.uncond = {k: uncond[k].astype(np.float32 if uncond[k].dtype.kind == "f" else uncond[k].dtype)
                           for k in uncond.files}

    @property
    def fields(self) -> list[dict]:
        return self.manifest["fields"]

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict:
        return decode_record(self.fields, self._source[i])

    @staticmethod
    def to_example(index: int, record: dict) -> dict:
        """map_with_index hook: records are already examples (their `index` is the source's)."""
        return record
