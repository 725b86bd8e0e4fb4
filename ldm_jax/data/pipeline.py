"""grain input pipeline: shuffle, decode, resize/crop, flip, [-1, 1] scaling, caption dropout, tokenization,
per-host sharding, and a checkpointable iterator.

Order of one epoch (identical on every host): the source (a prepared tfds dataset, or a latent cache) is
shuffled with ``seed`` (grain's index shuffle, reseeded each epoch), each example is preprocessed with a
generator seeded by (seed, its global position), epochs are concatenated and, when finite, cut to a
multiple of the global batch. Global batch k is positions ``[k B, (k + 1) B)``; host ``p`` of ``P`` takes
its contiguous block ``[k B + p B / P, k B + (p + 1) B / P)``, so the hosts' rows laid side by side are
the global batch in order: hosts are disjoint, their union is the epoch, and neither the batches nor their
row order depend on the number of hosts or threads. The iterator state is grain's (JSON-serializable)
position, which counts global batches and is the same on every host, so a restored iterator yields exactly
the batches an uninterrupted one would — also on another number of hosts (elastic resume: a run saved by
P hosts continues on P' hosts with the next global batch; no example is skipped or seen twice).

Batches are dicts of numpy arrays: ``image`` float32 (B, H, W, C) in [-1, 1] (or ``latent_mean`` /
``latent_std`` and text arrays from a latent cache), ``caption`` (B,) str after dropout, ``index`` (B,) the
example's position in the source, numeric metadata of the dataset (``label``, shapes' ``color``, ...), and
the tokenizer's outputs (``input_ids``, ...) when a tokenizer is given.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import grain
import jax
import numpy as np

from ldm_jax.data import _grain_compat, builders, latent_records, shard_stream, shards
from ldm_jax.data.common import decode_text
from ldm_jax.data.tokenize import as_tokenize_fn
from ldm_jax.types import ConfigError, FrozenConfig

_STATE_VERSION = 1
# Fields that fix the order of examples: a saved state only applies to a pipeline with the same values.
# (num_workers changes the format of grain's state, not the order.)
_ORDER_FIELDS = ("name", "split", "latent_cache", "seed", "shuffle", "batch_size", "num_epochs", "drop_remainder",
                 "num_workers")


@dataclasses.dataclass(frozen=True)
class DataConfig(FrozenConfig):
    """Typed view of the ``data`` config section (``DataConfig.from_config(cfg.data)``).

    Attributes:
      name: a builder of ours (shapes, openmoji, fashion_mnist, image_folder), a tfds catalog name, or "shards"
        (streamed tar shards; builder_kwargs ``paths``, ``shuffle_buffer``, ``buckets``: see `shard_stream`).
      builder_kwargs: options of the builder (e.g. shapes ``num_train``, image_folder ``path``); shapes and
        openmoji are built at ``resolution`` unless a ``resolution`` is given here.
      batch_size: the global batch; each of P hosts gets batch_size / P examples per step.
      num_epochs: None repeats forever (training); an int stops after that many epochs.
      caption_template: caption of catalog datasets that only have a ClassLabel ``label``.
      latent_cache: read a cache written by `build_latent_cache` instead of images (no image augmentation).
      num_threads, prefetch: grain reader threads and prefetch buffer, in batches.
      num_workers: >0 adds that many reader processes (grain mp_prefetch; the tokenizer must pickle, and
        the program needs a ``if __name__ == "__main__"`` guard). The batches are the same for any value.
    """

    name: str = "shapes"
    split: str = "train"
    data_dir: str | None = None
    builder_kwargs: Any = ()
    download: bool = False
    resolution: int = 32
    channels: int = 3
    center_crop: bool = True
    flip: bool = False
    batch_size: int = 16
    drop_remainder: bool = True
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    caption_dropout: float = 0.0
    image_key: str = "image"
    caption_key: str = "caption"
    caption_template: str = "a photo of a {label}"
    max_length: int = 77
    num_threads: int = 2
    prefetch: int = 4
    num_workers: int = 0
    latent_cache: str | None = None

    def __post_init__(self):
        checks = [
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.resolution > 0, f"resolution must be positive, got {self.resolution}"),
            (self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}"),
            (0.0 <= self.caption_dropout <= 1.0, f"caption_dropout must be in [0, 1], got {self.caption_dropout}"),
            (self.num_epochs is None or self.num_epochs > 0, f"num_epochs must be None or > 0, got {self.num_epochs}"),
            (self.num_threads >= 0 and self.num_workers >= 0, "num_threads and num_workers must be >= 0"),
            (not (self.latent_cache and self.flip), "flip does not apply to a latent cache; set data.flip=False"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"DataConfig: {message}")

    @classmethod
    def from_run_config(cls, config, **overrides) -> DataConfig:
        """The typed ``data`` section of a run config ("" means None for data_dir and latent_cache), with
        `overrides` replacing fields."""
        d = config.data
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d or {})
        for key in ("data_dir", "latent_cache"):
            if d.get(key) == "":
                d[key] = None
        return cls.from_config({**d, **overrides})

    @property
    def builder_options(self) -> dict:
        options = dict(self.builder_kwargs or ())
        if self.name in ("shapes", "openmoji"):
            options.setdefault("resolution", self.resolution)
        return options


# ----------------------------------------------------------------------------------------------- examples
@dataclasses.dataclass(frozen=True)
class ToExample:
    """Maps a decoded tfds record to {"image", "caption", "index", numeric metadata...}."""

    image_key: str
    caption_key: str | None
    label_names: tuple[str, ...] | None = None
    caption_template: str = "a photo of a {label}"

    def __call__(self, index: int, record: dict) -> dict:
        if self.caption_key is not None:
            caption = decode_text(record[self.caption_key])
        elif self.label_names is not None:
            label = self.label_names[int(record["label"])].replace("_", " ")
            caption = self.caption_template.format(label=label)
        else:
            caption = ""
        example = {"image": np.asarray(record[self.image_key]), "caption": caption, "index": np.int64(index)}
        for key, value in record.items():
            if key not in (self.image_key, self.caption_key) and not isinstance(value, (bytes, str)):
                value = np.asarray(value)
                if value.ndim == 0 and value.dtype.kind in "iufb":
                    example[key] = value
        return example


def _to_example_fn(result: builders.BuildResult, cfg: DataConfig) -> ToExample:
    features = result.builder.info.features
    if cfg.image_key not in features:
        raise ConfigError(f"dataset '{cfg.name}' has no image feature '{cfg.image_key}'; set data.image_key")
    caption_key, names = (cfg.caption_key if cfg.caption_key in features else None), None
    if caption_key is None and "label" in features and hasattr(features["label"], "names"):
        names = tuple(features["label"].names)
    return ToExample(cfg.image_key, caption_key, names, cfg.caption_template)


def resize_image(image: np.ndarray, resolution: int, center_crop: bool) -> np.ndarray:
    """uint8 (H, W, C) -> (resolution, resolution, C): shorter side to `resolution` then a center crop, or
    a plain (aspect-changing) resize when `center_crop` is False. Bicubic, antialiased when shrinking."""
    return shards.fit_image(image, resolution, resolution, center_crop)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (H, W, C) with C in {1, 3, 4} -> C = `channels` (alpha composited on white; ITU-R 601 luma)."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255.0
        image = np.round(image[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    if image.shape[-1] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=-1)
    luma = image.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
    return np.round(luma)[..., None].astype(np.uint8)


_MIRROR_WORDS = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}


def mirror_caption(caption: str) -> str:
    """Swaps the words left/right, so that a caption still describes its horizontally flipped image."""
    return re.sub(r"\b(left|right|Left|Right)\b", lambda m: _MIRROR_WORDS[m.group(1)], caption)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Per-example random transform (grain random_map): channels, resize/crop, flip, caption dropout.

    A flipped example also gets its caption mirrored (left <-> right) and, for shapes, its grid position.
    """

    resolution: int
    channels: int
    center_crop: bool
    flip: bool
    caption_dropout: float
    uncond: dict | None = None  # latent cache: text arrays of the empty caption
    mirror_position: bool = False  # shapes: mirror the 3x3 grid `position` label on flips

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        example = dict(example)
        if "image" in example:
            image = to_channels(example["image"], self.channels)
            image = resize_image(image, self.resolution, self.center_crop)
            if self.flip and rng.random() < 0.5:
                image = image[:, ::-1]
                example["caption"] = mirror_caption(example["caption"])
                if self.mirror_position and "position" in example:
                    row, col = divmod(int(example["position"]), 3)
                    example["position"] = np.asarray(3 * row + 2 - col, example["position"].dtype)
            example["image"] = np.ascontiguousarray(image)
        if self.caption_dropout > 0 and rng.random() < self.caption_dropout:
            example["caption"] = ""
            example.update(self.uncond or {})
        return example


