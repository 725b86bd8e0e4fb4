"""Streaming reader of tar shards (`shards` format): disjoint per host, shuffled with a buffer, resumable
exactly, robust to corrupt shards, with optional aspect-ratio bucketing. ``data.name="shards"`` selects it.

Config: ``data.builder_kwargs={"paths": "/data/web/*.tar", "shuffle_buffer": 1000, "buckets": None}``. ``paths`` is a
glob, a folder (its ``*.tar``), a file or a list of these (relative ones under ``data.data_dir`` when it is set);
their sorted union is the shard list, and a shard's id is its place in it. The other data fields (resolution,
channels, center_crop, flip, caption_dropout, seed, shuffle, num_epochs, drop_remainder, batch_size, num_threads,
prefetch) mean what they mean for the other sources.

Epoch rule (host p of P processes, epochs e = 0, 1, ...):
  1. The shard list is permuted by a generator seeded with (seed, e) (no permutation with shuffle=False); the
     shard at place i of the permutation belongs to host i mod P in epoch e. Each host needs at least one shard.
  2. A host reads its shards in that order through a buffer of ``shuffle_buffer`` examples: each output is a
     uniformly drawn buffer entry (counter-based randomness seeded with (seed, e, p, output number)), and the next
     example read takes its place. The buffer drains at the end of the host's share, so host p's epoch e is a
     permutation of exactly the examples of its shards, and the union over hosts of epoch e holds every example of
     every readable shard exactly once. (Mixing spans about ``shuffle_buffer`` examples: make it at least a
     shard's size.)
  3. A host's epochs follow each other without waiting for the other hosts, and batches may straddle two epochs.
     With num_epochs=None (training) every host's stream is endless, so hosts always take the same number of steps
     even when their shares differ in size; with a finite num_epochs each host stops at the end of its own last
     share, so hosts may yield different numbers of batches (use it on one process: latent caches, evaluation).
  4. Per-example randomness (flip, caption dropout) is seeded with (seed, e, shard id, place in shard): it does
     not depend on the number of hosts, threads or the prefetch depth.

Resume. ``get_state()`` is a small JSON dict: the epoch, the read cursor (shard number in the host's list of the
epoch, example within it), the buffer as the sorted places of its examples (delta-coded, zlib, base64: about a
byte per entry), the examples waiting in bucket queues, and counters. ``set_state`` re-reads those examples from their
shards, so the continued stream equals the uninterrupted one bit for bit. A state saved under other order-fixing
settings is refused with a one-line ConfigError; one saved with another process count (an elastic restart hands
every process the state of process 0) continues at the start of the next epoch, with a warning.

Corrupt shards. A shard that is missing, unreadable, truncated or without images (`shards.index_shard`) is
skipped whole at each visit, before any of its examples is used: one warning on the "ldm_jax.data" logger and its
name in ``state["corrupt_shards"]``. An example whose image cannot be decoded is skipped and counted in
``state["skipped_examples"]`` (one warning per shard). The rest of the epoch continues; ``it.stats`` has the counts.

Bucketing. With ``"buckets": [[256, 256], [192, 320], [320, 192]]`` (height, width) each example goes to the bucket
nearest in log aspect ratio (the first listed on ties) and is resized to cover it and center-cropped
(``data.resolution`` is then unused). Examples drawn from the buffer wait in their bucket's queue and a batch is
emitted as soon as one queue holds a host batch, so every batch has one shape; queues carry over epochs and are
part of the state. Bucketing needs process_count == 1 (hosts would otherwise disagree on a step's shape).

Batches are those of `pipeline`: ``image`` float32 (B, H, W, C) in [-1, 1], ``caption`` (B,) str, ``index`` (B,)
int64 = shard id * 2**32 + place in shard, and the tokenizer's arrays when a tokenizer is given.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import json
import os
import queue
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ldm_jax.data.common import DataError, logger, options_digest
from ldm_jax.data.shards import (
    IMAGE_EXTENSIONS,
    ShardError,
    ShardIndex,
    decode_image,
    example_caption,
    fit_image,
    image_extension,
    image_size,
    index_shard,
    list_shards,
    nearest_bucket,
)
from ldm_jax.types import ConfigError, nearest

SOURCE_NAME = "shards"
OPTIONS = {"paths": None, "shuffle_buffer": 1000, "buckets": None}
_STATE_VERSION = 1
_PLACE_BITS = 32  # a packed place / batch index is (shard number or id) << 32 | example within the shard
_BLOCK = 1024  # shuffle-buffer draws per block of counter-based random numbers
_OPEN_SHARDS = 4  # member indexes (and file handles) kept open
_SALT_PERM, _SALT_DRAW, _SALT_EXAMPLE = 0x5A4D, 0xD8A7, 0xE7A3


class _ShardReader:
    """Member indexes and open files of the last few shards; reads raw examples (member bytes) by (shard id, place).

    A shard that fails `index_shard` (or a read) reads as None at this visit and is checked again at the next one
    (so a transient I/O error does not drop it for good); it is warned about once and its name kept in `corrupt`.
    """

    def __init__(self, paths: list[str], root: str):
        self.paths, self.root = paths, root
        self.corrupt: dict[str, str] = {}  # name -> reason
        self._open: OrderedDict[int, tuple[ShardIndex, Any]] = OrderedDict()
        self._warned_examples: set[int] = set()

    def name(self, sid: int) -> str:
        return os.path.relpath(self.paths[sid], self.root)

    def _failed(self, sid: int, error: BaseException) -> None:
        self.forget(sid)
        if self.name(sid) not in self.corrupt:
            logger.warning("shards: skipping corrupt shard %s (%s)", self.paths[sid], error)
        self.corrupt[self.name(sid)] = str(error)

    def index(self, sid: int) -> ShardIndex | None:
        if sid in self._open:
            self._open.move_to_end(sid)
            return self._open[sid][0]
        try:
            shard = index_shard(self.paths[sid])
            handle = open(self.paths[sid], "rb")  # closed on eviction or close()
        except (ShardError, OSError) as e:
            self._failed(sid, e)
            return None
        self._open[sid] = (shard, handle)
        while len(self._open) > _OPEN_SHARDS:
            self._open.popitem(last=False)[1][1].close()
        return shard

    def read(self, sid: int, place: int) -> dict[str, bytes] | None:
        shard = self.index(sid)
        if shard is None or place >= len(shard):
            return None
        handle, out = self._open[sid][1], {}
        try:
            for ext, (offset, size) in shard.members[place].items():
                if ext in IMAGE_EXTENSIONS or ext in ("txt", "json"):
                    handle.seek(offset)
                    out[ext] = handle.read(size)
                    if len(out[ext]) != size:
                        raise ShardError(f"member {shard.keys[place]}.{ext} is cut short (the file changed)")
        except (OSError, ShardError) as e:
            self._failed(sid, e)
            return None
        return out

    def bad_example(self, sid: int, place: int, error: str) -> None:
        if sid not in self._warned_examples:
            self._warned_examples.add(sid)
            logger.warning("shards: skipping unreadable example %d of %s (%s); further ones of this shard are "
                           "counted silently", place, self.paths[sid], error)

    def forget(self, sid: int) -> None:
        if sid in self._open:
            self._open.pop(sid)[1].close()

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1][1].close()


# ------------------------------------------------------------------------------------------------ reading: config
@dataclasses.dataclass(frozen=True)
class BatchFns:
    """Steps shared with the image pipeline, passed in by `pipeline.make_iterator` (which imports this module, so
    this module does not import it): channel conversion, caption mirroring, collation, tokenization."""

    to_channels: Callable[[np.ndarray, int], np.ndarray]
    mirror_caption: Callable[[str], str]
    collate: Callable[[list[dict]], dict]
    tokenize: Callable[[dict], dict] | None = None


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The settings of one host's stream (from a DataConfig and its builder_kwargs)."""

    paths: tuple[str, ...]
    root: str
    shuffle_buffer: int
    buckets: tuple[tuple[int, int], ...]
    seed: int
    shuffle: bool
    num_epochs: int | None
    drop_remainder: bool
    host_batch: int
    channels: int
    center_crop: bool
    flip: bool
    caption_dropout: float
    process_index: int
    process_count: int

    @classmethod
    def from_config(cls, cfg, process_index: int, process_count: int) -> _Spec:
        options = dict(cfg.builder_kwargs or ())
        for key in options:
            if key not in OPTIONS:
                raise ConfigError(f"shards: unknown option '{key}'{nearest(key, OPTIONS)}; options: {sorted(OPTIONS)}")
        options = {**OPTIONS, **options}
        paths = list_shards(options["paths"], cfg.data_dir)
        buckets = tuple((int(h), int(w)) for h, w in (options["buckets"] or ((cfg.resolution, cfg.resolution),)))
        checks = [
            (cfg.batch_size % process_count == 0, f"batch_size {cfg.batch_size} is not divisible by {process_count} "
                                                  "processes"),
            (0 <= process_index < process_count, f"process_index {process_index} is not in [0, {process_count})"),
            (len(paths) >= process_count, f"{len(paths)} shard(s) for {process_count} processes: each process "
                                          "needs at least one shard"),
            (int(options["shuffle_buffer"]) >= 0, f"shuffle_buffer must be >= 0, got {options['shuffle_buffer']}"),
            (all(h > 0 and w > 0 for h, w in buckets), f"buckets must be positive (height, width) pairs: {buckets}"),
            (not options["buckets"] or process_count == 1, "aspect-ratio buckets need process_count == 1 (hosts "
                                                           "would disagree on a step's shape)"),
            (cfg.num_workers == 0, "the shard reader has no worker processes: set data.num_workers=0 (it decodes "
                                   "with data.num_threads threads)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"shards: {message}")
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        return cls(tuple(paths), root, int(options["shuffle_buffer"]), buckets, int(cfg.seed), bool(cfg.shuffle),
                   cfg.num_epochs, bool(cfg.drop_remainder), cfg.batch_size // process_count, cfg.channels,
                   bool(cfg.center_crop), bool(cfg.flip), float(cfg.caption_dropout), process_index, process_count)

    def fingerprint(self) -> dict:
        names = [os.path.relpath(p, self.root) for p in self.paths]
        buckets = [list(b) for b in self.buckets] if len(self.buckets) > 1 else None  # one: the order ignores it
        return {"name": SOURCE_NAME, "seed": self.seed, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "batch_size": self.host_batch * self.process_count, "buckets": buckets,
                "num_shards": len(self.paths), "shards_digest": options_digest(names),
                "process_index": self.process_index, "process_count": self.process_count}


def _pack(places: list[int]) -> str:
    """Sorted packed places -> delta-coded, zlib-compressed, base64 text."""
    deltas = np.diff(np.asarray(places, np.uint64), prepend=np.uint64(0))
    return base64.b64encode(zlib.compress(deltas.astype("<u8").tobytes(), 9)).decode("ascii") if places else ""


def _unpack(text: str) -> list[int]:
    if not text:
        return []
    deltas = np.frombuffer(zlib.decompress(base64.b64decode(text)), "<u8")
    return [int(x) for x in np.cumsum(deltas, dtype=np.uint64)]


# ------------------------------------------------------------------------------------------------ reading: stream
_LOW = (1 << _PLACE_BITS) - 1


@dataclasses.dataclass(frozen=True)
class _Item:
    """An example drawn from the buffer: its epoch, packed place (shard number in the host's list << 32 | example),
    shard id and member bytes."""

    epoch: int
    place: int
    sid: int
    raw: dict


class _Stream:
    """One host's batches, produced synchronously: shard order, shuffle buffer, bucket queues, state."""

    def __init__(self, spec: _Spec, fns: BatchFns, reader: _ShardReader, pool):
        self.spec, self.fns, self.reader, self.pool = spec, fns, reader, pool
        self._orders: OrderedDict[int, list[int]] = OrderedDict()
        self._draws: tuple[tuple[int, int], np.ndarray] | None = None
        self.queues: list[list[_Item]] = [[] for _ in spec.buckets]
        self.skipped_examples = self.batches = 0
        self.done = False
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.cursor, self.drawn, self.read_in_epoch = epoch, 0, 0, 0
        self.buffer: list[int] = []  # packed places, ascending (read order)
        self.raw: dict[int, dict] = {}

    def order(self, epoch: int) -> list[int]:
        """Shard ids of this host in `epoch` (rule 1 of the module docstring)."""
        if epoch not in self._orders:
            spec, n = self.spec, len(self.spec.paths)
            perm = np.random.default_rng([spec.seed, epoch, _SALT_PERM]).permutation(n) if spec.shuffle else range(n)
            self._orders[epoch] = [int(s) for s in perm[spec.process_index::spec.process_count]]
            while len(self._orders) > 4:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def _read_next(self) -> bool:
        """Reads the example at the cursor into the buffer; False when the host's share of the epoch is read."""
        order = self.order(self.epoch)
        while (k := self.cursor >> _PLACE_BITS) < len(order):
            shard = self.reader.index(order[k])
            raw = self.reader.read(order[k], self.cursor & _LOW) if shard is not None else None
            if raw is None:
                self.cursor = (k + 1) << _PLACE_BITS
                continue
            self.buffer.append(self.cursor)
            self.raw[self.cursor] = raw
            self.cursor += 1
            self.read_in_epoch += 1
            return True
        return False

    def _uniform(self, n: int) -> int:
        """The n-th random draw of this epoch on this host (counter-based, so the state needs no rng state)."""
        block = (self.epoch, n // _BLOCK)
        if self._draws is None or self._draws[0] != block:
            rng = np.random.default_rng([self.spec.seed, self.epoch, self.spec.process_index, block[1], _SALT_DRAW])
            self._draws = (block, rng.integers(0, 2**62, _BLOCK, dtype=np.int64))
        return int(self._draws[1][n % _BLOCK])

    def _draw(self) -> _Item | None:
        """The next example out of the shuffle buffer (rule 2), moving on to the next epoch; None at the end."""
        capacity = max(self.spec.shuffle_buffer, 1) if self.spec.shuffle else 1
        while True:
            while len(self.buffer) < capacity and self._read_next():
                pass
            if self.buffer:
                break
            if not self.read_in_epoch and len(self.reader.corrupt) >= len(self.spec.paths):
                raise DataError(f"shards: none of the {len(self.spec.paths)} shards is readable (first: "
                                f"{next(iter(self.reader.corrupt.items()))})")
            if self.spec.num_epochs is not None and self.epoch + 1 >= self.spec.num_epochs:
                return None
            self._start_epoch(self.epoch + 1)
        j = self._uniform(self.drawn) % len(self.buffer) if len(self.buffer) > 1 else 0
        self.drawn += 1
        place = self.buffer.pop(j)
        return _Item(self.epoch, place, self.order(self.epoch)[place >> _PLACE_BITS], self.raw.pop(place))

    def _skip(self, item: _Item, error: BaseException) -> None:
        self.skipped_examples += 1
        self.reader.bad_example(item.sid, item.place & _LOW, f"{type(error).__name__}: {error}")

    def _bucket(self, item: _Item) -> int | None:
        if len(self.spec.buckets) == 1:
            return 0
        try:
            ext = image_extension(item.raw)
            return nearest_bucket(*image_size(item.raw[ext], ext), self.spec.buckets)
        except Exception as e:  # noqa: BLE001 - an undecodable image: skip and count
            self._skip(item, e)
            return None

    def _example(self, item: _Item, size: tuple[int, int]) -> dict | Exception:
        """The preprocessed example (rule 4), or the exception that made it unreadable."""
        spec, fns = self.spec, self.fns
        try:
            ext = image_extension(item.raw)
            image, caption = fns.to_channels(decode_image(item.raw[ext], ext), spec.channels), example_caption(item.raw)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
            return e
        rng = np.random.default_rng([spec.seed, item.epoch, item.sid, item.place & _LOW, _SALT_EXAMPLE])
        image = fit_image(image, *size, spec.center_crop)
        if spec.flip and rng.random() < 0.5:
            image, caption = image[:, ::-1], fns.mirror_caption(caption)
        if spec.caption_dropout > 0 and rng.random() < spec.caption_dropout:
            caption = ""
        index = np.int64((item.sid << _PLACE_BITS) | (item.place & _LOW))
        return {"image": np.ascontiguousarray(image), "caption": caption, "index": index}

    def _emit(self, b: int, count: int) -> dict | None:
        """A batch of the first `count` examples of queue `b`, or None when some were unreadable (they leave the
        queue, counted; the readable ones stay and are decoded again with the next ones)."""
        items, size = self.queues[b][:count], self.spec.buckets[b]
        work = lambda item: self._example(item, size)  # noqa: E731
        examples = list(self.pool.map(work, items) if self.pool else map(work, items))
        bad = [i for i, e in enumerate(examples) if isinstance(e, Exception)]
        for i in bad:
            self._skip(items[i], examples[i])
        if bad:
            self.queues[b] = [it for i, it in enumerate(items) if i not in bad] + self.queues[b][count:]
            return None
        del self.queues[b][:count]
        batch = self.fns.collate(examples)
        if self.fns.tokenize is not None:
            batch = self.fns.tokenize(batch)
        self.batches += 1
        return batch

    def next_batch(self) -> dict:
        n = self.spec.host_batch
        while not self.done:
            item = self._draw()
            if item is None:
                self.done = True
                break
            b = self._bucket(item)
            if b is not None:
                self.queues[b].append(item)
                if len(self.queues[b]) >= n and (batch := self._emit(b, n)) is not None:
                    return batch
        for b, q in enumerate(self.queues):  # the end of a finite stream: the queues' remainders
            while q and not self.spec.drop_remainder:
                if (batch := self._emit(b, min(len(q), n))) is not None:
                    return batch
                q = self.queues[b]
            self.queues[b] = []
        raise StopIteration

    # ------------------------------------------------------------------------------------------ state
    def state(self) -> dict:
        return {
            "epoch": self.epoch, "cursor": [self.cursor >> _PLACE_BITS, self.cursor & _LOW], "drawn": self.drawn,
            "read_in_epoch": self.read_in_epoch, "buffer": _pack(self.buffer),
            "queues": [[[it.epoch, it.place >> _PLACE_BITS, it.place & _LOW] for it in q] for q in self.queues],
            "done": self.done, "batches": self.batches, "skipped_examples": self.skipped_examples,
            "corrupt_shards": sorted(self.reader.corrupt),
        }

    def _fetch(self, epoch: int, k: int, o: int, missing: list) -> _Item | None:
        order = self.order(epoch)
        raw = self.reader.read(order[k], o) if k < len(order) else None
        if raw is None:
            missing.append((epoch, k, o))
            return None
        return _Item(epoch, (k << _PLACE_BITS) | o, order[k], raw)

    def restore(self, state: dict) -> None:
        """Continues exactly where `state` was taken, re-reading the examples of its buffer and queues."""
        self.restart_counters(state)
        self._start_epoch(int(state["epoch"]))
        k, o = state["cursor"]
        self.cursor, self.drawn, self.read_in_epoch = (k << _PLACE_BITS) | o, state["drawn"], state["read_in_epoch"]
        missing: list = []
        for place in _unpack(state["buffer"]):
            if (item := self._fetch(self.epoch, place >> _PLACE_BITS, place & _LOW, missing)) is not None:
                self.buffer.append(place)
                self.raw[place] = item.raw
        self.queues = [[it for e, k, o in q if (it := self._fetch(e, k, o, missing)) is not None]
                       for q in state["queues"]]
        self.done = bool(state["done"])
        if missing:
            logger.warning("shards: %d example(s) of the saved state cannot be read again (first: epoch %d, shard "
                           "number %d, example %d); the resumed stream leaves them out", len(missing), *missing[0])

    def restart_at(self, epoch: int, state: dict) -> None:
        """The start of `epoch`, with the counters of `state` (an elastic restart)."""
        self.restart_counters(state)
        self._start_epoch(epoch)
        self.done = self.spec.num_epochs is not None and epoch >= self.spec.num_epochs

    def restart_counters(self, state: dict) -> None:
        """The counters of `state` (corrupt shards, skipped examples, batches) without its position."""
        self.skipped_examples, self.batches = int(state["skipped_examples"]), int(state["batches"])
        known = self.reader.corrupt
        self.reader.corrupt = {n: known.get(n, "recorded in the restored state") for n in state["corrupt_shards"]}


# ------------------------------------------------------------------------------------------------ reading: iterator
_END = object()


def _produce(stream: _Stream, out: queue.Queue, stop: threading.Event) -> None:
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        while not stop.is_set():
            try:
                batch = stream.next_batch()
            except StopIteration:
                put(_END)
                return
            if not put((batch, stream.state())):
                return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
        put(e)


class _Resources:
    """The prefetch thread, decode pool and open files of an iterator; closed by close() or when it is collected."""

    def __init__(self, reader: _ShardReader, pool):
        self.reader, self.pool = reader, pool
        self.thread: threading.Thread | None = None
        self.queue: queue.Queue | None = None
        self.stop = threading.Event()

    def start(self, stream: _Stream, depth: int) -> None:
        self.stop, self.queue = threading.Event(), queue.Queue(depth)
        self.thread = threading.Thread(target=_produce, args=(stream, self.queue, self.stop), daemon=True,
                                       name="ldm_jax-shards-prefetch")
        self.thread.start()

    def stop_prefetch(self) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = self.queue = None

    def close(self) -> None:
        self.stop_prefetch()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.reader.close()


class ShardIterator:
    """This host's batches of a shard set; the `pipeline.DataIterator` interface (get_state / set_state / close,
    num_examples, steps_per_epoch, per_host_batch_size). Decoding runs on `num_threads` threads and `prefetch`
    batches are prepared ahead on a background thread; neither changes the stream or the state."""

    def __init__(self, spec: _Spec, fns: BatchFns, *, num_threads: int = 2, prefetch: int = 4):
        self._spec, self._fingerprint, self._prefetch = spec, spec.fingerprint(), int(prefetch)
        reader = _ShardReader(list(spec.paths), spec.root)
        pool = concurrent.futures.ThreadPoolExecutor(num_threads) if num_threads > 1 else None
        self._resources = _Resources(reader, pool)
        self._finalizer = weakref.finalize(self, self._resources.close)
        self._stream = _Stream(spec, fns, reader, pool)
        self._state = self._stream.state()
        self._ended = False
        self._num_examples: int | None = None
        self.per_host_batch_size = spec.host_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._ended:
            raise StopIteration
        if self._prefetch <= 0:
            try:
                batch = self._stream.next_batch()
            except StopIteration:
                self._ended = True
                raise
            self._state = self._stream.state()
            return batch
        res = self._resources
        if res.thread is None:
            res.start(self._stream, self._prefetch)
        item = res.queue.get()
        if item is _END:
            self._ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            res.stop_prefetch()
            raise item
        batch, self._state = item
        return batch

    @property
    def stats(self) -> dict:
        """Counters as of the last batch returned: epoch, batches, corrupt shards, skipped examples."""
        s = self._state
        return {"epoch": s["epoch"], "batches": s["batches"], "corrupt_shards": len(s["corrupt_shards"]),
                "skipped_examples": s["skipped_examples"]}

    @property
    def num_examples(self) -> int:
        """Examples in all readable shards (every shard's headers are read once, on first use)."""
        if self._num_examples is None:
            total = 0
            for path in self._spec.paths:
                try:
                    total += len(index_shard(path))
                except ShardError:
                    pass
            self._num_examples = total
        return self._num_examples

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self._fingerprint["batch_size"]

    def get_state(self) -> dict:
        """JSON-serializable position after the last batch returned (see the module docstring)."""
        return json.loads(json.dumps({"version": _STATE_VERSION, "fingerprint": self._fingerprint, **self._state}))

    def set_state(self, state: dict) -> None:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION or "buffer" not in state:
            raise ConfigError("set_state expects a dict from a shard iterator's get_state()")
        saved = dict(state.get("fingerprint", {}))
        differs = [k for k, v in self._fingerprint.items() if saved.get(k, v) != v]
        elastic = "process_count" in differs and set(differs) <= {"process_count", "process_index"}
        if differs and not elastic:
            k = differs[0]
            raise ConfigError(f"data iterator state was saved with {k}={saved[k]!r} but this pipeline has "
                              f"{k}={self._fingerprint[k]!r}; restore with the same data settings or start the "
                              "data afresh")
        self._resources.stop_prefetch()
        self._ended = False
        if elastic:
            logger.warning("shards: the data state was saved by %s processes, this run has %s: exact resume needs "
                           "the same count, so the data continues at the start of epoch %d", saved["process_count"],
                           self._fingerprint["process_count"], int(state["epoch"]) + 1)
            self._stream = _Stream(self._spec, self._stream.fns, self._resources.reader, self._resources.pool)
            self._stream.restart_at(int(state["epoch"]) + 1, state)
        else:
            self._stream.restore(state)
        self._state = self._stream.state()

    def close(self) -> None:
        self._finalizer()


def make_shard_iterator(cfg, fns: BatchFns, *, process_index: int = 0, process_count: int = 1) -> ShardIterator:
    """The shard iterator of host `process_index` for a DataConfig `cfg` with ``name="shards"``."""
    spec = _Spec.from_config(cfg, process_index, process_count)
    return ShardIterator(spec, fns, num_threads=cfg.num_threads, prefetch=cfg.prefetch)
