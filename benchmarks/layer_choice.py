"""Which EfficientNet-Lite activation should feed the local descriptors?  Measured, not guessed.

One forward pass per pyramid level captures three stride-16 candidates:
  block     - output of the last stride-16 block (lite2: 120-d)
  depthwise - depthwise activation inside that block (lite2: 720-d)
  expand    - expanded activation of the first stride-32 block, at stride 16 (lite2: 720-d)
For each: keypoints = top 1000 by descriptor L2 norm over 7 scales; PCA 40 fitted on the
project's training photos (scripts/training_images.sh: Debian opencv-doc / visp-images-data and
scikit-image data, none from the evaluation sets); then brute-force verified retrieval
(mutual-NN matching + pydegensac homography for every query/database pair, ranked by inliers)
on a gt.json set plus distractors, and mAP as in the Revisited Oxford/Paris code.

    python benchmarks/layer_choice.py --gt ../shared/data/paris250/gt.json \
        --distractors ../shared/data/distractors/wallpapers --train @train.txt
Writes benchmarks/results/layer_choice.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from delf_es.inputs import expand_inputs
from delf_es.eval.gt import load_ground_truth, query_pixels
from delf_es.eval.metrics import mean_scores, score_ranking
from delf_es.features import LEVEL_MULTIPLE, _resize, cell_centres
from delf_es.imageio import load_image
from delf_es.model.backbone import _mbconv_forward
from delf_es.model.delf import build_model
from delf_es.model.receptive_field import level_size
from delf_es.pca import PcaProvenance, fit_pca, l2_normalise
from delf_es.settings import Settings
from delf_es.verify import estimate_model, match_descriptors

LAYERS = ("block", "depthwise", "expand")


@torch.inference_mode()
def candidates(model, meta, pixels: np.ndarray, settings: Settings, max_kp: int = 1000) -> dict:
    """Per layer: (keypoints (N,2), descriptors (N,C) unit) of the top-``max_kp`` cells by norm."""
    backbone = model.backbone
    net = backbone.net
    height, width = pixels.shape[:2]
    base = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float()
    longest = max(width, height)
    if longest > settings.max_image_size:
        r = settings.max_image_size / longest
        base = _resize(base, round(height * r), round(width * r))
    mean = torch.tensor(meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(meta.std).view(1, 3, 1, 1)
    rf = meta.receptive_field
    per_layer = {name: ([], [], []) for name in LAYERS}
    last = backbone.first_s32 - 1
    for scale in settings.scales:
        lh, lw = level_size(base.shape[-2] * scale, LEVEL_MULTIPLE), level_size(base.shape[-1] * scale, LEVEL_MULTIPLE)
        x = ((_resize(base, lh, lw) - mean) / std).contiguous(memory_format=torch.channels_last)
        x = net._swish(net._bn0(net._conv_stem(x)))
        for i in range(last):
            x = _mbconv_forward(net._blocks[i], x)
        maps = {"depthwise": _mbconv_forward(net._blocks[last], x, stop="depthwise")}
        x = _mbconv_forward(net._blocks[last], x)
        maps["block"] = x
        maps["expand"] = _mbconv_forward(net._blocks[last + 1], x, stop="expand")
        for name, fmap in maps.items():
            fmap = fmap[0]
            norms = fmap.norm(dim=0)
            rows, cols = torch.nonzero(norms >= 0, as_tuple=True)
            locs, scores, descs = per_layer[name]
            locs.append(cell_centres(rows, cols, rf, (lw, lh), (width, height)))
            scores.append(norms[rows, cols])
            descs.append(fmap[:, rows, cols].T)
    out = {}
    for name, (locs, scores, descs) in per_layer.items():
        order = torch.argsort(torch.cat(scores), descending=True, stable=True)[:max_kp]
        out[name] = (torch.cat(locs)[order].numpy(), l2_normalise(torch.cat(descs)[order].numpy()))
    return out


def verified_inliers(qk, qd, dk, dd, px: float) -> int:
    matches = match_descriptors(qd, dd, max_distance=0.9, mutual=True)
    if len(matches) < 4:
        return 0
    _, mask = estimate_model(qk[matches[:, 0]], dk[matches[:, 1]], "homography", px, 0.999, 2000, 0)
    return int(mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True)
    parser.add_argument("--distractors", nargs="*", default=[])
    parser.add_argument("--train", nargs="+", required=True, help="training images (PCA), folders or @list")
    parser.add_argument("--backbone", default="efficientnet-lite2")
    parser.add_argument("--out", default="benchmarks/results/layer_choice.json")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "delf-es" / "layer_choice"))
    args = parser.parse_args()

    settings = Settings(backbone=args.backbone, local_layer="expand", use_pca=False)
    model, meta = build_model(settings)
    model = model.to(memory_format=torch.channels_last)
    gt = load_ground_truth(Path(args.gt))
    files = {rel: gt.resolve(rel) for rel in gt.database}
    files.update({f"distractor:{p}": Path(p) for d in args.distractors for p in expand_inputs([d]).sources})
    database = list(files)
    cache = Path(args.cache) / args.backbone
    cache.mkdir(parents=True, exist_ok=True)
    feats: dict[str, dict] = {}
    timings: list[float] = []

    def cached(key: str, pixels_of) -> dict:
        """Candidates of every layer for one image, cached on disk so an interrupted run resumes."""
        path = cache / (hashlib.sha1(key.encode()).hexdigest() + ".npz")
        if path.is_file():
            with np.load(path) as npz:
                return {layer: (npz[f"{layer}_k"], npz[f"{layer}_d"]) for layer in LAYERS}
        started = time.perf_counter()
        out = candidates(model, meta, pixels_of(), settings)
        timings.append(time.perf_counter() - started)
        np.savez(path, **{f"{layer}_k": k for layer, (k, _) in out.items()},
                 **{f"{layer}_d": d.astype(np.float16) for layer, (_, d) in out.items()})
        return {layer: (k, d.astype(np.float16)) for layer, (k, d) in out.items()}

    for path in tqdm(expand_inputs(args.train).sources, desc="train"):
        feats["train:" + path] = cached("train:" + path, lambda p=path: load_image(p, settings).pixels)
    for image_id in tqdm(database, desc="database"):
        feats[image_id] = cached(str(files[image_id]), lambda i=image_id: load_image(files[i], settings).pixels)
    for query in tqdm(gt.queries, desc="queries"):
        feats["query:" + query.id] = cached(f"query:{query.image}:{query.bbox}",
                                            lambda q=query: query_pixels(gt, q, settings))
    feats = {k: {layer: (kp, l2_normalise(d.astype(np.float32))) for layer, (kp, d) in v.items()} for k, v in feats.items()}
    extract_s = float(np.median(timings)) if timings else None

    results = {}
    for layer in LAYERS:
        train = np.concatenate([v[layer][1] for k, v in feats.items() if k.startswith("train:")])
        pca = fit_pca(train, 40, PcaProvenance(args.backbone, layer, "norm", "training_images.sh", 0, len(train)))
        reduce = lambda d: pca.transform(d)  # noqa: E731
        db = {i: (feats[i][layer][0], reduce(feats[i][layer][1])) for i in database}
        scores = []
        for query in tqdm(gt.queries, desc=f"search {layer}"):
            qk, qd = feats["query:" + query.id][layer]
            qd = reduce(qd)
            inliers = {i: verified_inliers(qk, qd, k, d, 12.0) for i, (k, d) in db.items()}
            ranking = sorted(database, key=lambda i: -inliers[i])
            scores.append(score_ranking(query.id, ranking, set(query.positives), set(query.junk)))
        results[layer] = {**mean_scores(scores), "dims_raw": int(feats[database[0]][layer][1].shape[1]),
                          "pca_variance_kept": float(pca.explained_variance.sum() / max(1e-9, np.var(train, axis=0).sum()))}
        print(layer, results[layer], flush=True)
    out = {
        "benchmark": "layer_choice",
        "backbone": args.backbone,
        "gt": args.gt,
        "database_size": len(database),
        "queries": len(gt.queries),
        "scales": list(settings.scales),
        "keypoints": 1000,
        "scoring": "descriptor L2 norm",
        "pca": "40-d, fitted per layer on scripts/training_images.sh (not on any evaluation image)",
        "search": "brute force: mutual NN (L2 < 0.9) + pydegensac homography (12 px) on every pair, ranked by inliers",
        "extraction_seconds_per_image_median": extract_s,
        "descriptor_storage": "float16 on disk between extraction and scoring",
        "results": results,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_end": list(os.getloadavg()),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
