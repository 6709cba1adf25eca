"""Behaviour of delf_es.imageio.load_image on good, odd and hostile input.

Every image is built with Pillow (or by hand, for headers Pillow would not
write) into tmp_path, so each case states exactly what is on disk.
"""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from delf_es import imageio
from delf_es.errors import FeatureShapeError, ImageTooLarge, InvalidImage
from delf_es.imageio import SUPPORTED_FORMATS, LoadedImage, load_image, load_image_from_url, to_rgb
from delf_es.settings import Settings

SETTINGS = Settings()  # max_pixels 64 Mpx, min_image_side 32 px


# --- helpers -------------------------------------------------------------------


def assert_pickles(exc: BaseException) -> None:
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is type(exc)
    assert clone.args == exc.args
    assert str(clone) == str(exc)


def save(tmp_path: Path, im: Image.Image, name: str, **params: object) -> Path:
    path = tmp_path / name
    im.save(path, **params)
    return path


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise compresses badly, so a file cut in half really misses image data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey but holds almost no data:
    decoding it fails, so only a header check can classify it."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def grey_12bit() -> np.ndarray:
    """(64, 64) uint16 holding every value 0..4095 once."""
    return np.arange(4096, dtype=np.uint16).reshape(64, 64)


def expected_8bit(values: np.ndarray, top: int) -> np.ndarray:
    return np.rint(values.astype(np.float64) * 255.0 / top).astype(np.uint8)


# --- sources and the result record ---------------------------------------------


def test_rgb_png_loads_exactly_from_path_bytes_and_stream(tmp_path: Path) -> None:
    original = noisy_rgb(64, 48)
    path = save(tmp_path, original, "photo.png")
    want = np.asarray(original)

    from_path = load_image(path, SETTINGS)
    from_str = load_image(str(path), SETTINGS)
    from_bytes = load_image(path.read_bytes(), SETTINGS)
    with path.open("rb") as stream:
        from_stream = load_image(stream, SETTINGS)
        assert not stream.closed  # the caller's stream is left open

    for loaded in (from_path, from_str, from_bytes, from_stream):
        assert loaded.pixels.shape == (48, 64, 3)
        assert loaded.pixels.dtype == np.uint8
        assert loaded.size == (64, 48)
        np.testing.assert_array_equal(loaded.pixels, want)


def test_source_is_path_or_name_or_placeholder(tmp_path: Path) -> None:
    path = save(tmp_path, noisy_rgb(40, 40), "a.png")
    data = path.read_bytes()
    assert load_image(path, SETTINGS).source == str(path)
    assert load_image(data, SETTINGS).source == "<bytes>"
    assert load_image(data, SETTINGS, name="upload.png").source == "upload.png"
    assert load_image(io.BytesIO(data), SETTINGS).source == "<stream>"
    with path.open("rb") as stream:
        assert load_image(stream, SETTINGS).source == str(path)


def test_non_seekable_stream_is_read(tmp_path: Path) -> None:
    data = save(tmp_path, noisy_rgb(40, 40), "a.png").read_bytes()

    class Pipe:
        def __init__(self, payload: bytes) -> None:
            self._buf = io.BytesIO(payload)

        def read(self, n: int = -1) -> bytes:
            return self._buf.read(n)

    assert load_image(Pipe(data), SETTINGS).size == (40, 40)


def test_bytearray_and_memoryview_are_accepted(tmp_path: Path) -> None:
    data = save(tmp_path, noisy_rgb(40, 40), "a.png").read_bytes()
    assert load_image(bytearray(data), SETTINGS).size == (40, 40)
    assert load_image(memoryview(data), SETTINGS).size == (40, 40)


def test_unsupported_source_type_raises_type_error() -> None:
    with pytest.raises(TypeError, match="int"):
        load_image(42, SETTINGS)  # type: ignore[arg-type]


