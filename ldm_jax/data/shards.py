"""Webdataset-layout tar shards: the format, a checked shard index, image decoding, and a writer.

A shard is a POSIX tar file (`write_shards` names them ``{prefix}-000000.tar``, ...). Members named ``{key}.{ext}``
form one example, ``key`` being the member path up to the first dot of its file name (the webdataset rule):
``png``, ``jpg``, ``jpeg`` or ``webp`` (an encoded image, decoded by `images.load_rgb`) or ``npy`` (a uint8
(H, W[, C]) array); ``txt`` (the UTF-8 caption); ``json`` (an object whose ``caption``, ``text`` or ``prompt`` is the
caption when there is no ``txt``; other fields stay in the file). Keys without an image member are ignored;
examples keep the order of their first member. Any tar writer produces readable shards, e.g.
``tar --sort=name -cf shard-000000.tar 000000001.jpg 000000001.txt ...``.

`index_shard` reads all member headers and checks a shard: every member's data must lie inside the file and the
end-of-archive block must follow the last member, so a truncated shard is found before any of its examples is used.

`ShardReader` reads examples' member bytes by (shard id, place), `bucket_frequencies` estimates how examples fall into
aspect-ratio buckets, `write_shards` writes shards from an image folder (captions and decoding as `image_folder` does
them) or from records; `shard_stream` streams them (``data.name="shards"``).
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import math
import os
import posixpath
import tarfile
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldm_jax.data import image_folder
from ldm_jax.data.common import DataError, encode_png, logger
from ldm_jax.images import load_rgb
from ldm_jax.types import ConfigError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "npy")
CAPTION_KEYS = ("caption", "text", "prompt")
OPEN_SHARDS = 4  # member indexes (and file handles) a ShardReader keeps open


class ShardError(DataError):
    """A shard cannot be used (missing, unreadable, truncated, no examples)."""


def list_shards(paths, base_dir: str | os.PathLike | None = None) -> list[str]:
    """The sorted, de-duplicated shard files named by `paths` (glob, folder, file or a list of these)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or ())
    if not items:
        raise ConfigError("data.name='shards' needs data.builder_kwargs.paths (a glob, folder, file or list)")
    found = set()
    for item in items:
        path = Path(item).expanduser()
        if base_dir and not path.is_absolute():
            path = Path(base_dir).expanduser() / path
        if path.is_dir():
            matches = glob.glob(str(path / "*.tar"))
        else:
            matches = glob.glob(str(path)) if glob.has_magic(str(path)) else ([str(path)] if path.exists() else [])
        if not matches:
            raise DataError(f"shards: nothing matches '{path}'")
        found.update(os.path.abspath(m) for m in matches if os.path.isfile(m))
    if not found:
        raise DataError(f"shards: no shard files among {items}")
    return sorted(found)


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """Where each example's members lie in a shard: ``members[i]`` maps an extension to (offset, size)."""

    path: str
    keys: tuple[str, ...]
    members: tuple[dict[str, tuple[int, int]], ...]

    def __len__(self) -> int:
        return len(self.keys)


_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)


def _scan_plain(f) -> tuple[list[tuple[str, int, int]], int] | None:
    """([(name, data offset, data size)] of the regular files, offset of the end-of-archive block) of a tar whose
    headers are plain ustar/v7 ones (what writers emit for short ASCII names), read without `tarfile`'s per-header
    overhead; None at the first header that needs `tarfile` (pax or GNU extensions, base-256 sizes, bad checksum)."""
    members, pos = [], 0
    while True:
        f.seek(pos)
        header = f.read(_BLOCK)
        if header == _ZERO_BLOCK:
            return members, pos
        if len(header) < _BLOCK or header[156:157] not in (b"0", b"\0", b"5") or header[124] & 0x80:
            return None
        try:
            checksum, length = int(header[148:156].strip(b"\0 "), 8), int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
            return None
        if header[156:157] != b"5":
            name = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            members.append((name.decode("utf-8", "surrogateescape"), pos + _BLOCK, length))
        pos += _BLOCK + -(-length // _BLOCK) * _BLOCK


def index_shard(path: str) -> ShardIndex:
    """Reads all member headers of a shard and checks it (see the module docstring); ShardError if unusable."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            scanned = _scan_plain(f)
            if scanned is None:
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r:") as tf:
                    infos, end = tf.getmembers(), tf.offset
                scanned = ([(i.name, i.offset_data, i.size) for i in infos if i.isfile()], end)
            members, end = scanned
            f.seek(end)
            tail = f.read(_BLOCK)
    except (OSError, EOFError, tarfile.TarError) as e:
        raise ShardError(f"{type(e).__name__}: {e}") from None
    if tail != _ZERO_BLOCK:
        raise ShardError("no end-of-archive block after the last member (truncated)")
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    for name, offset, length in members:
        if offset + length > size:
            raise ShardError(f"member {name} runs past the end of the file (truncated)")
        folder, base = posixpath.split(name)
        stem, dot, ext = base.partition(".")
        if dot:
            groups.setdefault(posixpath.join(folder, stem), {})[ext.lower()] = (offset, length)
    keys = [k for k, m in groups.items() if any(e in m for e in IMAGE_EXTENSIONS)]
    if not keys:
        raise ShardError(f"no examples (no member ends in .{', .'.join(IMAGE_EXTENSIONS)})")
    return ShardIndex(path, tuple(keys), tuple(groups[k] for k in keys))


class ShardReader:
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
        while len(self._open) > OPEN_SHARDS:
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


def example_caption(raw: dict[str, bytes]) -> str:
    """The caption of an example's members (``txt``, else ``json``'s caption/text/prompt, else "")."""
    if "txt" in raw:
        return raw["txt"].decode("utf-8").strip()
    if "json" in raw:
        meta = json.loads(raw["json"].decode("utf-8"))
        if isinstance(meta, dict):
            return next((str(meta[k]).strip() for k in CAPTION_KEYS if k in meta), "")
    return ""


def image_extension(raw: dict[str, bytes]) -> str:
    """The image member's extension (the first of IMAGE_EXTENSIONS present)."""
    return next(e for e in IMAGE_EXTENSIONS if e in raw)


