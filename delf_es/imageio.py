"""Decode untrusted image input into an upright ``(H, W, 3)`` uint8 RGB array.

:func:`load_image` is the single entry point for image bytes (files, uploads,
downloads).  Anything it cannot turn into a usable picture raises
:class:`~delf_es.errors.InvalidImage` (or its subclass
:class:`~delf_es.errors.ImageTooLarge`), never a Pillow or OS exception.

Steps, in order:

0. A path is read through :func:`~delf_es.safe_files.read_regular_file`: only a regular file,
   at most ``settings.max_file_bytes`` (a FIFO, device or directory is refused, never read).
1. Identify the format from the header, only among :data:`SUPPORTED_FORMATS`
   (no Ghostscript-backed EPS, no header-less formats such as TGA that accept
   almost any bytes).
2. Check the header size before decoding anything: ``width * height`` must not
   exceed ``settings.max_pixels`` (decompression bombs) and both sides must be at
   least ``settings.min_image_side`` px.
3. Decode the first frame (GIF, TIFF, MPO may hold more).  Truncated data is an
   error: Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched.  A JPEG
   whose entropy-coded data ends before the size its header claims (libjpeg would fill
   the rest with grey, and Pillow does not report it) is refused: see :func:`_check_jpeg_complete`.
4. Apply the EXIF orientation, so the result is upright.
5. Convert to 8-bit RGB; see :func:`to_rgb` for how each mode is mapped.

No global Pillow state (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``, warning
filters) is changed.  Pillow refuses on its own images above
``2 * PIL.Image.MAX_IMAGE_PIXELS`` (about 179 Mpx) while reading the header;
that refusal is reported as :class:`ImageTooLarge` too, so the effective cap is
the smaller of the two.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from delf_es.errors import FeatureShapeError, ImageTooLarge, InvalidImage, InvalidRequest, UnreadableFile
from delf_es.fetch import fetch_url
from delf_es.safe_files import read_regular_file
from delf_es.settings import Settings

__all__ = [
    "SUPPORTED_FORMATS",
    "ImageSource",
    "LoadedImage",
    "load_image",
    "load_image_from_url",
    "to_rgb",
]

logger = logging.getLogger(__name__)

#: Pillow format names :func:`load_image` will open.  "JPEG" also covers
#: multi-picture camera JPEGs, which Pillow then reports as format "MPO".
SUPPORTED_FORMATS: tuple[str, ...] = ("BMP", "GIF", "JPEG", "JPEG2000", "PNG", "PPM", "TIFF", "WEBP")

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO

# What Pillow raises on corrupt data while decoding (the same families Image.open
# itself turns into UnidentifiedImageError while probing formats, plus decoder errors).
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error, zlib.error,
)

_WHITE = (255, 255, 255, 255)
_INTEGER_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A decoded, upright image.

    Attributes:
        pixels: ``(H, W, 3)`` uint8, RGB, row-major, upright (EXIF orientation
            applied).  A fresh array owned by the caller.
        source: display name for messages: the path, the ``name`` given to
            :func:`load_image`, or ``"<bytes>"`` / ``"<stream>"``.
        size: ``(width, height)`` in px, after EXIF orientation.
    """

    pixels: np.ndarray
    source: str
    size: tuple[int, int]

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, np.ndarray) or p.ndim != 3 or p.shape[2] != 3 or p.dtype != np.uint8:
            got = f"{getattr(p, 'shape', '?')} {getattr(p, 'dtype', type(p).__name__)}"
            raise FeatureShapeError("pixels", "(H, W, 3) uint8", got)
        if tuple(self.size) != (p.shape[1], p.shape[0]):
            raise FeatureShapeError("size", f"(width, height) = {(p.shape[1], p.shape[0])}", str(self.size))


