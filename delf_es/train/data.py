"""Training sets: an ImageFolder tree or the Google Landmarks v2 ``train.csv`` layout, plus a
held-out split.  Only paths and labels here; pixels are read by the view builders."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from delf_es.errors import InvalidImage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp"}
#: label of background / distractor images (no landmark): see ``TrainSet.background``
BACKGROUND = -1


@dataclass(frozen=True)
class TrainItem:
    """One training image.  ``label`` indexes ``TrainSet.classes``, or is BACKGROUND."""

    path: Path
    label: int


@dataclass(frozen=True)
class TrainSet:
    """Attributes:
    items: every image, background images last.
    classes: class names; labels index this list.
    """

    items: tuple[TrainItem, ...]
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def background(self) -> tuple[TrainItem, ...]:
        return tuple(i for i in self.items if i.label == BACKGROUND)


def _images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def with_background(items: list[TrainItem], classes: list[str], background: Path | None) -> TrainSet:
    if background is not None:
        found = _images_below(Path(background))
        if not found:
            raise InvalidImage("no images in the background folder", str(background))
        items = items + [TrainItem(p, BACKGROUND) for p in found]
    return TrainSet(tuple(items), tuple(classes))


def image_folder(root: Path, background: Path | None = None) -> TrainSet:
    """``root/<class>/**/<image>`` (torchvision ImageFolder layout; images in sub-folders count too)."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidImage("training folder not found", str(root))
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and _images_below(d))
    if not classes:
        raise InvalidImage("no class folders with images", str(root))
    items = [TrainItem(p, label) for label, name in enumerate(classes) for p in _images_below(root / name)]
    return with_background(items, classes, background)


def gldv2_csv(csv_path: Path, image_root: Path, background: Path | None = None) -> TrainSet:
    """Google Landmarks v2 ``train.csv`` (columns ``id,landmark_id[,url]``); image ``id`` is at
    ``image_root/id[0]/id[1]/id[2]/id.jpg`` as in the GLDv2 tarballs.  Rows whose file is
    missing are skipped (the dataset is usually downloaded in parts)."""
    csv_path, image_root = Path(csv_path), Path(image_root)
    if not csv_path.is_file():
        raise InvalidImage("train.csv not found", str(csv_path))
    rows = []
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"id", "landmark_id"} <= set(reader.fieldnames):
            raise InvalidImage("train.csv needs the columns id,landmark_id", str(csv_path))
        for row in reader:
            image_id = row["id"]
            path = image_root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
            if path.is_file():
                rows.append((row["landmark_id"], path))
    if not rows:
        raise InvalidImage(f"no image of train.csv found under {image_root}", str(csv_path))
    classes = sorted({landmark for landmark, _ in rows}, key=lambda s: (len(s), s))
    index = {name: label for label, name in enumerate(classes)}
    items = [TrainItem(path, index[landmark]) for landmark, path in rows]
    return with_background(items, classes, background)


def split_holdout(train_set: TrainSet, fraction: float, seed: int = 0) -> tuple[set[Path], set[int]]:
    """Held-out split.  Classes with two or more images give ``fraction`` of their images
    (at least one, never all) to validation.  Classes with a single image cannot, so their
    image is held out at the view level: returns (held-out image paths, labels whose
    validation is by held-out augmented views of the training image)."""
    rng = random.Random(seed)
    by_class: dict[int, list[Path]] = {}
    for item in train_set.items:
        by_class.setdefault(item.label, []).append(item.path)
    held, view_level = set(), set()
    for label, paths in sorted(by_class.items()):
        if fraction <= 0:
            break
        if len(paths) < 2:
            view_level.add(label)
            continue
        count = min(len(paths) - 1, max(1, round(len(paths) * fraction)))
        held.update(rng.sample(sorted(paths), count))
    return held, view_level