def collate(examples: list[dict]) -> dict[str, np.ndarray]:
    """Stacks examples; uint8 images become float32 in [-1, 1], captions a str array."""
    batch = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key == "caption":
            batch[key] = np.asarray(values, dtype=np.str_)
        elif key == "image":
            batch[key] = np.stack(values).astype(np.float32) / 127.5 - 1.0
        else:
            batch[key] = np.stack(values)
    return batch


@dataclasses.dataclass(frozen=True)
class Tokenize:
    """Batch transform adding the tokenizer's arrays (``input_ids``, maybe ``attention_mask``)."""

    fn: Any

    def __call__(self, batch: dict) -> dict:
        out = self.fn([str(c) for c in batch["caption"]])
        arrays = dict(out) if hasattr(out, "keys") else {"input_ids": out}
        n = len(batch["caption"])
        for key, value in arrays.items():
            value = np.asarray(value)
            if value.shape[:1] != (n,):
                raise ValueError(f"tokenizer returned '{key}' of shape {value.shape} for {n} captions")
            batch[key] = value.astype(np.int32) if value.dtype.kind in "iub" else value
        return batch


# ----------------------------------------------------------------------------------------------- pipeline
def _open_source(cfg: DataConfig):
    """(random-access source, record -> example map_with_index fn, text arrays of "" or None)."""
    if cfg.latent_cache:
        cache = latent_records.LatentCache(cfg.latent_cache)
        return cache, cache.to_example, cache.uncond
    result = builders.prepare(cfg.name, data_dir=cfg.data_dir, download=cfg.download, **cfg.builder_options)
    return result.source(cfg.split), _to_example_fn(result, cfg), None


