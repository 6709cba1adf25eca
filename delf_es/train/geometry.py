"""Self-supervised pairs with known geometry: a photo view and a random homography warp of it.

No landmark labels are needed: view A is a square crop of a photo, view B is the same region
seen through a random homography (rotation within +-``max_rotation_deg``, log-uniform scale
change, perspective, shift) with photometric changes (Gaussian blur, JPEG, colour, gamma /
illumination).  ``H`` maps A's pixels to B's, so the cell of B where every cell of A lands is
known: dense supervision for a matchability head and for a local descriptor.

Each view's frozen-backbone stride-16 map is computed once and stored as float16
(``maps-a.npy``/``maps-b.npy``, (N, C, S/16, S/16)) with ``pairs.json`` (the homographies, the
photo of each pair, train/val split by photo).  The folder name hashes everything that fixes
its content; it is built in a temp folder and renamed, so an interrupted build leaves nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter
from tqdm import tqdm

from delf_es.errors import ConfigurationError, DelfEsError
from delf_es.imageio import load_image
from delf_es.model.delf import DelfModel, ModelMeta
from delf_es.settings import Settings
from delf_es.train.view_cache import local_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarpConfig:
    """Attributes:
    size: side of both views, px (multiple of 32; the map is size/16 cells a side).
    pairs_per_image: (view, warp) pairs per photo.
    max_rotation_deg: rotation drawn uniformly in +-this.
    scale_range: scale change of B relative to A, drawn log-uniformly.
    perspective: largest projective term, in units of 1/size.
    crop_range: A's crop side as a fraction of the photo's short side.
    holdout: fraction of photos whose pairs are validation.
    seed: for everything random.
    """

    size: int = 320
    pairs_per_image: int = 2
    max_rotation_deg: float = 30.0
    scale_range: tuple[float, float] = (0.6, 1.6)
    perspective: float = 0.3
    crop_range: tuple[float, float] = (0.5, 1.0)
    holdout: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size % 32 or self.size <= 0:
            raise ConfigurationError("size must be a positive multiple of 32")


def random_homography(size: int, config: WarpConfig, rng: np.random.Generator) -> np.ndarray:
    """(3, 3) float64 H mapping view A's px to view B's px (both ``size`` a side): rotation and
    scale about the centre, a perspective term and a shift that keeps the centre in view."""
    centre = (size - 1) / 2
    angle = np.deg2rad(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
    scale = float(np.exp(rng.uniform(*np.log(config.scale_range))))
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    to_origin = np.array([[1, 0, -centre], [0, 1, -centre], [0, 0, 1]], np.float64)
    similarity = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], np.float64)
    projective = np.eye(3)
    projective[2, :2] = rng.uniform(-config.perspective, config.perspective, 2) / size
    shift = rng.uniform(-0.15, 0.15, 2) * size
    back = np.array([[1, 0, centre + shift[0]], [0, 1, centre + shift[1]], [0, 0, 1]], np.float64)
    h = back @ projective @ similarity @ to_origin
    return h / h[2, 2]


def photometric(view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, colour/illumination change and JPEG recompression of an (S, S, 3) uint8 view."""
    image = view.astype(np.float32) / 255.0
    gain = rng.uniform(0.7, 1.3, 3).astype(np.float32)  # colour balance
    gamma = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))  # illumination
    # a smooth illumination gradient across the view
    yy, xx = np.mgrid[0 : view.shape[0], 0 : view.shape[1]].astype(np.float32) / max(view.shape[:2])
    direction = rng.normal(size=2).astype(np.float32)
    ramp = 1.0 + 0.3 * (direction[0] * (xx - 0.5) + direction[1] * (yy - 0.5))
    image = np.clip(image * gain * ramp[..., None], 0, 1) ** gamma
    out = Image.fromarray((image * 255).round().astype(np.uint8))
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 2.0))))
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=int(rng.integers(30, 95)))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def render_pair(pixels: np.ndarray, config: WarpConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(view A, view B, H A->B): A a square crop of ``pixels`` resized to ``config.size``; B the
    photo warped so that B = H(A) (content outside A's crop is real photo, not black, where the
    photo extends), then photometrically changed."""
    height, width = pixels.shape[:2]
    size = config.size
    side = max(32, int(round(min(width, height) * rng.uniform(*config.crop_range))))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    k = size / side
    # crop + resize as a matrix: photo px -> A px
    photo_to_a = np.array([[k, 0, (k - 1) / 2 - k * left], [0, k, (k - 1) / 2 - k * top], [0, 0, 1]], np.float64)
    h = random_homography(size, config, rng)
    flags = cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
    view_a = cv2.warpPerspective(pixels, photo_to_a, (size, size), flags=flags, borderMode=cv2.BORDER_REFLECT)
    photo_to_b = h @ photo_to_a
    view_b = cv2.warpPerspective(pixels, photo_to_b, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return view_a, photometric(view_b, rng), h


def cell_centres_px(cells: int, start: float, jump: float) -> np.ndarray:
    """(cells*cells, 2) float64 (x, y) px of a square map's cell centres, row-major."""
    centres = start + jump * np.arange(cells, dtype=np.float64)
    xx, yy = np.meshgrid(centres, centres)
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def warp_points(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) px -> (N, 2) px under the (3, 3) homography (inf where it maps to infinity)."""
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.asarray(h).T
    w = homogeneous[:, 2:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = homogeneous[:, :2] / w
    out[~np.isfinite(out).all(axis=1) | (w[:, 0] <= 1e-9)] = np.inf
    return out


@dataclass(frozen=True)
class PairCache:
    """Attributes:
    folder: where maps-a.npy, maps-b.npy and pairs.json live.
    homographies: (N, 3, 3) float64 A -> B.
    photos: (N,) index of each pair's photo in ``photo_paths``.
    split: (N,) "train" / "val".
    rf_start, rf_jump: cell-centre geometry of the maps, px of the views.
    """

    folder: Path
    homographies: np.ndarray
    photos: np.ndarray
    split: np.ndarray
    photo_paths: tuple[str, ...]
    size: int
    local_dim: int
    rf_start: float
    rf_jump: float

    def maps(self, which: str) -> np.ndarray:
        """(N, C, S/16, S/16) float16, memory-mapped read-only; ``which`` is "a" or "b"."""
        return np.load(self.folder / f"maps-{which}.npy", mmap_mode="r")

    @property
    def cells(self) -> int:
        return self.size // 16

    @property
    def num_photos(self) -> int:
        """Photos with at least one train or val pair."""
        return len(set(self.photos[self.split != "unused"].tolist()))

    @classmethod
    def load(cls, folder: Path) -> "PairCache":
        meta = json.loads((Path(folder) / "pairs.json").read_text())
        return cls(Path(folder), np.array(meta["homographies"], np.float64), np.array(meta["photos"], np.int64),
                   np.array(meta["split"]), tuple(meta["photo_paths"]), meta["config"]["size"], meta["local_dim"],
                   meta["rf_start"], meta["rf_jump"])


def pair_cache_key(paths: list[Path], meta: ModelMeta, config: WarpConfig) -> str:
    digest = hashlib.sha256(json.dumps([meta.backbone, meta.local_layer, meta.backbone_digest, asdict(config)]).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def build_pair_cache(paths: list[Path], model: DelfModel, meta: ModelMeta, config: WarpConfig, root: Path,
                     settings: Settings) -> PairCache:
    """Render ``config.pairs_per_image`` pairs of every photo and cache both views' maps (or reuse)."""
    paths = sorted(Path(p) for p in paths)
    folder = Path(root) / pair_cache_key(paths, meta, config)
    if (folder / "pairs.json").is_file():
        log.info("reusing pair cache %s", folder)
        return PairCache.load(folder)
    rng_split = np.random.default_rng([config.seed, 7])
    held = set(rng_split.permutation(len(paths))[: int(round(config.holdout * len(paths)))].tolist())
    n = len(paths) * config.pairs_per_image
    cells = config.size // 16
    Path(root).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        arrays = {w: np.lib.format.open_memmap(scratch / f"maps-{w}.npy", mode="w+", dtype=np.float16,
                                               shape=(n, meta.local_dim, cells, cells)) for w in "ab"}
        homographies, photos, split, skipped, row = [], [], [], [], 0
        for index, path in enumerate(tqdm(paths, desc="caching pair maps", unit="photo")):
            try:
                pixels = load_image(path, settings).pixels
            except DelfEsError as error:
                skipped.append(str(error))
                continue
            rng = np.random.default_rng([config.seed, index])
            for _ in range(config.pairs_per_image):
                view_a, view_b, h = render_pair(pixels, config, rng)
                arrays["a"][row] = local_map(model, meta, view_a)
                arrays["b"][row] = local_map(model, meta, view_b)
                homographies.append(h.tolist())
                photos.append(index)
                split.append("val" if index in held else "train")
                row += 1
        for array in arrays.values():
            array.flush()
        if row < n:  # skipped photos: shrink to the rows written
            for w in "ab":
                full = np.load(scratch / f"maps-{w}.npy", mmap_mode="r")
                np.save(scratch / f"maps-{w}.tmp.npy", np.asarray(full[:row]))
                del full
                os.replace(scratch / f"maps-{w}.tmp.npy", scratch / f"maps-{w}.npy")
        rf = meta.receptive_field
        (scratch / "pairs.json").write_text(json.dumps({
            "config": asdict(config), "local_dim": meta.local_dim, "rf_start": rf.start, "rf_jump": rf.jump,
            "homographies": homographies, "photos": photos, "split": split,
            "photo_paths": [str(p) for p in paths], "skipped": skipped,
            "backbone": meta.backbone, "local_layer": meta.local_layer, "backbone_digest": meta.backbone_digest,
        }))
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return PairCache.load(folder)


def correspondence_targets(cache: PairCache, index: int) -> tuple[np.ndarray, np.ndarray]:
    """For pair ``index``: (cells*cells,) int64 index of the B cell nearest to where each A cell
    lands (-1 when it lands outside B, further than half a stride from every cell), and the
    (cells*cells,) float64 distance, px, from that landing point to the chosen cell's centre."""
    cells = cache.cells
    centres = cell_centres_px(cells, cache.rf_start, cache.rf_jump)
    landed = warp_points(cache.homographies[index], centres)
    grid = np.round((landed - cache.rf_start) / cache.rf_jump)
    inside = np.isfinite(landed).all(axis=1) & (grid >= 0).all(axis=1) & (grid < cells).all(axis=1)
    target = np.full(len(centres), -1, np.int64)
    gx, gy = grid[inside, 0].astype(np.int64), grid[inside, 1].astype(np.int64)
    target[inside] = gy * cells + gx
    distance = np.full(len(centres), np.inf)
    distance[inside] = np.linalg.norm(landed[inside] - centres[target[inside]], axis=1)
    return target, distance


def restrict_to_photos(cache: PairCache, names: set[str]) -> PairCache:
    """``cache`` with the pairs of photos whose file name is not in ``names`` marked "unused"."""
    keep = np.array([Path(cache.photo_paths[i]).name in names for i in cache.photos], bool)
    return replace(cache, split=np.where(keep, cache.split, "unused"))
