"""Every image mode Pillow reads loads as the RGB it shows (ldm_jax.images.load_rgb and its callers), and text files
that are not UTF-8 give one-line errors. Files are written into tmp_path; nothing is compiled."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ldm_jax import images as imlib
from ldm_jax.data import builders, image_folder
from ldm_jax.eval.frechet import frechet_distance
from ldm_jax.types import ConfigError, read_utf8

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _png16(path, values: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): gray (H, W), gray+alpha (H, W, 2),
    RGB (H, W, 3) or RGBA (H, W, 4)."""
    h, w = values.shape[:2]
    color_type = 0 if values.ndim == 2 else {2: 4, 3: 2, 4: 6}[values.shape[2]]
    rows = values.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _gray(values) -> np.ndarray:
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=-1)


def _over_white(color, alpha) -> np.ndarray:
    a = np.asarray(alpha, np.float64)[..., None] / 255.0
    return np.round(np.asarray(color, np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def test_16bit_gray_is_scaled_by_257(tmp_path):
    v = np.arange(0, 65536, 97, dtype=np.uint16)[:600].reshape(20, 30)
    v[0, :3] = (0, 65535, 257 * 100 + 128)  # the ends, and a value that rounds up
    expected = _gray(np.round(v / 257.0))
    _png16(tmp_path / "gray16.png", v)
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    np.testing.assert_array_equal(imlib.load_rgb(tmp_path / "gray16.png"), expected)
    big_endian = Image.frombytes("I;16B", (30, 20), v.astype(">u2").tobytes())
    np.testing.assert_array_equal(imlib.load_rgb(big_endian), expected)
    (tmp_path / "gray16.pgm").write_bytes(b"P5 30 20 65535\n" + v.astype(">u2").tobytes())
    assert Image.open(tmp_path / "gray16.pgm").mode == "I"
    np.testing.assert_array_equal(imlib.load_rgb(tmp_path / "gray16.pgm"), expected)
    # batches and masks use the same reader (the mask's bright half is "repaint")
    assert imlib.as_image_batch(str(tmp_path / "gray16.png")).shape == (1, 20, 30, 3)
    half = np.zeros((4, 6), np.uint16)
    half[:, 3:] = 40000
    _png16(tmp_path / "mask16.png", half)
    np.testing.assert_array_equal(imlib.as_mask_batch(tmp_path / "mask16.png")[0, ..., 0], half > 0)


def test_16bit_rgb_and_alpha_keep_the_high_byte(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, (6, 7, 3)).astype(np.uint16)
    _png16(tmp_path / "rgb16.png", rgb)
    got = imlib.load_rgb(tmp_path / "rgb16.png")
    np.testing.assert_array_equal(got, rgb >> 8)  # Pillow has no 48-bit mode: the documented limit
    assert np.abs(got.astype(int) - np.round(rgb / 257.0)).max() <= 1
    rgba = rng.integers(0, 65536, (6, 7, 4)).astype(np.uint16)
    _png16(tmp_path / "rgba16.png", rgba)
    np.testing.assert_array_equal(imlib.load_rgb(tmp_path / "rgba16.png"), _over_white(rgba[..., :3] >> 8,
                                                                                       rgba[..., 3] >> 8))
    la = rng.integers(0, 65536, (6, 7, 2)).astype(np.uint16)
    _png16(tmp_path / "la16.png", la)
    np.testing.assert_array_equal(imlib.load_rgb(tmp_path / "la16.png"), _over_white(_gray(la[..., 0] >> 8),
                                                                                     la[..., 1] >> 8))


def test_16bit_pngs_load_as_their_8bit_versions(tmp_path):
    """The issue's case: a set of 16-bit PNGs against itself saved at 8 bits gave FD 12.8; now the arrays match."""
    rng = np.random.default_rng(1)
    (tmp_path / "16").mkdir()
    (tmp_path / "8").mkdir()
    for i in range(6):
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        if i % 2:
            image = _gray(image[..., 0])
            _png16(tmp_path / "16" / f"{i}.png", image[..., 0].astype(np.uint16) * 257)
        else:
            _png16(tmp_path / "16" / f"{i}.png", image.astype(np.uint16) * 257)
        Image.fromarray(image).save(tmp_path / "8" / f"{i}.png")
    sets = [np.stack([imlib.read_image(tmp_path / d / f"{i}.png")[0] for i in range(6)]) for d in ("16", "8")]
    np.testing.assert_array_equal(sets[0], sets[1])
    feats = [s.reshape(6, 4, 16, 3).mean(axis=2).reshape(6, -1)[:, :4].astype(np.float64) for s in sets]
    fd = frechet_distance(feats[0].mean(0), np.cov(feats[0], rowvar=False), feats[1].mean(0),
                          np.cov(feats[1], rowvar=False))
    assert abs(fd) < 1e-6
    naive = np.asarray(Image.open(tmp_path / "16" / "1.png").convert("RGB"))  # Pillow's own conversion clips
    assert (naive == 255).mean() > 0.9 and not (sets[1][1] == 255).all()


def test_palette_with_and_without_transparency(tmp_path):
    index = np.array([[0, 1, 2, 3]] * 2, np.uint8)
    pal = Image.fromarray(index, "P")
    pal.putpalette([*RED, *GREEN, *BLUE, 10, 20, 30])
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "p_t.png", transparency=1)
    opaque = np.array([[RED, GREEN, BLUE, (10, 20, 30)]] * 2, np.uint8)
    np.testing.assert_array_equal(imlib.load_rgb(tmp_path / "p.png"), opaque)
    see_through = opaque.copy()
    see_through[:, 1] = WHITE
    np.testing.assert_array_equal(imlib.load_rgb(tmp_path / "p_t.png"), see_through)
    # the same palette as PA (alpha per pixel), an in-memory mode
    pa = pal.convert("PA")
    pa.putalpha(Image.fromarray(np.array([[255, 0, 128, 255]] * 2, np.uint8)))
    np.testing.assert_array_equal(imlib.load_rgb(pa), _over_white(opaque, [[255, 0, 128, 255]] * 2))


def test_transparency_is_composited_over_white_and_masks_over_black(tmp_path):
    alpha = np.array([[0, 64, 128, 255]], np.uint8)
    la = np.stack([np.full((1, 4), 100, np.uint8), alpha], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(imlib.load_rgb(tmp_path / "la.png"), _over_white(_gray([[100] * 4]), alpha))
    Image.fromarray(np.zeros((1, 2, 3), np.uint8)).save(tmp_path / "trns.png", transparency=(0, 0, 0))
    np.testing.assert_array_equal(imlib.load_rgb(tmp_path / "trns.png"), np.full((1, 2, 3), 255, np.uint8))
    rgba = np.zeros((2, 4, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 2:, 3] = 255  # white strokes on the right half of a transparent layer
    Image.fromarray(rgba).save(tmp_path / "mask.png")
    assert imlib.load_mask(tmp_path / "mask.png").tolist() == [[0, 0, 255, 255]] * 2
    np.testing.assert_array_equal(imlib.as_mask_batch(str(tmp_path / "mask.png"))[0, ..., 0], [[0, 0, 1, 1]] * 2)
    np.testing.assert_array_equal(imlib.as_image_batch(rgba)[0], _over_white(rgba[..., :3], rgba[..., 3]))


def test_cmyk_jpeg_and_tiff(tmp_path):
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:, :8], rgb[:, 8:16], rgb[:, 16:24], rgb[:, 24:] = RED, GREEN, BLUE, (128, 128, 128)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.tif")
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    np.testing.assert_array_equal(imlib.load_rgb(tmp_path / "cmyk.tif"), rgb)
    jpeg = imlib.load_rgb(tmp_path / "cmyk.jpg").astype(int)
    assert np.abs(jpeg - rgb).mean() < 4 and np.abs(jpeg - rgb)[4:-4, 2::8][:, :1].max() < 12


def test_exif_orientation_6_is_turned_upright(tmp_path):
    upright = np.zeros((32, 48, 3), np.uint8)  # quadrants: red, green / blue, white
    upright[:16, :24], upright[:16, 24:], upright[16:, :24], upright[16:, 24:] = RED, GREEN, BLUE, WHITE
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rotated.jpg", quality=95, subsampling=0, exif=exif)
    got = imlib.load_rgb(tmp_path / "rotated.jpg").astype(int)
    assert got.shape == upright.shape
    assert np.abs(got - upright).mean() < 3
    for (y, x) in ((8, 12), (8, 36), (24, 12), (24, 36)):  # block centres, away from JPEG ringing
        assert np.abs(got[y - 3:y + 3, x - 3:x + 3] - upright[y, x]).max() < 10


@pytest.mark.parametrize("mode, expected", [
    ("1", [[0] * 3, [255] * 3, [0] * 3, [0] * 3]),
    ("L", [[76] * 3, [150] * 3, [29] * 3, [128] * 3]),
    ("YCbCr", [[254, 0, 0], [0, 254, 0], [0, 0, 254], [128] * 3]),
    ("HSV", [RED, GREEN, BLUE, [128] * 3]),
    ("LAB", [[251, 5, 4], [13, 254, 14], [22, 7, 252], [128] * 3]),  # Pillow's conversion, not exact
    ("RGBa", [RED, GREEN, BLUE, [128] * 3]),
])
def test_other_modes_use_pillows_conversion(mode, expected):
    image = Image.fromarray(np.array([[RED, GREEN, BLUE, (128, 128, 128)]], np.uint8)).convert(mode)
    np.testing.assert_array_equal(imlib.load_rgb(image), np.array([expected], np.uint8))


def test_float_and_int_images(tmp_path):
    unit = np.array([[0.0, 0.5, 1.0, np.nan]], np.float32)
    Image.fromarray(unit, "F").save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(imlib.load_rgb(tmp_path / "unit.tif"), _gray([[0, 128, 255, 0]]))
    wide = np.array([[0.0, 257.0, 65535.0, 70000.0]], np.float32)  # above 1: the 16-bit range of "I"
    np.testing.assert_array_equal(imlib.load_rgb(Image.fromarray(wide, "F")), _gray([[0, 1, 255, 255]]))
    ints = Image.fromarray(np.array([[-5, 257 * 3, 65535, 1 << 20]], np.int32), "I")
    np.testing.assert_array_equal(imlib.load_rgb(ints), _gray([[0, 3, 255, 255]]))


def test_unreadable_and_empty_images_are_one_line_config_errors(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    buffer = tmp_path / "ok.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer)
    (tmp_path / "cut.png").write_bytes(buffer.read_bytes()[:60])
    cases = [(tmp_path / "junk.png", "junk.png"), (tmp_path / "cut.png", "cut.png"),
             (tmp_path / "missing.png", "missing.png' not found"), (Image.new("RGB", (0, 4)), "no pixels (0x4)")]
    for source, text in cases:
        with pytest.raises(ConfigError) as info:
            imlib.load_rgb(source, "--init_image")
        message = str(info.value)
        assert text in message and "\n" not in message and message.count("--init_image") == 1, message


def test_image_folder_reads_16bit_and_palette_pngs(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    gray = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    _png16(root / "gray16.png", gray)
    pal = Image.fromarray(np.array([[0, 1]] * 4, np.uint8), "P")
    pal.putpalette([*RED, *BLUE])
    pal.save(root / "palette.png", transparency=1)
    result = builders.prepare("image_folder", data_dir=str(tmp_path / "tfds"), path=str(root))
    source = result.source("train")
    records = {r["file_name"].decode(): r["image"] for r in (source[i] for i in range(len(source)))}
    np.testing.assert_array_equal(records["gray16.png"], _gray(np.round(gray / 257.0)))
    np.testing.assert_array_equal(records["palette.png"], np.array([[RED, WHITE]] * 4, np.uint8))


def test_text_files_that_are_not_utf8_name_the_file_and_the_fix(tmp_path):
    latin1 = "caf\u00e9 au lait\n".encode("latin-1")  # 0xe9 at offset 3
    for name in ("metadata.jsonl", "captions.csv", "sidecar.txt"):
        (tmp_path / name).write_bytes(latin1)
    image = tmp_path / "sidecar.png"
    Image.new("RGB", (4, 4)).save(image)
    calls = [lambda: image_folder.read_caption_file(tmp_path / "metadata.jsonl"),
             lambda: image_folder.read_caption_file(tmp_path / "captions.csv"),
             lambda: image_folder.find_captions(tmp_path, [image], None),
             lambda: read_utf8(tmp_path / "sidecar.txt", "prompts file")]
    for call in calls:
        with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at offset 3\): save it as UTF-8"):
            call()
    (tmp_path / "prompts.txt").write_bytes(b"a red apple\n" + latin1)
    from ldm_jax.commands.sample import read_prompts  # the command's own reader (imports the CLI's flags)

    with pytest.raises(ConfigError) as info:
        read_prompts([], str(tmp_path / "prompts.txt"))
    assert str(info.value) == (f"prompts file '{tmp_path / 'prompts.txt'}' is not UTF-8 text (byte 0xe9 at offset "
                               "15): save it as UTF-8")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "caf\u00e9\r\nthe end".encode())
    assert read_utf8(tmp_path / "bom.txt", "prompts file").splitlines() == ["caf\u00e9", "the end"]
