"""Search speed at scale, both backends: ingest rate, end-to-end search latency, ANN recall,
bytes per image.

    python benchmarks/search_speed.py --sizes 1000 10000 --backends embedded elasticsearch

Data (real features, replicated for scale, as the issue allows):

* the database is the 311 real photos of ``paris250`` + the wallpaper distractors, through the
  default model (features read from the ``delf-es eval`` cache, extracted on a miss);
* image ``i`` of a larger database is photo ``i mod 311``, copy ``i // 311``: copy 0 is the
  photo itself; a copy ``c >= 1`` adds Gaussian noise to every descriptor (sigma 0.15 per
  dimension, then L2: cosine ~0.72 to the original, about the similarity of a true match)
  and to the global descriptor (cosine ~0.7), and moves each keypoint by up to 2 px;
* queries are the 38 real query crops of ``paris250``.

One database grows through the sizes (1000, then 10000 images): at each size the script
measures search latency (p50/p95 of the full :class:`~delf_es.search.Searcher` pipeline:
kNN, shortlist, locations from the cache, RANSAC; split into stages by timing the backend and
cache calls), ANN recall@10 of the keypoint kNN against exact float search over every stored
descriptor, and bytes per image (Elasticsearch: ``_stats`` store size and ``_disk_usage``
by field, Lucene files by extension; embedded: files on disk).  Elasticsearch is measured on the
live index after a refresh, and with ``--force-merge`` again after merging to one segment.

The machine is shared (2 cores): the JSON records the load average at each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from es_layout import FILE_GROUPS, lucene_files  # noqa: E402  (a sibling benchmark script)

from delf_es.cache import LocationCache, MemoryLocationCache, RedisLocationCache  # noqa: E402
from delf_es.eval.feature_cache import FeatureCache, content_hash, crop_key  # noqa: E402
from delf_es.eval.gt import load_ground_truth, query_pixels  # noqa: E402
from delf_es.eval.run import database_items, drop_indices  # noqa: E402
from delf_es.features import Extractor  # noqa: E402
from delf_es.imageio import load_image  # noqa: E402
from delf_es.sdk import DelfEs  # noqa: E402
from delf_es.settings import Settings, default_data_dir  # noqa: E402
from delf_es.types import Features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
NOISE_SIGMA = 0.15  # per descriptor dimension (40-d): cosine ~0.72 to the original
GLOBAL_NOISE_NORM = 1.0  # norm of the noise added to the unit global descriptor: cosine ~0.7
JITTER_PX = 2.0
RECALL_QUERIES = 8
RECALL_DESCRIPTORS = 100
K = 10


# ---- data ------------------------------------------------------------------------------------


@dataclass
class RealData:
    database: list[Features]  # the real photos, ids = paths as in gt.json
    queries: list[Features]
    model_id: str


def real_features(gt_path: Path, distractors: list[Path], settings: Settings, cache_dir: Path) -> RealData:
    extractor = Extractor(settings)
    cache = FeatureCache(cache_dir, extractor.model_id)
    gt = load_ground_truth(gt_path)
    database = [
        cache.get_or_extract(content_hash(path), image_id, lambda p=path, i=image_id: extractor.extract(load_image(p, settings).pixels, i))
        for image_id, path in database_items(gt, distractors)
    ]
    queries = [
        cache.get_or_extract(
            crop_key(content_hash(gt.resolve(q.image)), q.bbox), f"query:{q.id}",
            lambda q=q: extractor.extract(query_pixels(gt, q, settings), f"query:{q.id}"),
        )
        for q in gt.queries
    ]
    return RealData(database, queries, extractor.model_id)


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def replica(photos: list[Features], i: int) -> Features:
    """Image ``i`` of the scaled database (see the module docstring); deterministic in ``i``."""
    photo = photos[i % len(photos)]
    copy = i // len(photos)
    if copy == 0:
        return photo
    rng = np.random.default_rng(i)
    n = photo.num_keypoints
    descriptors = _unit(photo.descriptors + rng.normal(0, NOISE_SIGMA, photo.descriptors.shape))
    global_desc = photo.global_desc
    if global_desc.size:
        noise = rng.standard_normal(global_desc.shape)
        global_desc = _unit(global_desc + GLOBAL_NOISE_NORM * noise / np.linalg.norm(noise))
    keypoints = (photo.keypoints + rng.uniform(-JITTER_PX, JITTER_PX, (n, 2))).astype(np.float32)
    return replace(photo, image_id=f"{photo.image_id}#copy{copy}", keypoints=keypoints,
                   descriptors=descriptors, global_desc=global_desc)


# ---- timing ------------------------------------------------------------------------------------


class StageTimer:
    """Wraps methods of the backend and cache to add their wall time to named stages."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, obj: Any, method: str, stage: str) -> None:
        original: Callable = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

        setattr(obj, method, timed)

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def measure_search(engine: DelfEs, timer: StageTimer, queries: list[Features], warmup: int = 3) -> dict:
    """p50/p95 of the full search over the real queries, and the median split by stage (ms)."""
    for query in queries[:warmup]:
        engine.search_features(query)
    timer.take()
    totals, stages = [], []
    load = [os.getloadavg()[0]]
    for query in queries:
        started = time.perf_counter()
        hits = engine.search_features(query)
        totals.append(1000 * (time.perf_counter() - started))
        split = {stage: 1000 * s for stage, s in timer.take().items()}
        split["verification_and_rest"] = totals[-1] - sum(split.values())
        stages.append(split)
        assert hits, "every query finds at least its shortlist"
    load.append(os.getloadavg()[0])
    names = sorted({name for split in stages for name in split})
    return {
        "queries": len(queries),
        "p50_ms": percentile(totals, 50),
        "p95_ms": percentile(totals, 95),
        "mean_ms": round(statistics.fmean(totals), 1),
        "stage_median_ms": {name: round(statistics.median(s.get(name, 0.0) for s in stages), 1) for name in names},
        "query_descriptors_median": statistics.median(min(q.num_keypoints, engine.settings.query_max_descriptors) for q in queries),
        "loadavg_1min": load,
    }


