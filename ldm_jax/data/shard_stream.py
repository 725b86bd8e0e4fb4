"""Streaming reader of tar shards (`shards` format): disjoint per host, shuffled with a buffer, resumable
exactly, robust to corrupt shards, with optional aspect-ratio bucketing. ``data.name="shards"`` selects it.

Config: ``data.builder_kwargs={"paths": "/data/web/*.tar", "shuffle_buffer": 1000, "buckets": None,
"bucket_weights": None, "queue_size": None}`` (the last three: see Bucketing). ``paths`` is a glob, a folder (its
``*.tar``), a file or a list of these (relative ones under ``data.data_dir`` when it is set); their sorted union is
the shard list, and a shard's id is its place in it. The other data fields (resolution, channels, center_crop, flip,
caption_dropout, seed, shuffle, num_epochs, drop_remainder, batch_size, num_threads, prefetch) mean what they mean
for the other sources.

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
epoch, example within it), the buffer as the sorted places of its examples (delta-coded, zlib, base64: about a byte
per entry), the examples waiting in bucket queues, the bucket schedule and counters. ``set_state`` re-reads those
examples from their shards, so the continued stream equals the uninterrupted one bit for bit. A state saved under
other order-fixing settings is refused with a one-line ConfigError; one saved with another process count (an elastic
restart hands every process the state of process 0) continues at the start of the next epoch, with a warning.

Corrupt shards. A shard that is missing, unreadable, truncated or without images (`shards.index_shard`) is
skipped whole at each visit, before any of its examples is used: one warning on the "ldm_jax.data" logger and its
name in ``state["corrupt_shards"]``. An example whose image cannot be decoded is skipped and counted in
``state["skipped_examples"]`` (one warning per shard). The rest of the epoch continues; ``it.stats`` has the counts.

Bucketing. With ``"buckets": [[256, 256], [192, 320], [320, 192]]`` (height, width) each example belongs to the bucket
nearest in log aspect ratio (the first listed on ties) and is resized to cover its batch's bucket and center-cropped
(``data.resolution`` is then unused). Every batch has one shape. Examples drawn from the buffer wait in their bucket's
queue; queues carry over epochs and are part of the state, so every example of an epoch is emitted once.
  - One process: a batch is emitted as soon as one queue holds a host batch (B examples).
  - Several processes: all hosts must feed the same shape at each step, without talking, so the shapes follow a
    schedule every host computes alike. Scheduled step s (s = 0, 1, ... over the whole run) has the bucket b with
    the largest (s + 1) w_b - n_b + u_b: n_b counts the earlier steps given to b, u_b is uniform in [0, 1) drawn
    from (seed, s), and w are the bucket weights (a bucket of weight 0 is never scheduled): ``bucket_weights`` when
    given (normalized), else the buckets' add-one frequencies among the first 32 examples of 16 shards evenly spaced
    in the shard list (image headers, read alike by every host at the first step; the state keeps the weights; give
    ``bucket_weights`` to skip that read, and with it the chance that a read error on one host changes its weights).
    After any S steps bucket b has had S w_b of them, give or take 2. For step s a host draws examples into the
    queues until queue b holds B examples or all queues together hold ``queue_size`` (default 2 x B x number of
    buckets); the batch is queue b's B oldest examples, completed when short by the oldest of the other queues in
    order of aspect-ratio distance to b. Those are "borrowed" (cropped to b's shape) and counted in
    ``state["borrowed_examples"]``: about 1% of the examples with the default queue_size and weights that match the
    data, fewer with a larger queue_size.
  - Memory: besides the shuffle buffer, the queues hold at most (number of buckets) x B examples with one process
    and at most ``queue_size`` with several.
  - The end of a finite stream (num_epochs set): the remaining queued examples are emitted in batches of at most B
    (one process: queue by queue; several: following the schedule, borrowing), so only the last batch of a queue
    (one process) or of the host (several) is partial; with drop_remainder those partial batches are dropped
    instead, counted in ``state["dropped_examples"]``. Nothing else is dropped (unreadable examples aside: see
    Corrupt shards).

Batches are those of `pipeline`: ``image`` float32 (B, H, W, C) in [-1, 1], ``caption`` (B,) str, ``index`` (B,)
int64 = shard id * 2**32 + place in shard, and the tokenizer's arrays when a tokenizer is given.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import json
import math
import os
import queue
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np

from ldm_jax.data.common import DataError, logger, options_digest
from ldm_jax.data.shards import (
    ShardError,
    ShardReader,
    bucket_frequencies,
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
OPTIONS = {"paths": None, "shuffle_buffer": 1000, "buckets": None, "bucket_weights": None, "queue_size": None}
_STATE_VERSION = 1
_PLACE_BITS = 32  # a packed place / batch index is (shard number or id) << 32 | example within the shard
_BLOCK = 1024  # shuffle-buffer draws per block of counter-based random numbers
_SALT_PERM, _SALT_DRAW, _SALT_EXAMPLE, _SALT_SCHEDULE = 0x5A4D, 0xD8A7, 0xE7A3, 0x5C4E


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
    bucket_weights: tuple[float, ...] | None  # normalized; None: estimated from the data (several processes)
    queue_size: int  # bound on the examples waiting in all bucket queues together (several processes)
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
    queue_size_option: int | None = None  # as configured (the fingerprint's: the default depends on process_count)

    @classmethod
    def from_config(cls, cfg, process_index: int, process_count: int) -> _Spec:
        options = dict(cfg.builder_kwargs or ())
        for key in options:
            if key not in OPTIONS:
                raise ConfigError(f"shards: unknown option '{key}'{nearest(key, OPTIONS)}; options: {sorted(OPTIONS)}")
        options = {**OPTIONS, **options}
        paths = list_shards(options["paths"], cfg.data_dir)
        buckets = tuple((int(h), int(w)) for h, w in (options["buckets"] or ((cfg.resolution, cfg.resolution),)))
        weights = tuple(float(w) for w in options["bucket_weights"] or ())
        host_batch = cfg.batch_size // process_count
        queue_size = int(options["queue_size"] or 2 * host_batch * len(buckets))
        checks = [
            (cfg.batch_size % process_count == 0, f"batch_size {cfg.batch_size} is not divisible by {process_count} "
                                                  "processes"),
            (0 <= process_index < process_count, f"process_index {process_index} is not in [0, {process_count})"),
            (len(paths) >= process_count, f"{len(paths)} shard(s) for {process_count} processes: each process "
                                          "needs at least one shard"),
            (int(options["shuffle_buffer"]) >= 0, f"shuffle_buffer must be >= 0, got {options['shuffle_buffer']}"),
            (all(h > 0 and w > 0 for h, w in buckets), f"buckets must be positive (height, width) pairs: {buckets}"),
            (not weights or (len(weights) == len(buckets) and min(weights) >= 0 < sum(weights)),
             f"bucket_weights must be {len(buckets)} non-negative numbers, not all 0 (one per bucket): {weights}"),
            (queue_size >= host_batch, f"queue_size {queue_size} is below the host batch {host_batch}"),
            (cfg.num_workers == 0, "the shard reader has no worker processes: set data.num_workers=0 (it decodes "
                                   "with data.num_threads threads)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"shards: {message}")
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        weights = tuple(w / sum(weights) for w in weights) if weights else None
        return cls(tuple(paths), root, int(options["shuffle_buffer"]), buckets, weights, queue_size, int(cfg.seed),
                   bool(cfg.shuffle), cfg.num_epochs, bool(cfg.drop_remainder), host_batch, cfg.channels,
                   bool(cfg.center_crop), bool(cfg.flip), float(cfg.caption_dropout), process_index, process_count,
                   options["queue_size"])

    @property
    def scheduled(self) -> bool:
        """Whether batch shapes follow the shared bucket schedule (several buckets and processes)."""
        return len(self.buckets) > 1 and self.process_count > 1

    def borrow_order(self, b: int) -> list[int]:
        """Bucket b, then the others by distance in log aspect ratio to it (list order on ties)."""
        ratio = [math.log(w / h) for h, w in self.buckets]
        return sorted(range(len(self.buckets)), key=lambda c: (c != b, abs(ratio[c] - ratio[b]), c))

    def fingerprint(self) -> dict:
        names = [os.path.relpath(p, self.root) for p in self.paths]
        several = len(self.buckets) > 1  # one bucket: the order ignores the bucket settings
        buckets = [list(b) for b in self.buckets] if several else None
        weights = list(self.bucket_weights) if several and self.bucket_weights else None
        return {"name": SOURCE_NAME, "seed": self.seed, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "batch_size": self.host_batch * self.process_count, "buckets": buckets, "bucket_weights": weights,
                "queue_size": self.queue_size_option if several else None,
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

    def __init__(self, spec: _Spec, fns: BatchFns, reader: ShardReader, pool):
        self.spec, self.fns, self.reader, self.pool = spec, fns, reader, pool
        self._orders: OrderedDict[int, list[int]] = OrderedDict()
        self._draws: tuple[tuple[int, int], np.ndarray] | None = None
        self.queues: list[list[_Item]] = [[] for _ in spec.buckets]
        self.skipped_examples = self.batches = self.borrowed_examples = self.dropped_examples = 0
        self.weights = spec.bucket_weights  # None: estimated on first use (several processes)
        self.schedule = [0] * len(spec.buckets)  # scheduled batches given to each bucket so far
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

    def _emit(self, b: int, picks: list[tuple[int, int]]) -> dict | None:
        """A batch of bucket b's shape of the queued examples `picks` ((queue, position) pairs), or None when some
        were unreadable (they leave their queues, counted; the readable ones stay and are decoded again)."""
        items, size = [self.queues[c][i] for c, i in picks], self.spec.buckets[b]
        work = lambda item: self._example(item, size)  # noqa: E731
        examples = list(self.pool.map(work, items) if self.pool else map(work, items))
        bad = [i for i, e in enumerate(examples) if isinstance(e, Exception)]
        for i in bad:
            self._skip(items[i], examples[i])
        gone = {picks[i] for i in bad} if bad else set(picks)
        for c in {c for c, _ in picks}:
            self.queues[c] = [it for i, it in enumerate(self.queues[c]) if (c, i) not in gone]
        if bad:
            return None
        batch = self.fns.collate(examples)
        if self.fns.tokenize is not None:
            batch = self.fns.tokenize(batch)
        self.batches += 1
        self.borrowed_examples += sum(c != b for c, _ in picks)
        return batch

    def _fill(self, until: Callable[[], bool]) -> None:
        """Draws examples into their buckets' queues until `until()` or the end of a finite stream."""
        while not self.done and not until():
            item = self._draw()
            if item is None:
                self.done = True
            elif (b := self._bucket(item)) is not None:
                self.queues[b].append(item)

    def next_batch(self) -> dict:
        return self._next_scheduled() if self.spec.scheduled else self._next_greedy()

    def _next_greedy(self) -> dict:
        """One process: the first queue to hold a host batch is emitted; at the end, the queues' remainders."""
        n = self.spec.host_batch
        while not self.done:
            self._fill(lambda: any(len(q) >= n for q in self.queues))
            b = next((b for b, q in enumerate(self.queues) if len(q) >= n), None)
            if b is not None and (batch := self._emit(b, [(b, i) for i in range(n)])) is not None:
                return batch
        for b, q in enumerate(self.queues):  # the end of a finite stream: the queues' remainders
            while q and not self.spec.drop_remainder:
                if (batch := self._emit(b, [(b, i) for i in range(min(len(q), n))])) is not None:
                    return batch
                q = self.queues[b]
            self.dropped_examples += len(q)
            self.queues[b] = []
        raise StopIteration

    def scheduled_bucket(self) -> int:
        """The bucket of the next scheduled step s: the largest (s + 1) w_b - n_b + u_b (module docstring)."""
        if self.weights is None:
            self.weights = bucket_frequencies(self.spec.paths, self.spec.buckets)
        s, w = sum(self.schedule), np.asarray(self.weights)
        u = np.random.default_rng([self.spec.seed, s, _SALT_SCHEDULE]).random(len(w))
        return int(np.argmax(np.where(w > 0, (s + 1) * w - np.asarray(self.schedule) + u, -np.inf)))

    def _next_scheduled(self) -> dict:
        """Several processes: the scheduled bucket's oldest examples, completed from the nearest other queues."""
        n = self.spec.host_batch
        while True:
            b = self.scheduled_bucket()
            self._fill(lambda b=b: len(self.queues[b]) >= n or sum(map(len, self.queues)) >= self.spec.queue_size)
            picks = [(c, i) for c in self.spec.borrow_order(b) for i in range(len(self.queues[c]))][:n]
            if not picks or (len(picks) < n and self.spec.drop_remainder):  # the end of a finite stream
                self.dropped_examples += len(picks)
                self.queues = [[] for _ in self.queues]
                raise StopIteration
            if (batch := self._emit(b, picks)) is not None:
                self.schedule[b] += 1
                return batch

    # ------------------------------------------------------------------------------------------ state
    def state(self) -> dict:
        return {
            "epoch": self.epoch, "cursor": [self.cursor >> _PLACE_BITS, self.cursor & _LOW], "drawn": self.drawn,
            "read_in_epoch": self.read_in_epoch, "buffer": _pack(self.buffer),
            "queues": [[[it.epoch, it.place >> _PLACE_BITS, it.place & _LOW] for it in q] for q in self.queues],
            "done": self.done, "batches": self.batches, "skipped_examples": self.skipped_examples,
            "corrupt_shards": sorted(self.reader.corrupt), "borrowed_examples": self.borrowed_examples,
            "dropped_examples": self.dropped_examples, "schedule": list(self.schedule),
            "bucket_weights": list(self.weights) if self.weights is not None else None,
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
        """The counters of `state` (corrupt shards, skipped examples, batches, the schedule and its weights)
        without its position."""
        self.skipped_examples, self.batches = int(state["skipped_examples"]), int(state["batches"])
        self.borrowed_examples = int(state.get("borrowed_examples", 0))
        self.dropped_examples = int(state.get("dropped_examples", 0))
        self.schedule = [int(n) for n in state.get("schedule") or [0] * len(self.spec.buckets)]
        if state.get("bucket_weights") is not None:  # as the other hosts use them, even if the data changed since
            self.weights = tuple(float(w) for w in state["bucket_weights"])
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
                put((_END, stream.state()))  # the end's counters (dropped examples)
                return
            if not put((batch, stream.state())):
                return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
        put(e)


class _Resources:
    """The prefetch thread, decode pool and open files of an iterator; closed by close() or when it is collected."""

    def __init__(self, reader: ShardReader, pool):
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
        reader = ShardReader(list(spec.paths), spec.root)
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
                self._ended, self._state = True, self._stream.state()
                raise
            self._state = self._stream.state()
            return batch
        res = self._resources
        if res.thread is None:
            res.start(self._stream, self._prefetch)
        item = res.queue.get()
        if isinstance(item, tuple) and item[0] is _END:
            self._ended, self._state = True, item[1]
            raise StopIteration
        if isinstance(item, BaseException):
            res.stop_prefetch()
            raise item
        batch, self._state = item
        return batch

    @property
    def stats(self) -> dict:
        """Counters as of the last batch returned (or the end of the stream): epoch, batches, corrupt shards,
        skipped, borrowed and dropped examples (see the module docstring)."""
        s = self._state
        return {"epoch": s["epoch"], "batches": s["batches"], "corrupt_shards": len(s["corrupt_shards"]),
                **{k: s[k] for k in ("skipped_examples", "borrowed_examples", "dropped_examples")}}

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
    def num_shards(self) -> int:
        """Shards in the list (readable or not); a shard's id is its place in it."""
        return len(self._spec.paths)

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