def decode_image(data: bytes, ext: str) -> np.ndarray:
    """uint8 (H, W, C) of an image member: ``npy`` arrays as stored, encoded images as `images.load_rgb` reads."""
    if ext == "npy":
        array = np.load(io.BytesIO(data), allow_pickle=False)
        channels = array.shape[-1] if array.ndim == 3 else 1
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or channels not in (1, 3, 4):
            raise DataError(f"npy image must be uint8 (H, W[, 1|3|4]), got {array.dtype} {array.shape}")
        return array[..., None] if array.ndim == 2 else array
    with Image.open(io.BytesIO(data)) as im:
        return load_rgb(im)


def image_size(data: bytes, ext: str) -> tuple[int, int]:
    """(height, width) of an image member as `decode_image` returns it, reading only the header where possible."""
    if ext == "npy":
        return decode_image(data, ext).shape[:2]
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        swapped = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that transpose the image
    if not w or not h:
        raise DataError("image has no pixels")
    return (w, h) if swapped else (h, w)


def fit_image(image: np.ndarray, height: int, width: int, center_crop: bool = True) -> np.ndarray:
    """uint8 (h, w, C) -> (height, width, C): scaled to cover then center-cropped, or a plain (aspect-changing)
    resize when `center_crop` is False; bicubic (the image pipeline's resize, `pipeline.resize_image`, is the
    square case)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if center_crop:
        scale = max(height / h, width / w)
        size = (max(width, round(w * scale)), max(height, round(h * scale)))
        pil = pil.resize(size, Image.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        pil = pil.crop((left, top, left + width, top + height))
    else:
        pil = pil.resize((width, height), Image.BICUBIC)
    out = np.asarray(pil)
    return out[..., None] if out.ndim == 2 else out


def nearest_bucket(height: int, width: int, buckets) -> int:
    """Index of the bucket (h, w) nearest to the image's aspect ratio in log space; the first one on ties."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - ratio))


