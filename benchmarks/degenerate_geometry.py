"""Choose the flat-keypoint and inlier-spread thresholds of ``delf_es/degenerate.py`` (issue 15
item 11) on the verification pairs and training photos, never paris250.

* True pairs: the 15 EVD pairs and HPatches v_dogman 1 vs 2..6 (``../shared/data/pairs``).
  For each: inliers of the default verification without the checks, the inliers' spread
  (minor-axis std, px) in both images, and the inliers left with each candidate threshold.
* False pairs: every EVD image 1 against every other scene's image 2 (210 pairs), and the
  scikit-image training photos against each other: the largest inlier counts and their spread.
* Degenerate cases that must give no match: a blank white PNG vs a fully transparent PNG; a
  textured 20 px band on a flat image vs the band shifted (inliers on a line); a 24 px textured
  spot vs the spot moved (inliers in a tiny area); a flat image with JPEG-level noise.

Features are cached under ``--cache`` (default model).  Writes
``benchmarks/results/degenerate_geometry.json``.

    /work/bin/heavy 1 python benchmarks/degenerate_geometry.py
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from delf_es.degenerate import drop_flat_keypoints, inlier_spread
from delf_es.features import Extractor
from delf_es.imageio import load_image
from delf_es.settings import Settings
from delf_es.types import Features
from delf_es.verify import estimate_model, match_descriptors

PAIRS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pairs"
CONTRASTS = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)
SPREADS = (0.0, 4.0, 8.0, 12.0, 16.0, 24.0)


def _synthetic() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    white = np.full((512, 512, 3), 255, np.uint8)
    transparent = io.BytesIO()
    Image.fromarray(np.zeros((512, 512, 4), np.uint8), "RGBA").save(transparent, "PNG")
    transparent_rgb = load_image(transparent.getvalue(), Settings()).pixels
    texture = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    band_a, band_b = white.copy(), white.copy()
    band_a[240:260] = texture[240:260]
    band_b[250:270, 30:] = texture[240:260, :-30]
    spot_a, spot_b = white.copy(), white.copy()
    spot_a[100:124, 100:124] = texture[:24, :24]
    spot_b[300:324, 280:304] = texture[:24, :24]
    noise = np.clip(128 + rng.normal(0, 1.0, (512, 512, 3)), 0, 255).astype(np.uint8)
    return {
        "blank-white-vs-transparent": (white, transparent_rgb),
        "line-band-vs-shifted": (band_a, band_b),
        "tiny-spot-vs-moved": (spot_a, spot_b),
        "flat-noise-vs-flat-noise": (noise, np.clip(noise.astype(int) + 1, 0, 255).astype(np.uint8)),
    }


def _verify(a: Features, b: Features, s: Settings) -> tuple[int, float, float]:
    """(inliers, spread in A, spread in B) of the default verification without the spread check."""
    matches = match_descriptors(a.descriptors, b.descriptors, s.match_max_distance, s.match_mutual)
    pa, pb = a.keypoints[matches[:, 0]], b.keypoints[matches[:, 1]]
    _, mask = estimate_model(pa, pb, s.ransac_model, s.ransac_px, s.ransac_confidence, s.ransac_max_iters,
                             s.ransac_seed, min_spread_px=0.0)
    return int(mask.sum()), inlier_spread(pa[mask]), inlier_spread(pb[mask])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/work/cache/reliab/degenerate"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/degenerate_geometry.json"))
    parser.add_argument("--max-image-size", type=int, default=None,
                        help="px; smaller than the default (1024) for a quick run (inliers scale down with it)")
    args = parser.parse_args()
    settings = Settings(**({"max_image_size": args.max_image_size} if args.max_image_size else {}))
    extractor = Extractor(settings)
    args.cache.mkdir(parents=True, exist_ok=True)
    pixels_of: dict[str, np.ndarray] = {}

    def feats(name: str, pixels: np.ndarray) -> Features:
        pixels_of[name] = pixels
        path = args.cache / (name.replace("/", "_") + f"-{extractor.model_id.replace('@', '_')}-{settings.max_image_size}.npz")
        if path.exists():
            return Features.load(path)
        features = extractor.extract(pixels, image_id=name)
        features.save(path)
        return features

    def image(path: Path) -> np.ndarray:
        return load_image(str(path), settings).pixels

    evd = sorted(p.stem for p in (PAIRS / "evd" / "1").glob("*.png"))
    true_pairs = [(f"evd/{n}", feats(f"evd1/{n}", image(PAIRS / "evd" / "1" / f"{n}.png")),
                   feats(f"evd2/{n}", image(PAIRS / "evd" / "2" / f"{n}.png"))) for n in evd]
    dog = PAIRS / "hpatches_v_dogman"
    dog1 = feats("dogman/1", image(dog / "1.ppm"))
    true_pairs += [(f"dogman/1-{k}", dog1, feats(f"dogman/{k}", image(dog / f"{k}.ppm"))) for k in range(2, 7)]

    from skimage import data as skdata

    photos = {name: getattr(skdata, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")}
    photo_feats = {n: feats(f"skimage/{n}", p if p.ndim == 3 else np.repeat(p[:, :, None], 3, 2)) for n, p in photos.items()}
    false_pairs = [(f"evd/{a}-vs-{b}", feats(f"evd1/{a}", pixels_of[f"evd1/{a}"]), feats(f"evd2/{b}", pixels_of[f"evd2/{b}"]))
                   for a, b in itertools.permutations(evd, 2)]
    false_pairs += [(f"skimage/{a}-vs-{b}", photo_feats[a], photo_feats[b]) for a, b in itertools.combinations(photos, 2)]
    synthetic = {name: (feats(f"synthetic/{name}-a", pa), feats(f"synthetic/{name}-b", pb))
                 for name, (pa, pb) in _synthetic().items()}

    def row(name: str, a: Features, b: Features) -> dict:
        out = {"pair": name}
        for contrast in CONTRASTS:
            fa = drop_flat_keypoints(a, pixels_of[a.image_id], contrast, settings.max_image_size)
            fb = drop_flat_keypoints(b, pixels_of[b.image_id], contrast, settings.max_image_size)
            inliers, spread_a, spread_b = _verify(fa, fb, settings)
            out[f"contrast>={contrast:g}"] = {"keypoints": [fa.num_keypoints, fb.num_keypoints], "inliers": inliers,
                                              "spread_px": [round(spread_a, 1), round(spread_b, 1)]}
        return out

    true_rows = [row(*p) for p in true_pairs]
    false_rows = [row(*p) for p in false_pairs]
    synthetic_rows = [row(name, a, b) for name, (a, b) in synthetic.items()]

    def min_spread(r: dict, key: str) -> float:
        return min(r[key]["spread_px"])

    summary = {}
    for contrast in CONTRASTS:
        key = f"contrast>={contrast:g}"
        for spread in SPREADS:
            def kept(r: dict) -> int:
                return r[key]["inliers"] if min_spread(r, key) >= spread else 0
            summary[f"{key},spread>={spread:g}px"] = {
                "true_pairs_inliers_total": sum(kept(r) for r in true_rows),
                "true_pairs_with_>=min_inliers": sum(kept(r) >= settings.min_inliers for r in true_rows),
                "false_pairs_max_inliers": max(kept(r) for r in false_rows),
                "false_pairs_with_>=min_inliers": sum(kept(r) >= settings.min_inliers for r in false_rows),
                "synthetic_inliers": {r["pair"]: kept(r) for r in synthetic_rows},
            }
    result = {
        "what": "inliers of true/false/degenerate pairs with the flat-keypoint filter (grey-level std in the "
                "keypoint's cell) and the inlier-spread check (minor-axis std, px) at candidate thresholds",
        "model_id": extractor.model_id, "max_image_size": settings.max_image_size,
        "ransac": [settings.ransac_model, settings.ransac_px],
        "min_inliers": settings.min_inliers,
        "true_pairs": true_rows, "false_pairs_top": sorted(false_rows, key=lambda r: -r["contrast>=0"]["inliers"])[:15],
        "synthetic": synthetic_rows, "summary": summary,
        "load_average_1_5_15min_at_end": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for key, value in summary.items():
        print(key, {k: v for k, v in value.items()})


if __name__ == "__main__":
    main()