def load_image(source: ImageSource, settings: Settings, *, name: str | None = None) -> LoadedImage:
    """Decode ``source`` into an upright RGB :class:`LoadedImage`.

    Args:
        source: a filesystem path (``str`` or ``os.PathLike``; a ``str`` is always
            a path, never data), the encoded bytes, or a binary file-like object
            opened for reading (not closed here).
        settings: uses ``max_pixels`` and ``min_image_side`` (px).
        name: display name used in errors and in ``LoadedImage.source``
            (e.g. the URL or upload file name).

    Raises:
        InvalidImage: the file is missing or unreadable, not a regular file (FIFO, device,
            directory: refused without reading), larger than ``settings.max_file_bytes``, empty, not an image in
            one of :data:`SUPPORTED_FORMATS`, corrupt or truncated, or a side is
            shorter than ``settings.min_image_side``.
        ImageTooLarge: ``width * height`` in the header exceeds
            ``settings.max_pixels`` (checked before decoding).
        TypeError: ``source`` is none of the accepted types (a programming error).
    """
    display, fp = _prepare(source, name, settings)
    im = _open(fp, display)
    with im:
        _check_header_size(im.size, settings, display)
        if im.format in ("JPEG", "MPO"):
            _check_jpeg_complete(im.fp, display)
        upright = _decode_upright(im, display)
        try:
            pixels = to_rgb(upright)
        except _DECODE_ERRORS as exc:
            raise InvalidImage(f"cannot convert mode {upright.mode!r} to RGB: {exc}", display) from exc
    height, width = pixels.shape[:2]
    logger.debug("loaded %s: %dx%d px", display, width, height)
    return LoadedImage(pixels=pixels, source=display, size=(width, height))


def load_image_from_url(url: str, settings: Settings) -> LoadedImage:
    """Download ``url`` with :func:`~delf_es.fetch.fetch_url` and decode it.

    Raises:
        UnsafeURL, FetchFailed: see :func:`~delf_es.fetch.fetch_url`.
        InvalidImage, ImageTooLarge: see :func:`load_image`.
    """
    return load_image(fetch_url(url, settings), settings, name=url)


def to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image to a ``(H, W, 3)`` uint8 RGB array.

    - ``RGB``: as is.
    - Alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``) or a
      transparent colour (``P``/``L``/``RGB`` with ``transparency``): composited
      onto white, so transparent areas do not turn black.
    - 16/32-bit integer grey (``I;16``, ``I;16B``, ``I``): scaled by the bit range
      the data actually uses: ``bits = max(8, bit_length(max))`` and
      ``v * 255 / (2**bits - 1)``, so 12-bit data (0..4095) fills 0..255 and
      8-bit data in a 16-bit container stays unchanged.  Negative ``I`` values
      are shifted so the minimum becomes 0 first.
    - 32-bit float grey (``F``): values in [0, 1] are scaled by 255, values in
      [0, 255] kept, anything else stretched min..max to 0..255; NaN and inf
      become 0.
    - Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr`` ...): Pillow's
      ``convert("RGB")`` (CMYK without an ICC transform).

    Raises:
        ValueError: Pillow has no conversion from this mode.
    """
    mode = im.mode
    if mode in _INTEGER_GREY_MODES:
        return _grey_to_rgb(_scale_integer_grey(np.asarray(im)))
    if mode == "F":
        return _grey_to_rgb(_scale_float_grey(np.asarray(im)))
    if mode == "RGB" and "transparency" not in im.info:
        return np.array(im, dtype=np.uint8)
    bands = im.getbands()
    if "A" in bands or "a" in bands or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", im.size, _WHITE)
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _prepare(source: ImageSource, name: str | None, settings: Settings) -> tuple[str, BinaryIO]:
    """Return the display name and what to hand to ``Image.open``."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not isinstance(path, str):  # bytes path
            raise InvalidRequest("paths must be str or os.PathLike[str]")
        display = name or path
        try:
            data = read_regular_file(path, settings.max_file_bytes)
        except UnreadableFile as error:
            raise InvalidImage(error.message, display) from None
        return display, io.BytesIO(data)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return name or "<bytes>", io.BytesIO(bytes(source))
    if hasattr(source, "read"):
        stream_name = getattr(source, "name", None)
        return name or (stream_name if isinstance(stream_name, str) else "<stream>"), source
    raise InvalidRequest(f"expected a path, bytes or a binary file object, got {type(source).__name__}")