def bucket_frequencies(paths, buckets, num_shards: int = 16, per_shard: int = 32) -> tuple[float, ...]:
    """Add-one frequencies of `buckets` (by `nearest_bucket`) among the first `per_shard` examples of `num_shards`
    shards evenly spaced in `paths` (shard i * len(paths) // num_shards), read from image headers. Unreadable shards
    and images are left out quietly; the same files give the same result on every host."""
    counts, n = [1] * len(buckets), len(paths)
    for sid in sorted({i * n // min(n, num_shards) for i in range(min(n, num_shards))}):
        try:
            shard = index_shard(paths[sid])
            with open(paths[sid], "rb") as f:
                for members in shard.members[:per_shard]:
                    ext = next(e for e in IMAGE_EXTENSIONS if e in members)
                    offset, size = members[ext]
                    f.seek(offset)
                    try:
                        counts[nearest_bucket(*image_size(f.read(size), ext), buckets)] += 1
                    except Exception:  # noqa: BLE001, S112 - an undecodable image is not counted
                        continue
        except (ShardError, OSError):
            continue
    return tuple(c / sum(counts) for c in counts)


@dataclasses.dataclass(frozen=True)
class ShardSummary:
    """What `write_shards` wrote: shard paths, examples per shard, and skipped inputs ("name: reason")."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]
    skipped: tuple[str, ...] = ()

    @property
    def num_examples(self) -> int:
        return sum(self.counts)


_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"\x93NUMPY", "npy"))


def _encode_image(image, image_format: str) -> tuple[str, bytes]:
    if isinstance(image, (bytes, bytearray)):
        image = bytes(image)
        for magic, ext in _MAGIC:
            if image.startswith(magic):
                return ext, image
        if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
            return "webp", image
        raise DataError("record image bytes are not PNG, JPEG, WebP or npy")
    image = np.asarray(image)
    if image_format == "png":
        return "png", encode_png(image)
    buffer = io.BytesIO()
    if image_format == "npy":
        np.save(buffer, np.ascontiguousarray(image, np.uint8), allow_pickle=False)
        return "npy", buffer.getvalue()
    if image.ndim == 3 and image.shape[-1] == 4:
        raise DataError("jpg stores no alpha channel: write RGBA images with image_format='png'")
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(
        buffer, format="JPEG", quality=95)
    return "jpg", buffer.getvalue()


def folder_records(path: str | os.PathLike, *, captions: str | None = None, max_side: int | None = None,
                   skipped: list[str] | None = None) -> Iterable[dict]:
    """Records of an image folder, read as `image_folder` reads it (captions, `load_rgb`, optional `max_side`):
    {"image", "caption", "json": {"file_name"}}; unreadable images are skipped, warned about and appended to
    `skipped`."""
    root = Path(path).expanduser().resolve()
    files = image_folder.list_images(root)
    found = image_folder.find_captions(root, files, captions)
    for file in files:
        rel = file.relative_to(root).as_posix()
        try:
            image = image_folder.folder_image(file, max_side)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable": skip and report
            logger.warning("shards: skipping unreadable image %s (%s)", file, e)
            if skipped is not None:
                skipped.append(f"{rel}: {e}")
            continue
        yield {"image": image, "caption": found.get(rel, ""), "json": {"file_name": rel}}


class _ShardWriter:
    """Writes one shard at a time under a temporary name, renamed to ``{prefix}-{n:06d}.tar`` when complete (fixed
    member metadata, so the same records give the same bytes)."""

    def __init__(self, out: Path, prefix: str):
        self.out, self.prefix = out, prefix
        self.paths: list[str] = []
        self.counts: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._keys: set[str] = set()

    def add(self, key: str, members: list[tuple[str, bytes]], per_shard: int) -> None:
        if self._tar is None or self.counts[-1] == per_shard:
            self.finish()
            self.paths.append(str(self.out / f"{self.prefix}-{len(self.paths):06d}.tar"))
            self.counts.append(0)
            self._tar, self._keys = tarfile.open(self.paths[-1] + ".tmp", "w", format=tarfile.PAX_FORMAT), set()
        if not key or "." in posixpath.basename(key) or key in self._keys:
            raise DataError(f"record key {key!r} is empty, repeated within a shard or has a dot in its file name")
        self._keys.add(key)
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.counts[-1] += 1

    def finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            os.replace(self.paths[-1] + ".tmp", self.paths[-1])

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            Path(self.paths[-1] + ".tmp").unlink(missing_ok=True)


def write_shards(source, out_dir: str | os.PathLike, examples_per_shard: int = 1000, *, prefix: str = "shard",
                 image_format: str = "png", captions: str | None = None, max_side: int | None = None,
                 overwrite: bool = False) -> ShardSummary:
    """Writes webdataset-layout tar shards ``{out_dir}/{prefix}-{n:06d}.tar`` of `examples_per_shard` examples.

    `source` is an image folder (read by `folder_records`, with `captions` and `max_side`) or an iterable of
    records: {"image": uint8 (H, W[, C]) array or PNG/JPEG/WebP/npy bytes, "caption": str, optional "json": dict,
    optional "key": str (default: the running number, nine digits)}. Arrays are stored as `image_format` ("png",
    "jpg" or "npy"). Each shard is written under a temporary name and renamed when complete. Shards of `prefix`
    already in `out_dir` are an error unless `overwrite` (then they are removed first).
    """
    if examples_per_shard <= 0:
        raise ConfigError(f"examples_per_shard must be positive, got {examples_per_shard}")
    if image_format not in ("png", "jpg", "npy"):
        raise ConfigError(f"image_format must be png, jpg or npy, got {image_format!r}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{prefix}-*.tar"))
    if existing and not overwrite:
        raise DataError(f"{out} already holds {len(existing)} '{prefix}-*.tar' shard(s); pass overwrite=True")
    for old in existing:
        old.unlink()
    skipped: list[str] = []
    records = folder_records(source, captions=captions, max_side=max_side, skipped=skipped) if isinstance(
        source, (str, os.PathLike)) else source
    writer = _ShardWriter(out, prefix)
    try:
        for n, record in enumerate(records):
            members = [_encode_image(record["image"], image_format),
                       ("txt", str(record.get("caption", "")).encode("utf-8"))]
            if record.get("json") is not None:
                members.append(("json", json.dumps(record["json"], sort_keys=True).encode("utf-8")))
            writer.add(str(record.get("key", f"{n:09d}")), members, examples_per_shard)
    except BaseException:
        writer.abort()
        raise
    writer.finish()
    paths, counts = writer.paths, writer.counts
    if skipped:
        logger.warning("shards: skipped %d unreadable image(s) under %s", len(skipped), source)
    return ShardSummary(tuple(paths), tuple(counts), tuple(skipped))
