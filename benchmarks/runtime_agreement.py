"""Two feature caches of one model from two runtimes (PyTorch, OpenVINO): how far apart, and why
their mAP differs (issue 12; benchmarks/results/checks/openvino-vs-torch.json).

    python benchmarks/runtime_agreement.py compare CACHE_A CACHE_B        # per-image agreement, JSON
    python benchmarks/runtime_agreement.py perturb SRC DST --seed S       # SRC + float32-sized noise
    python benchmarks/runtime_agreement.py reorder VALUES ORDER DST       # VALUES in ORDER's keypoint order

A cache is a feature-cache folder (the ``.npz`` files ``delf-es eval --cache`` writes, found at
any depth); the two caches of a comparison hold the same images under the same names.
A keypoint is identified by its location (0.1 px) and scale (0.001): both runtimes compute them
from the same grid, so equal keys are the same keypoint whatever order it was stored in.  Then
score ``DST`` with ``delf-es eval ... --cache DST`` (same code, same seed) to see what each change
does to the mAP.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PER_KEYPOINT = ("keypoints", "scales", "scores", "descriptors")
UNIT_VECTORS = ("descriptors", "global_desc")


def keypoint_keys(cache_file: dict) -> list[tuple[float, ...]]:
    """One hashable key per keypoint: (x, y) px to 0.1 and the scale to 0.001."""
    return [tuple(np.round(p, 1)) + (round(float(s), 3),) for p, s in zip(cache_file["keypoints"], cache_file["scales"])]


def cache_files(root: Path) -> list[Path]:
    files = sorted(root.rglob("*.npz"))
    if not files:
        raise SystemExit(f"no feature files (.npz) under {root}")
    return files


def write_like(source_root: Path, source: Path, target_root: Path, arrays: dict) -> None:
    out = target_root / source.relative_to(source_root)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)


def compare(a_root: Path, b_root: Path) -> dict:
    """Share of B's keypoints that A holds too, matched-descriptor and global cosines, per image."""
    rows = []
    for fa in cache_files(a_root):
        fb = b_root / fa.relative_to(a_root)
        if not fb.exists():
            continue
        a, b = dict(np.load(fa)), dict(np.load(fb))
        in_a = {key: i for i, key in enumerate(keypoint_keys(a))}
        same = [(in_a[key], j) for j, key in enumerate(keypoint_keys(b)) if key in in_a]
        ia = np.array([i for i, _ in same], int)
        ib = np.array([j for _, j in same], int)
        cosines = (a["descriptors"][ia] * b["descriptors"][ib]).sum(1) if len(same) else np.array([np.nan])
        order_differs = bool(len(same)) and not np.array_equal(ia, ib)
        rows.append((len(same) / max(len(a["keypoints"]), 1), float(np.median(cosines)), float(np.nanmin(cosines)),
                     float(a["global_desc"] @ b["global_desc"]), len(a["keypoints"]), len(b["keypoints"]), order_differs))
    r = np.array([row[:6] for row in rows], float)
    return {
        "images": len(rows), "kept_same_median": float(np.median(r[:, 0])), "kept_same_min": float(r[:, 0].min()),
        "kept_same_mean": float(r[:, 0].mean()), "desc_cos_median": float(np.median(r[:, 1])),
        "desc_cos_min": float(np.nanmin(r[:, 2])), "global_cos_median": float(np.median(r[:, 3])),
        "global_cos_min": float(r[:, 3].min()), "count_differs": int((r[:, 4] != r[:, 5]).sum()),
        "order_differs": int(sum(row[6] for row in rows)),
    }


def perturb(src: Path, dst: Path, seed: int, sigma: float = 2e-7) -> int:
    """Copy ``src`` with Gaussian noise of ``sigma`` per dimension (float32 rounding size, ~1e-7
    relative) on every descriptor and global vector, re-normalised; the keypoint order is kept."""
    rng = np.random.default_rng(seed)
    files = cache_files(src)
    for f in files:
        arrays = dict(np.load(f))
        for key in UNIT_VECTORS:
            v = arrays[key].astype(np.float64) + rng.normal(0, sigma, arrays[key].shape)
            norm = np.linalg.norm(v, axis=-1, keepdims=True)
            arrays[key] = (v / np.where(norm > 0, norm, 1)).astype(np.float32)
        write_like(src, f, dst, arrays)
    return len(files)


def reorder(values: Path, order: Path, dst: Path) -> int:
    """Write ``values``' features in ``order``'s keypoint order (the two hold the same keypoint sets)."""
    files = cache_files(values)
    for f in files:
        arrays = dict(np.load(f))
        position = {key: i for i, key in enumerate(keypoint_keys(arrays))}
        index = np.array([position[key] for key in keypoint_keys(dict(np.load(order / f.relative_to(values))))], int)
        for key in PER_KEYPOINT:
            arrays[key] = arrays[key][index]
        write_like(values, f, dst, arrays)
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compare", help="per-image agreement of two caches (JSON on stdout)")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    p = commands.add_parser("perturb", help="a copy with float32-sized noise")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--seed", type=int, default=0)
    o = commands.add_parser("reorder", help="one cache's values in another's keypoint order")
    o.add_argument("values", type=Path)
    o.add_argument("order", type=Path)
    o.add_argument("dst", type=Path)
    args = parser.parse_args()
    if args.command == "compare":
        print(json.dumps(compare(args.a, args.b)))
    elif args.command == "perturb":
        print(f"{perturb(args.src, args.dst, args.seed)} files written to {args.dst}")
    else:
        print(f"{reorder(args.values, args.order, args.dst)} files written to {args.dst}")


if __name__ == "__main__":
    main()