@dataclasses.dataclass(frozen=True)
class _SourceIndex:
    """map_with_index sees positions in the repeated stream; examples carry their position in the source."""

    fn: Any
    num_examples: int

    def __call__(self, index: int, record):
        return self.fn(index % self.num_examples, record)


def global_dataset(cfg: DataConfig) -> tuple[grain.MapDataset, int]:
    """The MapDataset of every host's preprocessed examples in global order (module docstring) and the epoch
    size."""
    return host_dataset(cfg, 0, 1)


def host_dataset(cfg: DataConfig, process_index: int, process_count: int) -> tuple[grain.MapDataset, int]:
    """This host's MapDataset of per-host batches (module docstring: host p's block of every global batch) and
    the epoch size; with ``process_count=1``, the examples themselves (not batched)."""
    if cfg.batch_size % process_count:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by process_count {process_count}")
    if process_count > 1 and not cfg.drop_remainder:
        raise ConfigError("several hosts need data.drop_remainder=True so that they all take the same steps")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in [0, {process_count})")
    source, to_example, uncond = _open_source(cfg)
    num_examples = len(source)
    if num_examples == 0 or (cfg.drop_remainder and num_examples * (cfg.num_epochs or 1) < cfg.batch_size):
        what = f"latent cache {cfg.latent_cache}" if cfg.latent_cache else f"'{cfg.name}' split {cfg.split}"
        raise ConfigError(f"{what} has {num_examples} examples: too few for batch_size {cfg.batch_size}")
    ds = grain.MapDataset.source(source).map_with_index(_SourceIndex(to_example, num_examples))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    preprocess = Preprocess(cfg.resolution, cfg.channels, cfg.center_crop, cfg.flip, cfg.caption_dropout, uncond,
                            mirror_position=cfg.name == "shapes" and not cfg.latent_cache)
    ds = ds.random_map(preprocess, seed=(cfg.seed + 0x9E3779B9) % 2**32)
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)
    if cfg.num_epochs is not None and cfg.drop_remainder:
        ds = ds[: len(ds) // cfg.batch_size * cfg.batch_size]
    if process_count == 1:
        return ds, num_examples
    # blocks of B / P examples: block q = k P + p is host p's part of global batch k
    per_host = cfg.batch_size // process_count
    return ds.batch(per_host, drop_remainder=True, batch_fn=collate)[process_index::process_count], num_examples


class DataIterator:
    """Iterator over this host's batches whose position can be saved and restored.

    ``get_state()`` returns a JSON-serializable dict (grain's position plus the settings that fix the
    example order); ``set_state(state)`` resumes exactly there, and refuses a state saved under different
    order-fixing settings with a one-line ConfigError.
    """

    def __init__(self, iterator, fingerprint: dict, *, num_examples: int, per_host_batch_size: int):
        self._iterator = iterator
        self._fingerprint = fingerprint
        self.num_examples = num_examples
        self.per_host_batch_size = per_host_batch_size
        self.steps_per_epoch = num_examples // fingerprint["batch_size"]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        return {"version": _STATE_VERSION, "fingerprint": dict(self._fingerprint),
                "grain": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "grain" not in state:
            raise ConfigError("set_state expects a dict from DataIterator.get_state()")
        saved = state.get("fingerprint", {})
        for key, value in self._fingerprint.items():
            if saved.get(key, value) != value:
                raise ConfigError(
                    f"data iterator state was saved with {key}={saved[key]!r} but this pipeline has "
                    f"{key}={value!r}; restore with the same data settings or start the data afresh"
                )
        self._iterator.set_state(state["grain"])

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def make_iterator(cfg, *, tokenizer=None, process_index: int = 0,
                  process_count: int = 1) -> DataIterator | shard_stream.ShardIterator:
    """Batches of `cfg` (a DataConfig, ConfigDict or mapping) for host `process_index` of `process_count`.

    `tokenizer`: a callable list[str] -> (B, L) int array or dict of arrays, a transformers tokenizer
    (padded/truncated to ``cfg.max_length``) or a `tokenizers.Tokenizer`; its outputs join the batch.
    ``name="shards"`` streams webdataset-layout tar shards instead (`shard_stream`: same batches and interface).
    """
    cfg = cfg if isinstance(cfg, DataConfig) else DataConfig.from_config(cfg)
    if cfg.name == shard_stream.SOURCE_NAME and not cfg.latent_cache:
        tokenize = Tokenize(as_tokenize_fn(tokenizer, cfg.max_length)) if tokenizer is not None else None
        fns = shard_stream.BatchFns(to_channels, mirror_caption, collate, tokenize)
        return shard_stream.make_shard_iterator(cfg, fns, process_index=process_index, process_count=process_count)
    ds, num_examples = host_dataset(cfg, process_index, process_count)
    per_host = cfg.batch_size // process_count
    # Batches are formed on the MapDataset, so each reader thread or process builds whole batches and
    # the stream does not depend on num_threads or num_workers.
    if process_count == 1:
        ds = ds.batch(per_host, drop_remainder=cfg.drop_remainder, batch_fn=collate)
    if tokenizer is not None:
        ds = ds.map(Tokenize(as_tokenize_fn(tokenizer, cfg.max_length)))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch))
    if cfg.num_workers > 0:
        _grain_compat.ensure_absl_flags_parsed()  # grain's reader processes read absl flags
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    fingerprint = {k: getattr(cfg, k) for k in _ORDER_FIELDS}
    fingerprint.update(num_examples=num_examples)  # the position counts global batches: any host count resumes it
    return DataIterator(iter(it_ds), fingerprint, num_examples=num_examples, per_host_batch_size=per_host)


def make_global_batch(batch: dict, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Global jax.Arrays from this host's batch (`jax.make_array_from_process_local_data`).

    `sharding` splits the leading (batch) axis over devices, e.g. ``NamedSharding(mesh, P("data"))``;
    string arrays (captions) stay on the host and are left out.
    """
    return {
        key: jax.make_array_from_process_local_data(sharding, value)
        for key, value in batch.items()
        if np.asarray(value).dtype.kind not in "USO"
    }