def test_loaded_image_rejects_wrong_shape_dtype_or_size() -> None:
    with pytest.raises(FeatureShapeError, match="pixels"):
        LoadedImage(np.zeros((4, 4), np.uint8), "x", (4, 4))
    with pytest.raises(FeatureShapeError, match="pixels"):
        LoadedImage(np.zeros((4, 4, 3), np.float32), "x", (4, 4))
    with pytest.raises(FeatureShapeError, match="size"):
        LoadedImage(np.zeros((4, 6, 3), np.uint8), "x", (4, 6))  # size is (width, height) = (6, 4)
    assert LoadedImage(np.zeros((4, 6, 3), np.uint8), "x", (6, 4)).size == (6, 4)


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "JPEG", "JPEG2000", "PNG", "PPM", "TIFF", "WEBP"])
def test_every_supported_format_loads(tmp_path: Path, fmt: str) -> None:
    im = Image.new("RGB", (48, 40), (30, 140, 220))
    path = save(tmp_path, im, f"img.{fmt.lower()}", format=fmt)
    loaded = load_image(path, SETTINGS)
    assert loaded.size == (48, 40)
    assert np.abs(loaded.pixels[20, 24].astype(int) - (30, 140, 220)).max() <= 6


# --- broken and non-image input --------------------------------------------------


def test_truncated_jpeg_raises_invalid_image(tmp_path: Path) -> None:
    data = save(tmp_path, noisy_rgb(256, 256), "full.jpg", quality=95).read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImage, match="truncated") as info:
        load_image(path, SETTINGS)
    assert str(path) in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # global left alone
    assert_pickles(info.value)


def test_truncated_png_raises_invalid_image(tmp_path: Path) -> None:
    data = save(tmp_path, noisy_rgb(256, 256), "full.png").read_bytes()
    with pytest.raises(InvalidImage):
        load_image(data[: len(data) // 2], SETTINGS)


def test_jpeg_cut_after_header_raises_invalid_image(tmp_path: Path) -> None:
    data = save(tmp_path, noisy_rgb(128, 128), "full.jpg").read_bytes()
    with pytest.raises(InvalidImage):
        load_image(data[:700], SETTINGS)


def test_text_file_raises_invalid_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(InvalidImage, match="supported format") as info:
        load_image(path, SETTINGS)
    assert info.value.source == str(path)
    assert_pickles(info.value)


def test_empty_file_raises_invalid_image(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InvalidImage):
        load_image(path, SETTINGS)


def test_zero_bytes_raise_invalid_image() -> None:
    with pytest.raises(InvalidImage) as info:
        load_image(b"", SETTINGS)
    assert info.value.source == "<bytes>"


def test_missing_file_raises_invalid_image_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "missing.jpg"
    with pytest.raises(InvalidImage, match="not found") as info:
        load_image(path, SETTINGS)
    assert str(path) in str(info.value)
    assert_pickles(info.value)


def test_directory_raises_invalid_image(tmp_path: Path) -> None:
    with pytest.raises(InvalidImage):
        load_image(tmp_path, SETTINGS)


def test_tga_is_not_a_supported_format(tmp_path: Path) -> None:
    # TGA has no magic number: Pillow's TGA reader accepts many non-image files.
    assert "TGA" not in SUPPORTED_FORMATS
    path = save(tmp_path, Image.new("RGB", (40, 40), (1, 2, 3)), "img.tga")
    assert Image.open(path).format == "TGA"  # Pillow itself would open it
    with pytest.raises(InvalidImage, match="supported format"):
        load_image(path, SETTINGS)


def test_eps_is_refused_before_ghostscript_could_run(tmp_path: Path) -> None:
    path = tmp_path / "vector.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n%%EOF\n")
    with pytest.raises(InvalidImage, match="supported format"):
        load_image(path, SETTINGS)


# --- size limits ------------------------------------------------------------------


def test_header_over_max_pixels_raises_image_too_large_before_decoding() -> None:
    bomb = png_header_only(5000, 5000)  # 25 Mpx claimed, ~100 bytes on disk
    small_cap = Settings(max_pixels=1_000_000)
    with pytest.raises(ImageTooLarge, match="5000x5000") as info:
        load_image(bomb, small_cap)
    assert_pickles(info.value)
    # Under a cap it fits, the same bytes fail in decoding: so the size check ran first.
    with pytest.raises(InvalidImage) as decoded:
        load_image(bomb, Settings(max_pixels=30_000_000))
    assert not isinstance(decoded.value, ImageTooLarge)


def test_max_pixels_is_inclusive() -> None:
    im = Image.new("L", (100, 50), 9)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    assert load_image(buf.getvalue(), Settings(max_pixels=5000)).size == (100, 50)
    with pytest.raises(ImageTooLarge):
        load_image(buf.getvalue(), Settings(max_pixels=4999))


def test_header_beyond_pillow_limit_raises_image_too_large() -> None:
    # 900 Mpx: Pillow's own DecompressionBombError fires inside Image.open.
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge, match="too many pixels") as info:
        load_image(png_header_only(30000, 30000), Settings(max_pixels=10**10))
    assert Image.MAX_IMAGE_PIXELS == limit_before  # global left alone
    assert_pickles(info.value)


