"""The photos INT8 is calibrated on, and their digest (part of an INT8 model id).

Torch-free, so the model identity (:mod:`delf_es.model.spec`) can name an INT8 model without
building one; :mod:`delf_es.model.runtime` quantises with the same photos.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from delf_es.errors import RuntimeUnavailable

#: image files a calibration folder contributes
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".pgm"}


def training_photos(listing: Path | None = None) -> tuple[Path, ...]:
    """The photos INT8 is calibrated on: the files named in ``listing`` (one path per line,
    the output of scripts/training_images.sh) or the image files of a folder.

    Raises:
        RuntimeUnavailable: no listing, or a listed photo is missing.
    """
    if listing is None:
        raise RuntimeUnavailable("int8 needs calibration photos: set int8_calibration to the list written by "
                                 "scripts/training_images.sh", "openvino/int8")
    listing = Path(listing)
    if listing.is_dir():
        photos = sorted(p for p in listing.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    elif listing.is_file():
        photos = [Path(line.strip()) for line in listing.read_text().splitlines() if line.strip()]
    else:
        raise RuntimeUnavailable(f"calibration list {listing} does not exist", "openvino/int8")
    absent = [str(p) for p in photos if not p.is_file()]
    if absent or not photos:
        raise RuntimeUnavailable(f"calibration photos missing: {absent[:3] or [str(listing)]}", "openvino/int8")
    return tuple(photos)


def calibration_digest(photos: tuple[Path, ...]) -> str:
    """8 hex digits over the photos' names and bytes and the quantiser's version and options:
    another calibration set (or NNCF release) gives other INT8 weights, so another model id."""
    import nncf  # imported only for INT8, which needs it anyway

    digest = hashlib.sha256(f"nncf {nncf.__version__} performance fbc".encode())
    for path in sorted(photos, key=lambda p: p.name):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:8]
