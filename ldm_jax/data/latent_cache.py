"""Latent cache: autoencoder posteriors and text-encoder outputs precomputed once, read by the same pipeline.

``build_latent_cache`` runs the source dataset once, in order and without augmentation, through
``encode_images_fn`` (images in [-1, 1], (B, H, W, C) -> posterior ``(mean, std)``) and ``encode_text_fn``
(captions -> (B, L, D) array or dict of arrays), and writes one array_record record per example plus
``manifest.json`` (record layout, shapes, dtypes, encoder ids, source settings) and ``uncond.npz`` (the text
arrays of the empty caption, used for caption dropout); `latent_records.py` holds the record format and the
reader, `LatentCache`, which the input pipeline uses. The latent diffusion stage then reads
``DataConfig(latent_cache=out_dir, ...)``: shuffled, sharded and checkpointable like images, with batches
``latent_mean``, ``latent_std``, the text arrays, ``caption`` and ``index``; it draws
``z = mean + std * eps`` itself each step, as in Rombach et al. (2022), Sec. 3.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import grain
import numpy as np

from ldm_jax.data.common import DataError
from ldm_jax.data.latent_records import _FORMAT_VERSION, MANIFEST, RECORDS, UNCOND, LatentCache, encode_record
from ldm_jax.data.pipeline import DataConfig, collate, global_dataset, make_iterator
from ldm_jax.data.shard_stream import SOURCE_NAME
from ldm_jax.types import ConfigError

_RESERVED = ("latent_mean", "latent_std", "caption", "index")
# Source settings that change the cached content; a cache is reused only when they match.
_SOURCE_KEYS = ("name", "split", "data_dir", "builder_kwargs", "resolution", "channels", "center_crop",
                "image_key", "caption_key", "caption_template")


def _field_specs(arrays: Mapping[str, np.ndarray]) -> list[dict]:
    return [{"name": k, "shape": list(v.shape[1:]), "dtype": v.dtype.str} for k, v in arrays.items()]


def _as_text_arrays(out) -> dict[str, np.ndarray]:
    arrays = {k: np.asarray(v) for k, v in out.items()} if isinstance(out, Mapping) else {
        "text_embedding": np.asarray(out)}
    clash = [k for k in arrays if k in _RESERVED]
    if clash:
        raise ValueError(f"encode_text_fn returned reserved key(s) {clash}; rename them")
    return arrays


def _pad(batch: np.ndarray, size: int) -> np.ndarray:
    if len(batch) == size:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])


def _source_settings(cfg) -> dict:
    return json.loads(json.dumps({k: getattr(cfg, k) for k in _SOURCE_KEYS}))


def _reuse_existing(out: Path, settings: dict, encoder_ids: dict, overwrite: bool) -> bool:
    if not (out / MANIFEST).exists() or overwrite:
        return False
    manifest = json.loads((out / MANIFEST).read_text())
    if manifest.get("source") == settings and manifest.get("encoder_ids") == encoder_ids:
        return True
    raise DataError(f"latent cache {out} was built from other data or encoders; use another out_dir "
                    "or overwrite=True")


def _records_name(process_index: int, process_count: int) -> str:
    return RECORDS if process_count == 1 else f"latents-{process_index:05d}-of-{process_count:05d}.array_record"


def _shard_records_name(shard_id: int) -> str:
    return f"latents-shard-{shard_id:06d}.array_record"


_SHARD_RECORDS_GLOB = "latents-shard-*.array_record"


class _RecordFiles:
    """Array-record writers, one open at a time: the records of one key (a shard id, or 0 for the process's part)
    arrive together and go to the file `name(key)`."""

    def __init__(self, out: Path, name: Callable[[int], str]):
        self.out, self.name, self.key, self.writer, self.written = out, name, None, None, set()

    def open(self, key: int) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        self.close()
        if key in self.written:
            raise DataError(f"latent cache: the records of {self.name(key)} did not arrive together")
        self.key, self.writer = key, ArrayRecordWriter(str(self.out / self.name(key)), "group_size:1")

    def write(self, key: int, record: bytes) -> None:
        if key != self.key:
            self.open(key)
        self.writer.write(record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.written.add(self.key)
            self.writer = None


def build_latent_cache(
    source_cfg,
    encode_images_fn: Callable[[np.ndarray], tuple],
    encode_text_fn: Callable[[list[str]], object],
    out_dir: str | os.PathLike,
    batch_size: int,
    *,
    encoder_ids: Mapping[str, str] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[str], None] | None = None,
) -> LatentCache:
    """Encodes every example of `source_cfg`'s split once and writes the cache to `out_dir`.

    Both encoders always see full batches of `batch_size` (the last one padded), so jitted encoders
    compile once. A cache already in `out_dir` built from the same source settings and `encoder_ids`
    is reused. `dtype` ("float32" or "float16") is the stored precision; reading gives float32.

    Several processes (`process_count` > 1, `out_dir` on storage they share, `barrier(name)` a collective that
    returns when every process called it) build it together: process p encodes the contiguous p-th part of
    the examples into its own record file, then process 0 writes the manifest listing the files in order, so
    the cache is the same, example for example, as one process would write. A streamed shard set
    (``name="shards"``) is read once, unshuffled: each process encodes the shards dealt to it, one record file per
    shard (``latents-shard-{shard id:06d}.array_record``), and process 0 lists the files in shard order, so the
    cache (records, their order, the manifest) is the same whatever the number of processes: every readable
    example, by shard id and then place in its shard.
    """
    from tqdm.auto import tqdm

    cfg = source_cfg if isinstance(source_cfg, DataConfig) else DataConfig.from_config(source_cfg)
    if dict(cfg.builder_kwargs or ()).get("buckets"):
        raise ConfigError("data.latent_cache with aspect-ratio buckets is not supported yet (its records have one "
                          "shape): set data.latent_cache='' so the VAE encodes each bucketed batch in the step")
    cfg = cfg.replace(shuffle=False, flip=False, caption_dropout=0.0, num_epochs=1, drop_remainder=False,
                      batch_size=batch_size, latent_cache=None)
    out, encoder_ids = Path(out_dir).expanduser(), dict(encoder_ids or {})
    settings = _source_settings(cfg)
    if process_count > 1 and barrier is None:
        raise ValueError("building a latent cache with several processes needs their barrier")
    if _reuse_existing(out, settings, encoder_ids, overwrite):
        return LatentCache(out)
    streamed = cfg.name == SOURCE_NAME
    if process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        for old in out.glob(_SHARD_RECORDS_GLOB) if streamed else ():
            old.unlink()  # an earlier build's: the manifest lists the files that exist
    if barrier is not None:
        barrier("ldm_jax_latent_cache_start")
    if streamed:  # each process encodes the shards dealt to it, in order, into one file per shard
        iterator = make_iterator(cfg.replace(batch_size=batch_size * process_count), process_index=process_index,
                                 process_count=process_count)
        num_examples, total, files = None, None, _RecordFiles(out, _shard_records_name)
    else:
        examples, num_examples = global_dataset(cfg)
        start = process_index * num_examples // process_count
        stop = (process_index + 1) * num_examples // process_count
        batches = examples[start:stop].batch(batch_size, drop_remainder=False, batch_fn=collate)
        iterator = iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                                  prefetch_buffer_size=cfg.prefetch)))
        total = math.ceil((stop - start) / batch_size)
        files = _RecordFiles(out, lambda _: _records_name(process_index, process_count))
        files.open(0)
    fields, store = None, np.dtype(dtype)
    try:
        for batch in tqdm(iterator, total=total, desc="latent cache", disable=process_index != 0):
            n = len(batch["index"])
            mean, std = encode_images_fn(_pad(batch["image"], batch_size))
            text = _as_text_arrays(encode_text_fn(list(batch["caption"]) + [""] * (batch_size - n)))
            arrays = {"latent_mean": np.asarray(mean, store)[:n], "latent_std": np.asarray(std, store)[:n]}
            arrays.update({k: (v.astype(store) if v.dtype.kind == "f" else v)[:n] for k, v in text.items()})
            arrays.update({k: v for k, v in batch.items() if k not in ("image", "caption")})
            fields = fields or _field_specs(arrays)
            # streamed: index = shard id * 2**32 + place in the shard (`shard_stream`)
            keys = np.asarray(batch["index"]) >> 32 if streamed else np.zeros(n, np.int64)
            for i in range(n):
                files.write(int(keys[i]), encode_record(fields, arrays, i, str(batch["caption"][i])))
    finally:
        files.close()
    uncond = _as_text_arrays(encode_text_fn([""] * batch_size))
    if barrier is not None:
        barrier("ldm_jax_latent_cache_encoded")
    if process_index == 0:
        if fields is None:
            raise DataError(f"process 0 encoded no examples for the latent cache {out} ({process_count} "
                            "processes): use fewer processes than examples")
        np.savez(out / UNCOND, **{k: (v.astype(store) if v.dtype.kind == "f" else v)[0] for k, v in uncond.items()})
        if streamed:  # the shards' files written by all processes, in shard order
            names = [_shard_records_name(s) for s in range(iterator.num_shards)]
            records = [name for name in names if (out / name).exists()]
        else:
            records = [_records_name(p, process_count) for p in range(process_count)]
        if num_examples is None:
            num_examples = len(grain.sources.ArrayRecordDataSource([str(out / name) for name in records]))
        manifest = {"format_version": _FORMAT_VERSION, "num_examples": num_examples, "fields": fields,
                    "encoder_ids": encoder_ids, "source": settings, "stored_dtype": store.name,
                    "records": records}
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(out / MANIFEST)  # written last: its presence marks a complete cache
    if barrier is not None:
        barrier("ldm_jax_latent_cache_written")
    return LatentCache(out)