def exact_top_k(stored: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers and cosines of the exact ``k`` nearest stored rows of each query (float32)."""
    best_rows = np.zeros((len(queries), 0), np.int64)
    best_sims = np.zeros((len(queries), 0), np.float32)
    for start in range(0, len(stored), chunk):
        sims = queries @ stored[start : start + chunk].T
        top = np.argpartition(-sims, min(k, sims.shape[1] - 1), axis=1)[:, :k]
        rows = np.concatenate([best_rows, top + start], axis=1)
        values = np.concatenate([best_sims, np.take_along_axis(sims, top, axis=1)], axis=1)
        keep = np.argsort(-values, axis=1)[:, :k]
        best_rows, best_sims = np.take_along_axis(rows, keep, axis=1), np.take_along_axis(values, keep, axis=1)
    return best_rows, best_sims


def measure_recall(engine: DelfEs, images: list[Features], queries: list[Features]) -> dict:
    """ANN recall@10 of ``backend.knn`` against exact float search over every stored keypoint."""
    stored = np.concatenate([f.descriptors for f in images])
    owner = np.concatenate([np.full(f.num_keypoints, i) for i, f in enumerate(images)])
    first = np.concatenate([[0], np.cumsum([f.num_keypoints for f in images])[:-1]])
    ids = [f.image_id for f in images]
    recalls, tolerant = [], []
    for query in queries[:RECALL_QUERIES]:
        q = query.descriptors[:RECALL_DESCRIPTORS]
        rows, sims = exact_top_k(stored, q, K)
        found = engine.backend.knn(q, K)
        got: dict[int, set[tuple[str, int]]] = {}
        for qi, image_id, kp in zip(found.query_index, found.image_ids, found.keypoint_index):
            got.setdefault(int(qi), set()).add((str(image_id), int(kp)))
        position = {image_id: i for i, image_id in enumerate(ids)}
        for qi in range(len(q)):
            exact = {(ids[owner[r]], int(r - first[owner[r]])) for r in rows[qi]}
            hits = got.get(qi, set())
            recalls.append(len(exact & hits) / K)
            # a returned neighbour as similar as the 10th exact one (within int8 rounding) is no miss
            kth = sims[qi, -1] - 0.01
            good = sum(
                1 for image_id, kp in hits
                if image_id in position and float(stored[first[position[image_id]] + kp] @ q[qi]) >= kth
            )
            tolerant.append(min(good, K) / K)
    return {"recall_at_10": round(statistics.fmean(recalls), 4),
            "recall_at_10_within_0.01_cosine": round(statistics.fmean(tolerant), 4),
            "query_descriptors": len(recalls)}


# ---- storage -----------------------------------------------------------------------------------


def es_bytes(client: Any, alias: str, num_images: int) -> dict:
    out: dict[str, Any] = {}
    files: dict[str, int] = {}
    for role, name in (("images", alias), ("keypoints", f"{alias}-keypoints")):
        index = next(iter(client.indices.get_alias(name=name)))
        store = client.indices.stats(index=index, metric="store")["_all"]["primaries"]["store"]["size_in_bytes"]
        usage = client.options(request_timeout=1800).indices.disk_usage(index=index, run_expensive_tasks=True)[index]
        fields = {
            field: {key[: -len("_in_bytes")]: round(value / num_images) for key, value in spec.items()
                    if key.endswith("_in_bytes") and value and key != "total_in_bytes"}
            for field, spec in usage["fields"].items()
        }
        out[role] = {"store_bytes_per_image": round(store / num_images),
                     "disk_usage_by_field_per_image": {f: v for f, v in fields.items() if v}}
        for ext, size in (lucene_files(client, index) or {}).items():
            files[ext] = files.get(ext, 0) + size
    out["store_bytes_per_image"] = out["images"]["store_bytes_per_image"] + out["keypoints"]["store_bytes_per_image"]
    if files:
        grouped = {group: sum(files.get(ext, 0) for ext in exts) for group, exts in FILE_GROUPS.items()}
        grouped["other"] = sum(files.values()) - sum(grouped.values())
        out["lucene_files_per_image"] = {group: round(size / num_images) for group, size in grouped.items()}
    return out


def embedded_bytes(directory: Path, num_images: int) -> dict:
    sizes = {entry.name: entry.stat().st_size for entry in os.scandir(directory) if entry.is_file()}
    total = sum(sizes.values())
    return {"store_bytes_per_image": round(total / num_images),
            "files_per_image": {name: round(size / num_images) for name, size in sorted(sizes.items(), key=lambda x: -x[1])}}


# ---- one backend -------------------------------------------------------------------------------


def batches(data: RealData, start: int, stop: int, size: int = 64) -> Iterator[list[tuple[Features, str, dict]]]:
    for first in range(start, stop, size):
        yield [(f, f.image_id, {"copy": i // len(data.database)})
               for i in range(first, min(first + size, stop)) for f in [replica(data.database, i)]]


def mode_overrides(text: str) -> dict[str, str]:
    """``"a=1,b=2"`` -> ``{"a": "1", "b": "2"}``; Settings validates names and values."""
    pairs = [item.partition("=") for item in text.split(",") if item]
    bad = [name for name, sep, _ in pairs if not sep or not name]
    if bad:
        raise SystemExit(f"--modes: expected setting=value after '@', got {bad[0]!r}")
    return {name: value for name, _, value in pairs}


def measure_modes(engine: DelfEs, timer: StageTimer, queries: list[Features], modes: list[str]) -> dict:
    """Search latency for each ``shortlist_mode[/correspondences][@setting=value,...]``, on the same
    index (e.g. ``global/matching@query_max_descriptors=300``)."""
    base = engine.settings
    out = {}
    try:
        for mode in modes:
            plan, _, overrides = mode.partition("@")
            shortlist, _, correspondences = plan.partition("/")
            update = {"shortlist_mode": shortlist, "correspondences": correspondences or "knn", **mode_overrides(overrides)}
            engine.settings = Settings.model_validate({**base.model_dump(), **update})
            out[mode] = measure_search(engine, timer, queries)
    finally:
        engine.settings = base
    return out


def run_backend(kind: str, data: RealData, sizes: list[int], settings: Settings, args: argparse.Namespace,
                save: Callable[[], None], run: dict) -> None:
    """Grow one database through ``sizes``, measuring at each; rows are appended to ``run`` and
    saved as they come.  With ``args.reuse`` the index exists already (``args.keep`` of an earlier
    run): it grows from the images it holds to each larger size (none: only searches are measured)."""
    alias = args.reuse or f"bench-speed-{uuid.uuid4().hex[:8]}"
    scratch = Path(default_data_dir()) / "bench" / alias
    timer = StageTimer()
    client = None
    if kind == "elasticsearch":
        from delf_es.index.es.transport import connect

        settings = settings.model_copy(update={"index_alias": alias})
        cache: LocationCache = RedisLocationCache(settings.redis_url, prefix=f"bench:{alias}")
        client = connect(settings, request_timeout=600)
    else:
        settings = settings.model_copy(update={"es_url": None, "redis_url": None, "data_dir": scratch.parent,
                                               "index_alias": alias})
        cache = MemoryLocationCache()
    engine = DelfEs(settings, cache=cache)
    timer.wrap(engine.backend, "knn", "keypoint_knn")
    timer.wrap(engine.backend, "global_knn", "global_knn")
    timer.wrap(engine.backend, "keypoints", "locations_from_index")
    timer.wrap(engine.backend, "descriptor_codes", "codes_from_index")
    timer.wrap(cache, "read_many", "locations_and_codes_from_cache")
    timer.wrap(cache, "fill_many", "cache_write_back")
    run.update({"backend": kind, "alias": alias, "kept": args.keep, "sizes": []})
    indexed = engine.count() if args.reuse else 0
    if args.reuse:
        sizes = [size for size in sizes if size >= indexed]
    try:
        for size in sizes:
            row: dict[str, Any] = {"images": size, "keypoints": sum(data.database[i % len(data.database)].num_keypoints for i in range(size))}
            if size > indexed:
                started, load_before = time.perf_counter(), os.getloadavg()[0]
                added = size - indexed
                for batch in batches(data, indexed, size):
                    report = engine.add_features_bulk(batch)
                    if not report.ok:
                        raise RuntimeError(f"ingest failed: {report.failed[:3]}")
                    indexed += len(batch)
                    print(f"  {kind}: {indexed}/{size} indexed", flush=True)
                engine.backend.refresh()
                ingest_s = time.perf_counter() - started
                row["ingest"] = {"images": added, "seconds": round(ingest_s, 1), "images_per_s": round(added / ingest_s, 2),
                                 "loadavg_1min": [load_before, os.getloadavg()[0]]}
            if engine.count() != size:
                raise RuntimeError(f"{engine.count()} images in {alias}, expected {size}")
            cache_flush(cache)
            row["search_cold_cache"] = measure_search(engine, timer, data.queries[:10], warmup=0)
            row["search"] = measure_modes(engine, timer, data.queries, args.modes)
            row["recall"] = measure_recall(engine, [replica(data.database, i) for i in range(size)], data.queries)
            if client is not None:
                row["segments"] = len(client.cat.segments(index=f"{alias}-keypoints", format="json"))
                if args.force_merge:
                    started = time.perf_counter()
                    client.options(request_timeout=7200).indices.forcemerge(index=f"{alias}-keypoints", max_num_segments=1)
                    row["force_merge_s"] = round(time.perf_counter() - started, 1)
                    engine.backend.refresh()
                    row["search_merged"] = measure_modes(engine, timer, data.queries, args.modes)
                    row["recall_merged"] = measure_recall(engine, [replica(data.database, i) for i in range(size)], data.queries)
                row["bytes"] = es_bytes(client, alias, size)
            else:
                row["bytes"] = embedded_bytes(scratch, size)
            run["sizes"].append(row)
            save()
            print(json.dumps(row, indent=1), flush=True)
    finally:
        engine.close()
        if not args.keep:
            if client is not None:
                drop_indices(client, f"{alias}*")
            cache_flush(cache)
            if scratch.exists():
                import shutil

                shutil.rmtree(scratch, ignore_errors=True)
        if client is not None:
            client.close()


def cache_flush(cache: LocationCache) -> None:
    """Empty the benchmark's own cache entries (never the whole Redis: it is shared)."""
    if isinstance(cache, RedisLocationCache):
        keys = list(cache._client.scan_iter(match=f"{cache.prefix}:*", count=10_000))
        for start in range(0, len(keys), 10_000):
            cache._client.delete(*keys[start : start + 10_000])
    elif isinstance(cache, MemoryLocationCache):
        cache._items.clear()


# ---- plot --------------------------------------------------------------------------------------


def _short(mode: str) -> str:
    """A mode label that fits under a bar: settings overrides abbreviated."""
    for long, short in (("query_max_descriptors=", "q"), ("verify_threads=", "t"), ("/matching", "+match"),
                        ("global", "glob"), ("hybrid", "hyb")):
        mode = mode.replace(long, short)
    return mode


def plot(result: dict, path: Path) -> None:
    """Latency per mode (one bar pair per backend, size and mode); recall and bytes per
    backend and size (one bar each: they do not depend on the search mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 6), gridspec_kw={"width_ratios": [3, 1, 1]})
    labels, p50, p95 = [], [], []
    sizes: dict[str, tuple[float, float]] = {}
    for run in result["runs"]:
        for row in run["sizes"]:
            for key, tag in (("search", ""), ("search_merged", " merged")):
                for mode, timing in row.get(key, {}).items():
                    labels.append(f"{run['backend'][:2].upper()} {row['images'] // 1000}k {_short(mode)}{tag}")
                    p50.append(timing["p50_ms"])
                    p95.append(timing["p95_ms"])
            sizes[f"{run['backend'][:2].upper()} {row['images'] // 1000}k"] = (
                row["recall"]["recall_at_10"], row["bytes"]["store_bytes_per_image"] / 1000)
    x = np.arange(len(labels))
    axes[0].bar(x - 0.2, p50, 0.4, label="p50")
    axes[0].bar(x + 0.2, p95, 0.4, label="p95")
    axes[0].axhline(150, color="k", linestyle="--", linewidth=1, label="target p50 150 ms")
    axes[0].set_ylabel("search latency, ms (full pipeline)")
    axes[0].set_xticks(x, labels, fontsize=7, rotation=90)
    axes[0].legend()
    names = list(sizes)
    axes[1].bar(names, [sizes[n][0] for n in names], color="tab:green")
    axes[1].axhline(0.95, color="k", linestyle="--", linewidth=1)
    axes[1].set_ylim(0.5, 1.0)
    axes[1].set_ylabel("keypoint kNN recall@10 vs exact float")
    axes[2].bar(names, [sizes[n][1] for n in names], color="tab:purple")
    axes[2].axhline(240, color="k", linestyle="--", linewidth=1)
    axes[2].set_ylabel("KB per image on disk")
    for ax in axes[1:]:
        ax.tick_params(axis="x", labelrotation=90, labelsize=8)
    fig.suptitle("search_speed.py: real paris250 features replicated with noise; 38 real queries "
                 "(EL = Elasticsearch, EM = embedded; q = query descriptors, t = verification threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--backends", nargs="+", default=["embedded", "elasticsearch"], choices=["embedded", "elasticsearch"])
    parser.add_argument("--gt", type=Path, default=SHARED / "paris250" / "gt.json")
    parser.add_argument("--distractors", type=Path, nargs="*", default=[SHARED / "distractors" / "wallpapers"])
    parser.add_argument("--es-url", default=os.environ.get("DELF_ES_ES_URL", "http://127.0.0.1:9200"))
    parser.add_argument("--redis-url", default=os.environ.get("DELF_ES_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--force-merge", action="store_true", help="also measure Elasticsearch merged to one segment")
    parser.add_argument("--modes", nargs="+", default=["hybrid", "local", "global", "global/matching", "hybrid/matching"],
                        help="shortlist_mode[/correspondences][@setting=value,...] settings to time")
    parser.add_argument("--keep", action="store_true", help="keep the index (and cache) for a later --reuse")
    parser.add_argument("--reuse", metavar="ALIAS", help="measure an index kept by --keep (holds the largest size)")
    parser.add_argument("--out", type=Path, default=RESULTS / "search_speed.json")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="only merge the runs of earlier result files into --out (+ plot)")
    args = parser.parse_args()
    if args.combine:
        parts = [json.loads(path.read_text()) for path in args.combine]
        combined = {**parts[0], "runs": [run for part in parts for run in part["runs"]],
                    "measured_at": [part["measured_at"] for part in parts],
                    "machine": [part["machine"] for part in parts]}
        args.out.write_text(json.dumps(combined, indent=1) + "\n")
        plot(combined, args.out.with_suffix(".png"))
        return
    settings = Settings(es_url=args.es_url, redis_url=args.redis_url)
    data = real_features(args.gt, args.distractors, settings, Path(default_data_dir()) / "features")
    result: dict[str, Any] = {
        "benchmark": "search_speed.py",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model_id": data.model_id,
        "data": {"photos": len(data.database), "queries": len(data.queries), "noise_sigma_per_dim": NOISE_SIGMA,
                 "global_noise_norm": GLOBAL_NOISE_NORM, "jitter_px": JITTER_PX,
                 "replication": "image i = photo i mod 311 + noise (copy i // 311); copy 0 = the photo"},
        "settings": json.loads(settings.model_dump_json(include={"shortlist_mode", "shortlist_size", "knn_k", "query_max_descriptors",
                                                                 "correspondences", "knn_min_similarity",
                                                                 "es_knn_num_candidates", "ransac_model", "ransac_max_iters",
                                                                 "verify_threads"})),
        "machine": {"cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
        "runs": [],
    }
    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    for kind in args.backends:
        run: dict[str, Any] = {}
        result["runs"].append(run)
        run_backend(kind, data, sorted(args.sizes), settings, args, save, run)
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