def test_decompression_bomb_warning_raised_as_error_becomes_image_too_large() -> None:
    # 100 Mpx lies between Pillow's warning and error thresholds.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLarge):
            load_image(png_header_only(10000, 10000), Settings(max_pixels=10**10))


def test_image_smaller_than_min_side_raises_invalid_image_with_size(tmp_path: Path) -> None:
    path = save(tmp_path, Image.new("RGB", (31, 100)), "thin.png")
    with pytest.raises(InvalidImage, match="31x100") as info:
        load_image(path, SETTINGS)
    assert not isinstance(info.value, ImageTooLarge)
    assert_pickles(info.value)


def test_image_exactly_min_side_is_accepted(tmp_path: Path) -> None:
    path = save(tmp_path, Image.new("RGB", (32, 32)), "edge.png")
    assert load_image(path, SETTINGS).size == (32, 32)


# --- EXIF orientation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "upright_size", "red_at", "white_at"),
    [
        (1, (80, 40), (4, 4), (75, 35)),  # stored upright
        (3, (80, 40), (75, 35), (4, 4)),  # stored upside down
        (6, (40, 80), (35, 4), (4, 4)),  # display = stored turned 90 degrees clockwise
        (8, (40, 80), (4, 75), (4, 4)),  # display = stored turned 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_is_applied(
    tmp_path: Path,
    orientation: int,
    upright_size: tuple[int, int],
    red_at: tuple[int, int],
    white_at: tuple[int, int],
) -> None:
    stored = Image.new("RGB", (80, 40), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path, stored, "rotated.jpg", quality=95, exif=exif)

    loaded = load_image(path, SETTINGS)

    assert loaded.size == upright_size
    assert loaded.pixels.shape == (upright_size[1], upright_size[0], 3)
    x, y = red_at
    assert np.abs(loaded.pixels[y, x].astype(int) - (255, 0, 0)).max() <= 12
    x, y = white_at
    assert np.abs(loaded.pixels[y, x].astype(int) - (255, 255, 255)).max() <= 12


# --- pixel modes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "make", "mode_on_disk"),
    [
        ("PNG", lambda a: Image.fromarray(a), "I;16"),
        ("TIFF", lambda a: Image.fromarray(a), "I;16"),
        ("TIFF", lambda a: Image.frombytes("I;16B", (64, 64), a.astype(">u2").tobytes()), "I;16B"),
        ("TIFF", lambda a: Image.fromarray(a.astype(np.int32)), "I"),
    ],
)
def test_12bit_grey_is_scaled_by_its_bit_range(tmp_path: Path, fmt: str, make, mode_on_disk: str) -> None:
    values = grey_12bit()
    path = save(tmp_path, make(values), f"grey.{fmt.lower()}", format=fmt)
    assert Image.open(path).mode == mode_on_disk

    pixels = load_image(path, SETTINGS).pixels

    want = expected_8bit(values, 4095)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[:, :, channel], want)
    assert pixels[0, 0, 0] == 0  # value 0
    assert pixels[63, 63, 0] == 255  # value 4095, not clipped to 255 of 65535
    assert pixels[32, 0, 0] == 128  # value 2048
    assert pixels[15, 40, 0] == 62  # value 1000: clipping would give 255


