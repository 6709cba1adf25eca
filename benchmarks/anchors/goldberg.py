"""Anchor ``anchor-goldberg``: image-match's Goldberg signature, exact brute force.

``image_match.goldberg.ImageSignature()`` (defaults: 9x9 grid, crop percentiles 5/95,
diagonal neighbours, 648-value int8 signature; Wong, Bern & Goldberg 2002) on the pixels
decoded by the project's safe loader (``delf_es.imageio.load_image``; bbox queries cropped
by ``delf_es.eval.gt.query_pixels``), passed as an (H, W, 3) uint8 array (image-match then
applies ``skimage.color.rgb2gray``, as it does for files).  Every database image is ranked
by ``ImageSignature.normalized_distance`` (||b - a|| / (||a|| + ||b||)), ascending, exact
ties by id hash; search_ms = the distance to all database signatures for one query.

Install (measured 2026-11, Python 3.11.7, numpy 2.4.6, scikit-image 0.26.0):
``pip install image-match`` fails: image-match 1.1.2 pins ``scikit-image<0.13,>=0.12``,
whose source build fails ("Getting requirements to build wheel did not run successfully ...
To install scikit-image from source, you will need numpy").  ``pip install --no-deps
image-match`` installs it, and ``ImageSignature`` works with the installed numpy/scikit-image
when given arrays (its file path route calls ``imread(as_grey=True)``, gone from scikit-image,
so it is not used here).
"""

from __future__ import annotations

import logging
import statistics
import time

import numpy as np
from tqdm import tqdm

from common import (QueryOutcome, database_items, load_ground_truth, load_image, parse_args, query_pixels,
                    rank_by_score, write_result)
from delf_es.settings import Settings

LABEL = "anchor-goldberg"
INSTALL = ("`pip install image-match` fails: image-match 1.1.2 requires scikit-image<0.13,>=0.12, whose source "
           "build stops with 'Getting requirements to build wheel did not run successfully ... To install "
           "scikit-image from source, you will need numpy'; `pip install --no-deps image-match` installs 1.1.2, "
           "and image_match.goldberg.ImageSignature runs on arrays with numpy 2.4.6 / scikit-image 0.26.0")
log = logging.getLogger("anchors.goldberg")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    gt = load_ground_truth(args.gt)
    items = database_items(gt, args.distractors)
    try:
        import image_match
        from image_match.goldberg import ImageSignature
    except ImportError as error:  # recorded, never re-implemented
        write_result(args, LABEL, "image-match Goldberg signature: could not be imported", gt, len(items), [], [],
                     extra={"error": f"{type(error).__name__}: {error}", "install": INSTALL})
        raise SystemExit(f"image-match unavailable: {error}")
    settings = Settings()
    signer = ImageSignature()

    seconds, signatures = [], []
    for _, path in tqdm(items, desc="database", unit="img"):
        pixels = load_image(path, settings).pixels
        started = time.perf_counter()
        signatures.append(signer.generate_signature(pixels))
        seconds.append(time.perf_counter() - started)
    database = np.stack(signatures)
    ids = [image_id for image_id, _ in items]

    outcomes = []
    for q in tqdm(gt.queries, desc="queries", unit="q"):
        signature = signer.generate_signature(query_pixels(gt, q, settings))
        started = time.perf_counter()
        distances = [ImageSignature.normalized_distance(row, signature) for row in database]
        scores = {image_id: (-float(d),) for image_id, d in zip(ids, distances)}
        ranking = rank_by_score(scores)
        search_ms = 1000 * (time.perf_counter() - started)
        outcomes.append(QueryOutcome(q, ranking, {k: (-v[0],) for k, v in scores.items()}, search_ms))

    description = (
        f"image-match {getattr(image_match, '__version__', '1.1.2')} Goldberg signature (ImageSignature() "
        f"defaults, {database.shape[1]} values) on safe-loader pixels (bbox crops for official queries); every "
        "database image ranked by normalized_distance ascending (exact brute force, ties by id hash); top10 shows "
        "the distance. search_ms = distances to all database signatures."
    )
    write_result(args, LABEL, description, gt, len(items), outcomes, seconds, extra={
        "install": INSTALL,
        "signature_length": int(database.shape[1]),
        "extract_timing": "generate_signature on decoded pixels (grey conversion, crop, grid, differentials)",
        "top1_distance_median": statistics.median(o.scores[o.ranking[0]][0] for o in outcomes),
    })


if __name__ == "__main__":
    main()
