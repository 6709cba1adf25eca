"""Small, distinct real photos for the fault test (benchmarks/faults.py, tests/integration/test_faults.py).

The test is about reliability, not retrieval quality, so extraction must be cheap: every photo is
a paris250 database photo or a shared distractor wallpaper, shrunk to at most ``SIDE`` px.  Two
variants per source (the whole frame, and a centred crop of 60 % of it), so up to 2 x 311 = 622
photos; each file's decoded pixels are checked distinct (a SHA-256 of them), so "indexed exactly
once" is counted over photos that really differ, not copies.  The paris250 web photos (never
indexed) are the searching client's queries.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image, ImageOps

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SIDE = 256
#: Fraction of the width and height kept by the second variant (centred).
CROP = 0.6
JPEG_QUALITY = 88


def sources(shared: Path = SHARED) -> list[Path]:
    """Every paris250 database photo, then every distractor wallpaper, in a fixed order; the
    landmarks interleaved (so a prefix of N photos covers all five)."""
    db = shared / "paris250" / "db"
    groups = [sorted(folder.glob("*.jpg")) for folder in sorted(p for p in db.iterdir() if p.is_dir())]
    spread = [path for group in zip(*groups) for path in group]
    spread += [p for group in groups for p in group[min(map(len, groups)):]]  # the uneven tails
    wallpapers = sorted(p for p in (shared / "distractors" / "wallpapers").iterdir()
                        if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return spread + wallpapers


def _variant(image: Image.Image, variant: int) -> Image.Image:
    if variant == 1:
        w, h = image.size
        dx, dy = int(w * (1 - CROP) / 2), int(h * (1 - CROP) / 2)
        image = image.crop((dx, dy, w - dx, h - dy))
    image = image.copy()
    image.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    return image


def derive(folder: Path, n: int, shared: Path = SHARED) -> list[Path]:
    """``n`` distinct photos written to ``folder`` (reused when already there); their paths.

    Raises:
        ValueError: more photos asked for than two variants of the sources give, or two derived
            photos with the same pixels (the count of "indexed once" would be dishonest).
    """
    found = sources(shared)
    if n > 2 * len(found):
        raise ValueError(f"{n} photos asked for; the shared data gives {2 * len(found)}")
    folder.mkdir(parents=True, exist_ok=True)
    plan = [(source, variant) for variant in (0, 1) for source in found][:n]
    paths, digests = [], {}
    for source, variant in plan:
        target = folder / f"{source.parent.name}__{source.stem}__v{variant}.jpg"
        if not target.is_file():
            with Image.open(source) as raw:
                picture = _variant(ImageOps.exif_transpose(raw).convert("RGB"), variant)
            picture.save(target.with_suffix(".tmp"), "JPEG", quality=JPEG_QUALITY)
            target.with_suffix(".tmp").rename(target)  # never a half-written photo on reuse
        with Image.open(target) as written:
            digest = hashlib.sha256(written.convert("RGB").tobytes()).hexdigest()
        if digest in digests:
            raise ValueError(f"{target.name} has the same pixels as {digests[digest]}")
        digests[digest] = target.name
        paths.append(target.resolve())
    return paths


def queries(folder: Path, shared: Path = SHARED) -> list[Path]:
    """The paris250 web photos (not in the indexed set), shrunk like the indexed ones."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for source in sorted((shared / "paris250" / "web").glob("*/*.jpg")):
        target = folder / f"query__{source.parent.name}__{source.stem}.jpg"
        if not target.is_file():
            with Image.open(source) as raw:
                _variant(ImageOps.exif_transpose(raw).convert("RGB"), 0).save(target, "JPEG", quality=JPEG_QUALITY)
        out.append(target.resolve())
    return out