def test_full_range_16bit_grey_maps_65535_to_255(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    path = save(tmp_path, Image.fromarray(values), "grey16.png")
    pixels = load_image(path, SETTINGS).pixels
    np.testing.assert_array_equal(pixels[:, :, 0], expected_8bit(values, 65535))


def test_8bit_values_in_16bit_container_are_unchanged(tmp_path: Path) -> None:
    values = (np.arange(64 * 64) % 201).astype(np.uint16).reshape(64, 64)
    path = save(tmp_path, Image.fromarray(values), "grey16.png")
    np.testing.assert_array_equal(load_image(path, SETTINGS).pixels[:, :, 1], values.astype(np.uint8))


def test_negative_32bit_grey_is_shifted_to_zero(tmp_path: Path) -> None:
    values = (np.arange(64 * 64) % 201 - 100).astype(np.int32).reshape(64, 64)  # -100..100
    path = save(tmp_path, Image.fromarray(values), "signed.tiff")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(load_image(path, SETTINGS).pixels[:, :, 2], (values + 100).astype(np.uint8))


@pytest.mark.parametrize(
    ("values", "want"),
    [
        (np.linspace(0.0, 1.0, 4096), np.rint(np.linspace(0.0, 1.0, 4096) * 255)),  # [0, 1] -> x 255
        (np.linspace(0.0, 200.0, 4096), np.rint(np.linspace(0.0, 200.0, 4096))),  # [0, 255] kept
        (np.linspace(-1.0, 3.0, 4096), np.rint(np.linspace(0.0, 255.0, 4096))),  # stretched
    ],
    ids=["unit-range", "byte-range", "other-range"],
)
def test_float_grey_is_mapped_to_8bit(tmp_path: Path, values: np.ndarray, want: np.ndarray) -> None:
    path = save(tmp_path, Image.fromarray(values.astype(np.float32).reshape(64, 64)), "float.tiff")
    assert Image.open(path).mode == "F"
    got = load_image(path, SETTINGS).pixels[:, :, 0].astype(int)
    assert np.abs(got - want.reshape(64, 64)).max() <= 1


def test_float_grey_nan_and_inf_become_black(tmp_path: Path) -> None:
    values = np.full((64, 64), 0.5, dtype=np.float32)
    values[0, 0], values[0, 1], values[0, 2] = np.nan, np.inf, -np.inf
    path = save(tmp_path, Image.fromarray(values), "float.tiff")
    row = load_image(path, SETTINGS).pixels[0, :4, 0]
    np.testing.assert_array_equal(row, [0, 0, 0, 128])


def test_one_bit_image_becomes_black_and_white(tmp_path: Path) -> None:
    checker = (np.indices((40, 40)).sum(axis=0) % 2).astype(bool)
    path = save(tmp_path, Image.fromarray(checker), "bits.png")
    assert Image.open(path).mode == "1"
    pixels = load_image(path, SETTINGS).pixels
    np.testing.assert_array_equal(pixels[:, :, 0], np.where(checker, 255, 0))


def test_greyscale_is_copied_to_three_channels(tmp_path: Path) -> None:
    path = save(tmp_path, Image.new("L", (40, 40), 77), "grey.png")
    np.testing.assert_array_equal(load_image(path, SETTINGS).pixels[5, 5], [77, 77, 77])


def test_grey_with_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    im = Image.new("LA", (40, 40), (0, 0))  # black, fully transparent
    im.paste((50, 255), (20, 0, 40, 40))  # right half: grey 50, opaque
    path = save(tmp_path, im, "la.png")
    assert Image.open(path).mode == "LA"
    pixels = load_image(path, SETTINGS).pixels
    np.testing.assert_array_equal(pixels[10, 5], [255, 255, 255])
    np.testing.assert_array_equal(pixels[10, 30], [50, 50, 50])


def test_palette_image_without_transparency_keeps_its_colours(tmp_path: Path) -> None:
    im = Image.new("P", (40, 40), 1)
    im.putpalette([0, 0, 0, 12, 34, 56, 200, 100, 0] + [0] * (256 * 3 - 9))
    im.paste(2, (0, 0, 20, 40))
    path = save(tmp_path, im, "pal.png")
    assert Image.open(path).mode == "P"
    pixels = load_image(path, SETTINGS).pixels
    np.testing.assert_array_equal(pixels[10, 5], [200, 100, 0])
    np.testing.assert_array_equal(pixels[10, 30], [12, 34, 56])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white_not_black(tmp_path: Path, fmt: str) -> None:
    im = Image.new("P", (40, 40), 0)  # index 0: black, declared transparent
    im.putpalette([0, 0, 0, 200, 0, 0] + [0] * (256 * 3 - 6))
    im.paste(1, (20, 0, 40, 40))  # right half: opaque red
    path = save(tmp_path, im, f"pal.{fmt.lower()}", format=fmt, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    pixels = load_image(path, SETTINGS).pixels
    np.testing.assert_array_equal(pixels[10, 5], [255, 255, 255])
    np.testing.assert_array_equal(pixels[10, 30], [200, 0, 0])


def test_rgba_is_composited_onto_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (60, 40), (0, 0, 0, 0))  # transparent black
    im.paste((255, 0, 0, 128), (20, 0, 40, 40))  # half-transparent red
    im.paste((10, 120, 30, 255), (40, 0, 60, 40))  # opaque green
    path = save(tmp_path, im, "rgba.png")
    pixels = load_image(path, SETTINGS).pixels.astype(int)
    np.testing.assert_array_equal(pixels[20, 10], [255, 255, 255])
    assert np.abs(pixels[20, 30] - (255, 127, 127)).max() <= 1
    np.testing.assert_array_equal(pixels[20, 50], [10, 120, 30])


def test_premultiplied_rgba_is_composited_onto_white() -> None:
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0)).convert("RGBa")
    np.testing.assert_array_equal(to_rgb(im)[0, 0], [255, 255, 255])


