"""A user's folder of captioned images as a tfds dataset.

Captions come from, in order: the `captions` file given in the config; a ``metadata.jsonl``,
``captions.jsonl``, ``metadata.csv`` or ``captions.csv`` at the folder root (rows with a file column
``file_name``/``file``/``image``/``path`` relative to the root, and a text column ``text``/``caption``/
``prompt``); else a sidecar ``.txt`` next to each image. Images without any caption get "".

Caption files must be UTF-8 (a one-line ConfigError names a file that is not). Every image is decoded by
``ldm_jax.images.load_rgb`` (any mode Pillow reads: 16-bit, palette, CMYK, EXIF-rotated; transparency composited
on white) and re-encoded as RGB PNG, optionally shrunk to ``max_side``. Files that cannot be decoded are
skipped, counted and reported: a warning at build time and ``builder.info.metadata["skipped"]`` (a list of
"path: reason"), which `builders.prepare` returns. The config name holds a digest of the folder listing (paths,
sizes, mtimes), so changing the folder prepares a new version instead of silently reusing a stale one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import zlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data.common import DataError, OutsideTfdsMixin, encode_png, logger, options_digest
from ldm_jax.images import load_rgb
from ldm_jax.types import read_utf8

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_FILES = ("metadata.jsonl", "captions.jsonl", "metadata.csv", "captions.csv")
_FILE_KEYS = ("file_name", "file", "image", "path", "filename")
_TEXT_KEYS = ("text", "caption", "prompt")


def list_images(root: str | Path) -> list[Path]:
    """Image files under `root` (recursive, sorted); one-line DataError when there are none."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"image_folder: '{root}' does not exist; point data.builder_kwargs.path at a folder")
    if not root.is_dir():
        raise DataError(f"image_folder: '{root}' is not a folder; point data.builder_kwargs.path at one")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) found under '{root}'")
    return files


def _pick(row: dict, keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        if key in row:
            return str(row[key])
    raise DataError(f"{where}: expected one of the columns {keys}, got {sorted(row)}")


def read_caption_file(path: Path) -> dict[str, str]:
    """{relative file name: caption} from a JSONL or CSV caption file."""
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(read_utf8(path, "captions file").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    elif path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(read_utf8(path, "captions file"), newline="")))
    else:
        raise DataError(f"caption file '{path}' must end in .jsonl or .csv")
    return {
        Path(_pick(r, _FILE_KEYS, str(path))).as_posix(): _pick(r, _TEXT_KEYS, str(path)).strip() for r in rows
    }


def find_captions(root: Path, files: list[Path], captions: str | None) -> dict[str, str]:
    """{relative path: caption} for the files that have one (see module docstring for the sources)."""
    if captions:
        path = Path(captions).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.exists():
            raise DataError(f"image_folder: caption file '{path}' does not exist")
        return read_caption_file(path)
    for name in CAPTION_FILES:
        if (root / name).exists():
            return read_caption_file(root / name)
    found = {}
    for f in files:
        sidecar = f.with_suffix(".txt")
        if sidecar.exists():
            found[f.relative_to(root).as_posix()] = read_utf8(sidecar, "caption file").strip()
    return found


def folder_digest(root: Path, files: list[Path]) -> str:
    """Digest of the folder's image and caption files (relative path, size, mtime)."""
    extra = [root / n for n in CAPTION_FILES] + [f.with_suffix(".txt") for f in files]
    listing = []
    for f in files + [p for p in extra if p.exists()]:
        stat = f.stat()
        listing.append((f.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return options_digest(sorted(listing))


def folder_image(path: Path, max_side: int | None) -> np.ndarray:
    """uint8 (H, W, 3) of an image file as `images.load_rgb` reads it (any mode, upright, transparency on white),
    shrunk (Lanczos) so that its longer side is at most `max_side`; ConfigError on unreadable files."""
    image = load_rgb(path)
    if max_side and max(image.shape[:2]) > max_side:
        pil = Image.fromarray(image)
        pil.thumbnail((max_side, max_side), Image.LANCZOS)
        image = np.asarray(pil)
    return image


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    path: str = ""
    captions: str | None = None  # JSONL/CSV caption file; None = auto-detect (see module docstring)
    max_side: int | None = None  # shrink larger images so that their longer side is max_side
    test_fraction: float = 0.0  # deterministic (CRC32 of the relative path) share put in a `test` split


def folder_config(path: str, **options) -> ImageFolderConfig:
    """An ImageFolderConfig named after the folder and a digest of its options and listing."""
    root = Path(path).expanduser().resolve()
    files = list_images(root)
    digest = options_digest({"path": str(root), **options, "listing": folder_digest(root, files)})
    slug = re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_") or "folder"
    return ImageFolderConfig(name=f"{slug}_{digest}", path=str(root), **options)


class ImageFolderBuilder(OutsideTfdsMixin, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds builder for a folder of images with captions (splits: train, and test if test_fraction > 0)."""

    name = "image_folder"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIG_CLASS = ImageFolderConfig

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images and captions from {self.builder_config.path}.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "file_name": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        root = Path(cfg.path)
        files = list_images(root)
        captions = find_captions(root, files, cfg.captions)
        rel = [f.relative_to(root).as_posix() for f in files]
        in_test = [zlib.crc32(r.encode("utf-8")) % 10_000 < cfg.test_fraction * 10_000 for r in rel]
        self.info.metadata["skipped"] = []
        self.info.metadata["num_files"] = len(files)
        self.info.metadata["num_uncaptioned"] = sum(r not in captions for r in rel)
        splits = {"train": [i for i, t in enumerate(in_test) if not t]}
        if cfg.test_fraction > 0:
            splits["test"] = [i for i, t in enumerate(in_test) if t]
        return {
            name: self._generate_examples([(files[i], rel[i]) for i in idx], captions)
            for name, idx in splits.items()
        }

    def _generate_examples(self, items, captions: dict[str, str]):
        skipped = self.info.metadata["skipped"]
        for path, rel in items:
            try:
                image = folder_image(path, self.builder_config.max_side)
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable": skip and report
                skipped.append(f"{rel}: {type(e).__name__}: {e}")
                logger.warning("image_folder: skipping unreadable image %s (%s)", path, e)
                continue
            caption = captions.get(rel, "")
            yield rel, {"image": encode_png(image), "caption": caption, "file_name": rel}
        if skipped:
            logger.warning(
                "image_folder: skipped %d unreadable image(s) of %d under %s",
                len(skipped), self.info.metadata["num_files"], self.builder_config.path,
            )