def _open(fp: str | BinaryIO, display: str) -> Image.Image:
    """``Image.open`` (reads the header only) with its errors made typed."""
    try:
        return Image.open(fp, formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise InvalidImage(
            f"not an image in a supported format ({', '.join(SUPPORTED_FORMATS)})", display
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own header check; the warning only arrives here if warnings are errors.
        raise ImageTooLarge(f"too many pixels: {exc}", display) from exc
    except FileNotFoundError as exc:
        raise InvalidImage("file not found", display) from exc
    except _DECODE_ERRORS as exc:  # unreadable file or stream, or a corrupt header
        raise InvalidImage(f"cannot read image: {exc}", display) from exc


def _check_jpeg_complete(fp: BinaryIO, display: str) -> None:
    """Refuse a JPEG whose entropy-coded data stops before the image its header describes.

    libjpeg treats such data as a warning ("Corrupt JPEG data: premature end of data segment",
    "Premature end of JPEG file"), fills the missing blocks with grey and carries on, and
    Pillow silences its warnings: a 384 px image whose header claims 9000x7000 would decode to
    63 Mpx of grey.  simplejpeg (libjpeg-turbo) decodes in ``strict`` mode, where warnings are
    errors, at 1/8 scale (the IDCT is skipped, every coefficient is still read).  Only the
    premature-end warnings refuse the image: others (e.g. "extraneous bytes before marker",
    common in camera files) decode fine in Pillow and are kept.  A JPEG simplejpeg cannot read
    at all (CMYK, arithmetic coding, lossless) gets no verdict here and is left to Pillow.
    """
    import simplejpeg

    try:
        position = fp.tell()
        fp.seek(0)
        data = fp.read()
        fp.seek(position)
    except (AttributeError, OSError, ValueError) as exc:  # Image.open made it seekable; be safe anyway
        raise InvalidImage(f"cannot re-read the JPEG data: {exc}", display) from None
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1, strict=True)
    except ValueError as exc:
        message = str(exc)
        if "premature end" in message.lower():
            raise InvalidImage(f"JPEG data ends before the size its header claims: {message}", display) from None
        logger.debug("simplejpeg could not check %s: %s", display, message)


def _check_header_size(size: tuple[int, int], settings: Settings, display: str) -> None:
    width, height = size
    if width * height > settings.max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} px = {width * height} pixels, more than max_pixels={settings.max_pixels}",
            display,
        )
    if min(width, height) < settings.min_image_side:
        raise InvalidImage(
            f"image is {width}x{height} px; both sides must be at least min_image_side={settings.min_image_side} px",
            display,
        )


def _decode_upright(im: Image.Image, display: str) -> Image.Image:
    """Decode the current (first) frame and apply the EXIF orientation."""
    try:
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: no second full-size copy
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"too many pixels: {exc}", display) from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"corrupt or truncated image data: {exc}", display) from exc
    return im


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, np.newaxis], 3, axis=2)


def _scale_integer_grey(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` integer grey of any byte order -> ``(H, W)`` uint8, by used bit range."""
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    shift = min(int(values.min()), 0)
    span = int(values.max()) - shift
    top = (1 << max(8, span.bit_length())) - 1
    scaled = (values.astype(np.float32) - np.float32(shift)) * np.float32(255.0 / top)
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _scale_float_grey(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` float grey -> ``(H, W)`` uint8; see :func:`to_rgb` for the rule."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    data = values.astype(np.float32)
    picked = data if finite.all() else data[finite]
    low, high = float(picked.min()), float(picked.max())
    if low >= 0.0 and high <= 1.0:
        scaled = data * np.float32(255.0)
    elif low >= 0.0 and high <= 255.0:
        scaled = data
    elif high > low:
        scaled = (data - np.float32(low)) * np.float32(255.0 / (high - low))
    else:  # one constant value outside [0, 255]: nothing to show
        scaled = np.zeros_like(data)
    scaled = np.where(finite, scaled, np.float32(0.0))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