@pytest.mark.parametrize(("fmt", "tolerance"), [("TIFF", 0), ("JPEG", 8)])
def test_cmyk_is_converted_to_the_right_rgb_colours(tmp_path: Path, fmt: str, tolerance: int) -> None:
    im = Image.new("CMYK", (64, 64), (255, 0, 0, 0))  # cyan
    im.paste((0, 255, 255, 0), (32, 0, 64, 32))  # magenta + yellow = red
    im.paste((0, 0, 0, 128), (32, 32, 64, 64))  # half black = mid grey
    path = save(tmp_path, im, f"cmyk.{fmt.lower()}", format=fmt, quality=98)
    assert Image.open(path).mode == "CMYK"
    pixels = load_image(path, SETTINGS).pixels.astype(int)
    assert np.abs(pixels[16, 16] - (0, 255, 255)).max() <= tolerance
    assert np.abs(pixels[16, 48] - (255, 0, 0)).max() <= tolerance
    assert np.abs(pixels[48, 48] - (127, 127, 127)).max() <= tolerance


def test_ycbcr_is_converted_to_rgb(tmp_path: Path) -> None:
    path = save(tmp_path, Image.new("RGB", (40, 40), (10, 200, 30)).convert("YCbCr"), "ycc.tiff")
    assert Image.open(path).mode == "YCbCr"
    pixel = load_image(path, SETTINGS).pixels[20, 20].astype(int)
    assert np.abs(pixel - (10, 200, 30)).max() <= 3


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_file_yields_its_first_frame(tmp_path: Path, fmt: str) -> None:
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / f"frames.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 3
    np.testing.assert_array_equal(load_image(path, SETTINGS).pixels[20, 20], [255, 0, 0])


# --- URL helper --------------------------------------------------------------------


def test_load_image_from_url_decodes_fetched_bytes_and_names_the_url(tmp_path: Path, monkeypatch) -> None:
    data = save(tmp_path, Image.new("RGB", (40, 40), (1, 2, 3)), "a.png").read_bytes()
    calls = []

    def fake_fetch(url: str, settings: Settings) -> bytes:
        calls.append(url)
        return data

    monkeypatch.setattr(imageio, "fetch_url", fake_fetch)
    loaded = load_image_from_url("https://example.org/a.png", SETTINGS)
    assert calls == ["https://example.org/a.png"]
    assert loaded.source == "https://example.org/a.png"
    np.testing.assert_array_equal(loaded.pixels[0, 0], [1, 2, 3])


def test_load_image_from_url_reports_bad_bytes_with_the_url(monkeypatch) -> None:
    monkeypatch.setattr(imageio, "fetch_url", lambda url, settings: b"<html>oops</html>")
    with pytest.raises(InvalidImage, match="https://example.org/x.jpg"):
        load_image_from_url("https://example.org/x.jpg", SETTINGS)
