"""Collect every anchor and ablation run on paris250 + wallpapers into one file, a bar chart and the table of docs/benchmarks.md.

Reads ``benchmarks/results/eval/*.json`` (written by ``delf-es eval`` and ``benchmarks/anchors/``),
writes ``benchmarks/results/eval_paris250.json`` and ``eval_paris250.png``, prints the markdown
table.  Every row keeps when it was measured: ``timestamp`` from the run itself, or, for runs
older than that field, the date of the commit that last changed the file (``timestamp_source``
says which), and the load average the run recorded (``None`` when it did not).

    python benchmarks/eval_table.py [--session-start 2026-11-22T04:50:00Z]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

RESULTS = Path("benchmarks/results/eval")

# label -> (group, what differs from the default); order = table order
ROWS = {
    "delf-es-default": ("default", "**delf-es default**: Lite2 expand layer, 7 scales, 1000 kp, PCA 40, hybrid shortlist 100, "
                        "pydegensac homography 12 px, rank by inliers + 50 x global cosine"),
    "delf-es-rank-inliers": ("ranking", "rank by inliers (then votes, global)"),
    "delf-es-rank-verified-then-global": ("ranking", "rank: >= 12 inliers by inliers, the rest by global cosine (DELG)"),
    "delf-es-backbone-lite0": ("extraction", "backbone EfficientNet-Lite0 (its own PCA 40)"),
    "delf-es-backbone-mobilenetv2": ("extraction", "backbone MobileNetV2 (its own PCA 40)"),
    "delf-es-scales-3": ("extraction", "3 scales (0.7071, 1, 1.4142) instead of 7"),
    "delf-es-keypoints-300": ("extraction", "300 keypoints per image (database and query) instead of 1000"),
    "delf-es-layer-block-scales-3": ("extraction", "local descriptors from the Lite2 block output (120-d, its own PCA 40), "
                                     "3 scales: compare with '3 scales'"),
    "scoring-attention-pyramid-3": ("extraction", "keypoints scored by the trained attention head (issue 5), 3 scales, "
                                    "ranked by inliers: compare with the next row"),
    "scoring-norm-pyramid-3": ("extraction", "descriptor-norm scoring, the same 3 scales and ranking (the attention row's baseline)"),
    "delf-es-pca-128": ("extraction", "PCA 128 instead of 40 (same training photos)"),
    "delf-es-query-300": ("search", "300 strongest query descriptors for kNN (database keeps 1000)"),
    "delf-es-shortlist-local": ("search", "shortlist by keypoint votes only"),
    "delf-es-shortlist-global": ("search", "shortlist by global descriptor only"),
    "delf-es-verify-magsac": ("verification", "OpenCV USAC_MAGSAC homography instead of pydegensac"),
    "delf-es-verify-affine": ("verification", "affine RANSAC (OpenCV)"),
    "delf-es-verify-fundamental": ("verification", "fundamental matrix (pydegensac)"),
    "delf-es-global-matching": ("search", "global shortlist + descriptor matching against stored int8 codes, no keypoint "
                                "kNN (the Elasticsearch default)"),
    "delf-es-global-matching-query-500": ("search", "global shortlist + matching with the 500 strongest query descriptors "
                                          "(a faster Elasticsearch setting, see Search speed)"),
    "delf-es-global-matching-query-300": ("search", "global shortlist + matching with the 300 strongest query descriptors"),
    "delf-es-hybrid-matching": ("search", "hybrid shortlist + descriptor matching, ranked by inliers: compare with "
                                "'rank by inliers'"),
    "delf-es-backend-elasticsearch": ("backend", "Elasticsearch backend (float HNSW, before int8 codes), hybrid + kNN pairs, "
                                      "ranked by inliers: compare with 'rank by inliers' (embedded)"),
    "delf-es-backend-elasticsearch-default": ("backend", "Elasticsearch backend, its defaults: int8 keypoint codes, global "
                                              "shortlist + descriptor matching"),
    "quality-default": ("default", "default re-measured in the issue-16 session (same features, same run conditions as the rows below)"),
    "quality-qe-5": ("search", "verified alpha-QE: query + its best 5 hits with >= qe_min_inliers inliers (cos^3 weights), "
                     "re-queried, new images verified (thresholds from the pairs, benchmarks/results/chance_inliers.json)"),
    "quality-scale-rule": ("verification", "scale-consistent inliers: keypoint pyramid scales agree with the homography's zoom "
                           "(ransac_scale_tolerance from the pairs)"),
    "quality-qe-5-scale-rule": ("search", "verified alpha-QE + the scale rule"),
    "quality-keypoints-300": ("extraction", "300 keypoints per image, norm selection (database and query)"),
    "quality-spread-relative": ("verification", "inlier spread rule relative to the image: 0.02 of the short side over 4 px "
                                "(was 16 px; chosen on the pairs, benchmarks/results/chance_inliers.json)"),
    "quality-qe-5-min-15": ("search", "verified alpha-QE with qe_min_inliers 15 (above every cross-source false pair) instead of 20"),
    "quality-default-maps": ("default", "default (QE off, spread 16 px) from the backbone-map cache: the reference of the "
                             "map-cache rows below"),
    "quality-geometry-rank": ("extraction", "matchability attention trained from geometry (rank), scores from the map cache"),
    "quality-geometry-bce": ("extraction", "matchability attention trained from geometry (bce), scores from the map cache"),
    "quality-proj40": ("extraction", "learned 720->40 projection (InfoNCE + reconstruction) instead of PCA 40, from the map cache"),
    "quality-geometry-rank-300": ("extraction", "geometry rank head, 300 keypoints per image, from the map cache"),
    "quality-qe-5-min-15-spread-relative-maps": ("search", "QE (5, >= 15 inliers) + relative spread rule, from the map cache: "
                                                 "the new defaults, reference of the combination"),
    "quality-best-combination": ("extraction", "best geometry head + QE (5, >= 15 inliers) + relative spread rule, from the map cache"),
    "quality-new-defaults": ("default", "the default of session 5 (before the canonical RANSAC order and the pairs-check thresholds): verified QE (5 hits, >= 15 inliers) + inlier spread 0.02 "
                             "of the short side over 4 px (torch float32 feature cache)"),
    "defaults-openvino": ("default", "**the default now** (OpenVINO FP32 fresh-extraction cache, the CPU runtime): QE 5 hits "
                          ">= 22 inliers, rank weight 150 (both from the pairs check), spread 0.02 / 4 px, canonical RANSAC order; "
                          "seed 0 (seeds 0-3: 90.01 +- 0.16, benchmarks/results/checks/openvino-vs-torch-ordered.json)"),
    "defaults-torch": ("default", "the default now from the PyTorch float32 feature cache, seed 0 (seeds 0-3: 89.58 +- 0.28)"),
    "s7-global-matching": ("search", "Elasticsearch's default plan on the embedded index: global shortlist of 100 + matching "
                           "against int8 codes, QE on (PyTorch float32 cache, seed 0; reported, not chosen on)"),
    "s7-global-matching-shortlist-50": ("search", "the same, verifying 50 images (p50 428 ms at 100k on ES vs 732: "
                                        "docs/scale.md)"),
    "s7-global-matching-shortlist-25": ("search", "the same, verifying 25 images (p50 279 ms at 100k; paris250 has 50 "
                                        "positives per landmark)"),
    "torch-float32-cc1e4b6": ("extraction", "PyTorch float32 features (cache), code cc1e4b6 (QE off, spread 16 px): reference "
                              "of the OpenVINO row below"),
    "speed-openvino-float32-fresh": ("extraction", "OpenVINO FP32 (the CPU runtime default), fresh extraction, code cc1e4b6: "
                                     "features equal PyTorch's to cosine 0.9999997; the gap follows the order of near-tied keypoints, "
                                     "not their values (benchmarks/results/checks/openvino-vs-torch.json)"),
    "anchor-global-gem": ("anchor", "anchor: global GeM of the same forward pass, cosine, no verification"),
    "anchor-delf-demo-kdtree": ("anchor", "anchor: classic DELF demo (one cKDTree over all database descriptors, RANSAC on every candidate)"),
    "anchor-sift-magsac": ("anchor", "anchor: RootSIFT (2000 kp) + ratio test + OpenCV USAC_MAGSAC, brute force"),
    "anchor-goldberg": ("anchor", "anchor: image-match Goldberg signature"),
}
COLOURS = {"default": "#1f77b4", "ranking": "#17becf", "extraction": "#2ca02c", "search": "#98df8a",
           "verification": "#ff7f0e", "backend": "#9467bd", "anchor": "#7f7f7f"}


def committed_at(path: Path) -> str | None:
    out = subprocess.run(["git", "log", "-1", "--format=%cI", "--", str(path)], capture_output=True, text=True).stdout.strip()
    return out or None


def row(label: str, group: str, description: str) -> dict | None:
    path = RESULTS / f"{label}.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    loadavg = r.get("loadavg_end") or r.get("loadavg") or (r.get("machine") or {}).get("load_average_1_5_15min_at_end")
    if r.get("timestamp") or r.get("finished"):  # anchors (benchmarks/anchors/common.py) write "finished", UTC
        stamp, source = r.get("timestamp") or r["finished"] + "Z", "run"
    else:
        stamp, source = committed_at(path), "commit of the result file (run is older)"
    settings = r.get("settings") or {}
    return {
        "label": label, "group": group, "configuration": description,
        "mAP": r.get("mAP"), "R@1": r.get("R@1"), "R@5": r.get("R@5"), "R@10": r.get("R@10"),
        "extract_s_per_image_median": r.get("extract_s_per_image_median"),
        "extracted_this_run": r.get("extracted_this_run", r.get("extract_timed_images")),
        "search_ms_median": r.get("search_ms_median"),
        "loadavg_start": r.get("loadavg_start"), "loadavg_end": loadavg,
        "timestamp": stamp, "timestamp_source": source,
        "commit": r.get("commit"), "backend": r.get("backend"), "model_id": r.get("model_id"),
        "rank_by": settings.get("rank_by", "inliers" if label.startswith("delf-es") else None),
        "file": str(path),
    }


def fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], session_start: str) -> str:
    lines = ["| configuration | mAP | R@1 | R@10 | extraction s/img (median) | search ms/query (median) | load avg (1 min, end) | measured |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extract = fmt(r["extract_s_per_image_median"], 2) if r["extracted_this_run"] else "cached"
        if r["group"] == "anchor" and r["extract_s_per_image_median"] is not None:
            extract = fmt(r["extract_s_per_image_median"], 2)
        load = fmt(r["loadavg_end"][0]) if r["loadavg_end"] else "—"
        when = r["timestamp"][:16].replace("T", " ") if r["timestamp"] else "—"
        if r["timestamp_source"] != "run":
            when += " (earlier run, commit date)"
        elif r["timestamp"] >= session_start:
            when += " (this run)"
        else:
            when += " (earlier run)"
        name = r["configuration"] if r["group"] in ("default", "anchor") else "&nbsp; " + r["configuration"]
        lines.append(f"| {name} | {fmt(r['mAP'])} | {fmt(r['R@1'])} | {fmt(r['R@10'])} | {extract} | "
                     f"{fmt(r['search_ms_median'], 0 if (r['search_ms_median'] or 0) >= 10 else 1)} | {load} | {when} |")
    return "\n".join(lines)


def plot(rows: list[dict], session_start: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.38 * len(rows) + 1.2))
    names = [r["label"] for r in rows][::-1]
    values = [r["mAP"] or 0 for r in rows][::-1]
    bars = ax.barh(names, values, color=[COLOURS[r["group"]] for r in rows][::-1])
    for bar, r in zip(bars, rows[::-1]):
        old = r["timestamp_source"] != "run" or (r["timestamp"] or "") < session_start
        if old:
            bar.set_hatch("//")
        ax.text(bar.get_width() + 0.5, bar.get_y() + bar.get_height() / 2, f"{r['mAP']:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("mAP (%), paris250 + 61 wallpaper distractors; hatched = earlier run")
    ax.set_title("delf-es ablations and anchors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--session-start", default="0000", help="UTC ISO time; rows measured after it are 'this run'")
    parser.add_argument("--out", default="benchmarks/results/eval_paris250.json")
    parser.add_argument("--doc", "--readme", dest="doc", default="docs/benchmarks.md",
                        help="replace the table between <!-- eval-table --> markers in this file "
                        "(default docs/benchmarks.md, where the README's tables moved; '' = none)")
    args = parser.parse_args()
    rows = [r for label, (group, text) in ROWS.items() if (r := row(label, group, text)) is not None]
    out = {
        "benchmark": "eval_paris250",
        "gt": "../shared/data/paris250/gt.json",
        "distractors": "../shared/data/distractors/wallpapers",
        "metric": "mAP as the Revisited Oxford/Paris compute_ap (junk removed), recall@k in %",
        "learned_parts": "PCA 40 / 128 fitted on the 65 photos of scripts/training_images.sh (Debian opencv-doc, "
                         "visp-images-data, scikit-image data); no attention head (keypoints scored by descriptor norm); "
                         "rank_global_weight 50 chosen on each half of the paris250 queries (benchmarks/results/rank_by.json)",
        "session_start": args.session_start,
        "collected": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, args.session_start, Path(args.out).with_suffix(".png"))
    table = markdown(rows, args.session_start)
    print(table)
    if args.doc:
        write_table(Path(args.doc), table)


def write_table(path: Path, table: str) -> None:
    """Replace what lies between the ``<!-- eval-table -->`` markers of ``path`` with ``table``."""
    text = path.read_text()
    start, end = "<!-- eval-table -->\n", "<!-- /eval-table -->"
    before, rest = text.split(start, 1)
    path.write_text(before + start + table + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
