"""Elasticsearch layout of keypoint vectors: one document per keypoint, or nested in the image.

Layouts compared (each on its own fresh index, on the real server of scripts/services.sh):

* ``flat-*``: (a) one document per keypoint in a keypoints index (image_id, keypoint
  index, x, y, scale, score, vector) plus one document per image in an images index.
  A kNN search returns keypoint documents directly.
* ``nested-*``: (b) one document per image; ``keypoints`` is a ``nested`` field whose
  objects hold only the vector, the keypoint index being the nested offset; locations,
  scales and scores are packed float32 arrays (binary, ``_source`` only) in the image
  document.  A kNN search on ``keypoints.vector`` returns the best images with
  ``inner_hits`` naming the matched keypoints.  ``nested-*-jsonkp`` keeps x, y, scale,
  score as JSON numbers beside each nested vector instead (what that costs).
* ``flat-v1-backend``: what ships, (a) as ``delf_es.index.es`` builds it from
  ``mappings/*.json`` (keypoint documents hold image_id, keypoint, generation, a metadata copy
  and the vector; geometry is packed in the image document), written with
  ``ElasticsearchBackend.upsert`` and queried with ``ElasticsearchBackend.knn`` (including its
  generation check), so its numbers are end to end.

``*-int8`` use ``int8_hnsw`` (raw float32 vectors + int8 copies + HNSW graph on disk;
``rescore_vector`` re-scores the candidates with the float vectors so returned
similarities are exact); ``*-hnsw`` use plain float ``hnsw`` (no quantised copy);
``-m8`` / ``-m12`` set HNSW's ``m`` (default 16), ``-zstd`` the ``best_compression`` codec.

Measured per layout, for N images x K keypoints (random-but-clustered 40-d unit vectors,
or ``benchmarks/data/real_descriptors.npy`` when that file exists):

* ingest rate through one client (images/s, vectors/s, Elasticsearch CPU per 1000 vectors),
  then the force-merge time to one segment;
* before the force merge (``--live-candidates``): kNN latency and recall on the index as bulk
  loading left it, several segments, as a live index is.  This is where nested kNN falls off
  a cliff: it collects num_candidates distinct *images* per segment, so a segment holding
  fewer images than that is searched exhaustively;
* bytes per image: ``_stats`` store size after the force merge, with a breakdown from
  ``_disk_usage?run_expensive_tasks=true`` and from Lucene's files (raw float vectors ``.vec``,
  quantised ``.veq``, HNSW graph ``.vex``, stored fields = ``_source`` + ``_id``, doc values,
  inverted index, points) when the data directory is readable;
* kNN latency of a query image of Q descriptors (Q = 100, 1000), k = 10, sent as
  ``_msearch`` requests of ``--msearch-chunk`` searches each, end to end from the client
  (body building, HTTP, JSON parsing), p50 / p95 over ``--repeats`` query images, with
  Elasticsearch's per-search query / fetch phase times and CPU; a num_candidates sweep
  (``--sweep-candidates``); the same restricted to 100 images (``image_ids=100``: the hybrid
  mode's kNN over a global-descriptor shortlist); for nested layouts ``--nested-variants``
  takes the query apart (no inner_hits, one inner hit, 5 images);
* ANN recall@10 against exact search (brute-force dot products in numpy over the same
  vectors): the fraction of the true 10 nearest (image, keypoint) pairs returned.

Half of each query image's descriptors are noisy copies of one database image's
descriptors (cosine ~0.9, a matching image) and half are fresh draws (no match).  Timings
are wall-clock on a shared 2-core machine: ``loadavg_1min`` is recorded beside each, and the
Elasticsearch CPU and phase times are less sensitive to the load than the wall time.

    scripts/services.sh start es
    python benchmarks/es_layout.py --images 300 --layouts flat-hnsw nested-hnsw-m12-zstd \\
        --sweep-candidates 50 150 200 --live-candidates 10 50 100 200
    python benchmarks/es_layout.py --plot-only
Results accumulate in benchmarks/results/es_layout.json (one entry per layout and size,
replaced when re-measured) and es_layout.png.  Indices are named ``bench-es-layout-*`` and
deleted afterwards (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from elasticsearch import Elasticsearch, helpers  # the type; clients come from delf_es.index.es.transport

from delf_es.index.es.transport import connect
from delf_es.settings import Settings

logger = logging.getLogger("es_layout")

ROOT = Path(__file__).resolve().parent
REAL_DESCRIPTORS = ROOT / "data" / "real_descriptors.npy"
RESULTS = ROOT / "results"
PREFIX = "bench-es-layout-"
DIM = 40
SERVICES_DATA = Path(os.environ.get("DELF_ES_SERVICES_HOME", Path.home() / ".cache/delf-es/services")) / "es/data"


@dataclass(frozen=True)
class Layout:
    name: str
    kind: str  # "flat" or "nested"
    index_type: str  # "int8_hnsw" or "hnsw"
    json_keypoints: bool = False  # nested only: x, y, scale, score as JSON beside each vector
    m: int = 16  # HNSW neighbours per node (Elasticsearch's default 16); level 0 keeps up to 2m
    ef_construction: int = 100  # Elasticsearch's default
    codec: str = "default"  # "best_compression": zstd for stored fields (_source)

    @property
    def rescore(self) -> bool:
        return self.index_type != "hnsw"


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("flat-int8", "flat", "int8_hnsw"),
        Layout("flat-hnsw", "flat", "hnsw"),
        Layout("nested-int8", "nested", "int8_hnsw"),
        Layout("nested-hnsw", "nested", "hnsw"),
        Layout("nested-hnsw-m8", "nested", "hnsw", m=8, ef_construction=200),
        Layout("nested-hnsw-m12-zstd", "nested", "hnsw", m=12, ef_construction=150, codec="best_compression"),
        Layout("nested-hnsw-jsonkp", "nested", "hnsw", json_keypoints=True),
        # what ships: delf_es.index.es (flat, mappings/*.json), written and queried through it
        Layout("flat-v1-backend", "backend", "hnsw", codec="best_compression"),
    )
}


# ---- data ----------------------------------------------------------------------------------


def _normalise(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered_vectors(rng: np.random.Generator, n: int, centres: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """(n, D) unit rows around centres drawn by popularity (cosine to the centre ~0.7)."""
    which = rng.choice(len(centres), size=n, p=popularity)
    noise = rng.standard_normal((n, centres.shape[1])).astype(np.float32) / math.sqrt(centres.shape[1])
    return _normalise(centres[which] + noise)


def make_database(num_images: int, num_keypoints: int, seed: int) -> tuple[np.ndarray, str, Any]:
    """(N, K, D) float32 unit descriptors and where they came from."""
    rng = np.random.default_rng(seed)
    if REAL_DESCRIPTORS.exists():
        real = np.load(REAL_DESCRIPTORS).astype(np.float32)
        if len(real) < num_images * num_keypoints:
            raise SystemExit(f"{REAL_DESCRIPTORS} has {len(real)} rows, need {num_images * num_keypoints}")
        rows = _normalise(real[: num_images * num_keypoints])
        return rows.reshape(num_images, num_keypoints, -1), f"real ({REAL_DESCRIPTORS.name})", None
    centres = _normalise(rng.standard_normal((8192, DIM)).astype(np.float32))
    popularity = 1.0 / np.arange(1, len(centres) + 1) ** 0.5  # Zipf-like: some visual words are common
    popularity /= popularity.sum()
    rows = clustered_vectors(rng, num_images * num_keypoints, centres, popularity)
    source = "synthetic: unit 40-d vectors around 8192 Zipf(0.5)-weighted random centres, cosine to centre ~0.7"
    return rows.reshape(num_images, num_keypoints, DIM), source, (centres, popularity)


def make_query(rng: np.random.Generator, database: np.ndarray, q: int, model: Any) -> np.ndarray:
    """(q, D): half noisy copies of one database image's descriptors, half fresh draws."""
    image = database[rng.integers(len(database))]
    half = q // 2
    picked = image[rng.choice(len(image), size=min(half, len(image)), replace=False)]
    matching = _normalise(picked + 0.5 * rng.standard_normal(picked.shape).astype(np.float32) / math.sqrt(DIM))
    if model is None:  # real descriptors: fresh draws are other images' descriptors, perturbed
        flat = database.reshape(-1, database.shape[2])
        others = flat[rng.integers(len(flat), size=q - len(matching))]
        fresh = _normalise(others + rng.standard_normal(others.shape).astype(np.float32) / math.sqrt(DIM))
    else:
        fresh = clustered_vectors(rng, q - len(matching), *model)
    return np.concatenate([matching, fresh])


def b64(vector: np.ndarray) -> str:
    """A float32 vector as Elasticsearch's base64 form (big-endian float32)."""
    return base64.b64encode(np.asarray(vector, ">f4").tobytes()).decode("ascii")


def packed(array: np.ndarray) -> str:
    return base64.b64encode(np.asarray(array, "<f4").tobytes()).decode("ascii")


# ---- indices -------------------------------------------------------------------------------


def vector_mapping(layout: Layout) -> dict:
    return {
        "type": "dense_vector",
        "dims": DIM,
        "similarity": "dot_product",
        "index_options": {"type": layout.index_type, "m": layout.m, "ef_construction": layout.ef_construction},
    }


def image_mapping(layout: Layout) -> dict:
    properties: dict[str, Any] = {
        "image_id": {"type": "keyword"},
        "path": {"type": "keyword", "index": False},
        "metadata": {"type": "object", "dynamic": True},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "num_keypoints": {"type": "integer"},
        "model_id": {"type": "keyword"},
        "created_at": {"type": "date"},
    }
    if layout.kind == "nested":
        nested: dict[str, Any] = {"vector": vector_mapping(layout)}
        if layout.json_keypoints:
            for name in ("x", "y", "scale", "score"):
                nested[name] = {"type": "float", "index": False, "doc_values": False}
        else:
            for name in ("xy", "scale", "score"):
                properties[f"kp_{name}"] = {"type": "binary"}
        properties["keypoints"] = {"type": "nested", "properties": nested}
    return {"dynamic": "strict", "properties": properties}


def keypoint_mapping(layout: Layout) -> dict:
    return {
        "dynamic": "strict",
        "properties": {
            "image_id": {"type": "keyword"},
            "kp": {"type": "integer", "index": False},
            "x": {"type": "float", "index": False, "doc_values": False},
            "y": {"type": "float", "index": False, "doc_values": False},
            "scale": {"type": "float", "index": False, "doc_values": False},
            "score": {"type": "float", "index": False, "doc_values": False},
            "vector": vector_mapping(layout),
        },
    }


INDEX_SETTINGS = {
    "number_of_shards": 1,
    "number_of_replicas": 0,
    "index.max_inner_result_window": 1000,
    "index.compound_format": False,  # so the per-file breakdown can be read from the data directory
}


#: The ElasticsearchBackend of a "backend" layout, by layout name.
_BACKENDS: dict[str, Any] = {}
BACKEND_MODEL_ID = "efficientnet-lite2/l16x-norm-pca40@bench"


def create_indices(es: Elasticsearch, layout: Layout, url: str = "") -> list[str]:
    if layout.kind == "backend":
        from delf_es.index.es import ElasticsearchBackend, index_names
        from delf_es.settings import Settings

        alias = f"{PREFIX}{layout.name}"
        found = es.options(ignore_status=404).indices.get_alias(name=f"{alias},{alias}-keypoints")
        if found.meta.status == 200:
            es.indices.delete(index=",".join(found.body))
        _BACKENDS[layout.name] = ElasticsearchBackend(Settings(es_url=url, index_alias=alias, es_timeout=60.0))
        return list(index_names(alias, BACKEND_MODEL_ID))
    images = f"{PREFIX}{layout.name}-images"
    names = [images]
    # destructive_requires_name: no wildcards in deletes
    es.options(ignore_status=404).indices.delete(index=f"{images},{PREFIX}{layout.name}-keypoints")
    settings = {**INDEX_SETTINGS, "index.codec": layout.codec}
    es.indices.create(index=images, settings=settings, mappings=image_mapping(layout))
    if layout.kind == "flat":
        keypoints = f"{PREFIX}{layout.name}-keypoints"
        es.indices.create(index=keypoints, settings=settings, mappings=keypoint_mapping(layout))
        names.append(keypoints)
    return names


def actions(layout: Layout, names: list[str], database: np.ndarray, seed: int) -> Iterator[dict]:
    """Bulk actions; for the flat layout each image's keypoints come before its image document."""
    rng = np.random.default_rng(seed + 1)
    num_keypoints = database.shape[1]
    for i, vectors in enumerate(database):
        image_id = f"img-{i:07d}"
        xy = (rng.random((num_keypoints, 2)) * np.array([1024, 768])).astype(np.float32)
        scale = rng.choice(np.array([0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0], np.float32), num_keypoints)
        score = rng.random(num_keypoints).astype(np.float32)
        doc: dict[str, Any] = {
            "image_id": image_id,
            "path": f"/photos/{image_id}.jpg",
            "metadata": {"source": ("flickr", "web", "museum")[i % 3], "year": 2000 + i % 25},
            "width": 1024,
            "height": 768,
            "num_keypoints": num_keypoints,
            "model_id": "efficientnet-lite2/l16x-norm-pca40@bench",
            "created_at": "2026-11-22T10:00:00+00:00",
        }
        if layout.kind == "flat":
            for j in range(num_keypoints):
                yield {
                    "_index": names[1],
                    "_id": f"{image_id}:{j}",
                    "_source": {
                        "image_id": image_id,
                        "kp": j,
                        "x": float(xy[j, 0]),
                        "y": float(xy[j, 1]),
                        "scale": float(scale[j]),
                        "score": float(score[j]),
                        "vector": b64(vectors[j]),
                    },
                }
        elif layout.json_keypoints:
            doc["keypoints"] = [
                {"vector": b64(v), "x": float(p[0]), "y": float(p[1]), "scale": float(s), "score": float(c)}
                for v, p, s, c in zip(vectors, xy, scale, score)
            ]
        else:
            doc["kp_xy"], doc["kp_scale"], doc["kp_score"] = packed(xy), packed(scale), packed(score)
            doc["keypoints"] = [{"vector": b64(v)} for v in vectors]
        yield {"_index": names[0], "_id": image_id, "_source": doc}


def backend_records(database: np.ndarray, seed: int) -> Iterator[Any]:
    """The benchmark's images as ImageRecords (same geometry and metadata as ``actions``; no global vector)."""
    from delf_es.index.base import ImageRecord
    from delf_es.types import Features

    rng = np.random.default_rng(seed + 1)
    num_keypoints = database.shape[1]
    scales = np.array([0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0], np.float32)
    for i, vectors in enumerate(database):
        image_id = f"img-{i:07d}"
        features = Features(
            image_id=image_id,
            model_id=BACKEND_MODEL_ID,
            image_size=(1024, 768),
            keypoints=(rng.random((num_keypoints, 2)) * np.array([1024, 768])).astype(np.float32),
            scales=rng.choice(scales, num_keypoints),
            scores=rng.random(num_keypoints).astype(np.float32),
            descriptors=np.ascontiguousarray(vectors, np.float32),
        )
        metadata = {"source": ("flickr", "web", "museum")[i % 3], "year": 2000 + i % 25}
        yield ImageRecord(image_id, f"/photos/{image_id}.jpg", metadata, features, "2026-11-22T10:00:00+00:00")


def ingest(
    es: Elasticsearch, layout: Layout, names: list[str], database: np.ndarray, seed: int,
    before_merge: Any = None,
) -> dict:
    """Bulk-load, then (after ``before_merge()``, which measures the live index) force-merge to one segment."""
    chunk = 2000 if layout.kind == "flat" else 20
    cpu_before, load_before = es_cpu_millis(es), os.getloadavg()[0]
    start = time.perf_counter()
    failed = 0
    if layout.kind == "backend":
        chunk = 50
        backend = _BACKENDS[layout.name]
        records = backend_records(database, seed)
        for first in range(0, len(database), chunk):
            failed += len(backend.upsert([next(records) for _ in range(min(chunk, len(database) - first))]).failed)
            if first == 0:  # so the per-file breakdown can be read after the force merge
                es.indices.put_settings(index=",".join(names), settings={"index.compound_format": False})
    else:
        for ok, item in helpers.streaming_bulk(
            es.options(request_timeout=600),
            actions(layout, names, database, seed),
            chunk_size=chunk,
            max_chunk_bytes=20 * 1024 * 1024,
            raise_on_error=False,
            max_retries=5,
        ):
            failed += not ok
    es.indices.refresh(index=",".join(names))
    seconds = time.perf_counter() - start
    es_cpu = es_cpu_millis(es) - cpu_before
    load_after = os.getloadavg()[0]
    if failed:
        raise SystemExit(f"{failed} bulk items failed for {layout.name}")
    if before_merge is not None:
        before_merge()
    start = time.perf_counter()
    es.options(request_timeout=7200).indices.forcemerge(index=",".join(names), max_num_segments=1)
    es.indices.refresh(index=",".join(names))
    merge_seconds = time.perf_counter() - start
    n, k = database.shape[:2]
    return {
        "seconds": round(seconds, 2),
        "images_per_s": round(n / seconds, 2),
        "vectors_per_s": round(n * k / seconds, 1),
        "bulk_chunk_docs": chunk,
        "es_cpu_s_per_1000_vectors": round(es_cpu / (n * k), 3),
        "loadavg_1min": [round(load_before, 2), round(load_after, 2)],
        "force_merge_seconds": round(merge_seconds, 2),
    }


# ---- storage -------------------------------------------------------------------------------


def lucene_files(es: Elasticsearch, index: str) -> dict[str, int] | None:
    """Bytes per Lucene file extension of the index's shard, when the data directory is readable."""
    uuid = es.indices.get_settings(index=index)[index]["settings"]["index"]["uuid"]
    directory = SERVICES_DATA / "indices" / uuid / "0" / "index"
    if not directory.is_dir():
        return None
    sizes: dict[str, int] = {}
    for entry in os.scandir(directory):
        if entry.is_file() and "." in entry.name:
            ext = entry.name.rsplit(".", 1)[1]
            sizes[ext] = sizes.get(ext, 0) + entry.stat().st_size
    return dict(sorted(sizes.items(), key=lambda item: -item[1]))


# Lucene 10 / Elasticsearch 9 file extensions, grouped.
FILE_GROUPS = {
    "vectors_raw_float": ("vec",),
    "vectors_quantised": ("veq",),
    "hnsw_graph": ("vex",),
    "stored_fields_source_and_id": ("fdt", "fdx", "fdm"),
    "doc_values": ("dvd", "dvm"),
    "inverted_index": ("tim", "tip", "tmd", "doc", "pos", "pay", "psm", "pst"),
    "points": ("kdd", "kdi", "kdm"),
}


def storage(es: Elasticsearch, names: list[str], num_images: int, num_vectors: int, layout: Layout) -> dict:
    totals: dict[str, float] = {}
    files: dict[str, int] = {}
    store = 0
    for index in names:
        store += es.indices.stats(index=index, metric="store")["_all"]["primaries"]["store"]["size_in_bytes"]
        usage = es.options(request_timeout=600).indices.disk_usage(index=index, run_expensive_tasks=True)[index]
        for key, value in usage["all_fields"].items():
            if key.endswith("_in_bytes") and key != "total_in_bytes":
                part = key[: -len("_in_bytes")]
                totals[part] = totals.get(part, 0) + value
        for ext, size in (lucene_files(es, index) or {}).items():
            files[ext] = files.get(ext, 0) + size
    raw = num_vectors * DIM * 4
    quantised = num_vectors * (DIM + 4) if layout.index_type == "int8_hnsw" else 0  # int8 + float correction
    per_image = {
        "store_size": round(store / num_images),
        "disk_usage": {part: round(value / num_images) for part, value in totals.items() if value},
        "knn_vectors_split_estimate": {
            "raw_float32": round(raw / num_images),
            "quantised_int8": round(quantised / num_images),
            "graph_and_rest": round((totals.get("knn_vectors", 0) - raw - quantised) / num_images),
        },
    }
    if files:
        grouped = {group: sum(files.get(ext, 0) for ext in exts) for group, exts in FILE_GROUPS.items()}
        grouped["other"] = sum(files.values()) - sum(grouped.values())
        per_image["lucene_files"] = {group: round(size / num_images) for group, size in grouped.items()}
        per_image["lucene_files_by_extension"] = {ext: round(size / num_images) for ext, size in files.items()}
    return per_image


# ---- queries -------------------------------------------------------------------------------


def search_body(
    layout: Layout, vector: np.ndarray, k: int, num_candidates: int, oversample: float, variant: str = "full",
    restrict: list[str] | None = None,
) -> dict:
    """One kNN search.  Nested ``variant``s take the query apart: ``no_inner_hits`` (images only,
    no keypoint identity), ``inner_hits_1`` (one keypoint per image), ``images_k5`` (5 images)."""
    knn: dict[str, Any] = {"query_vector": b64(vector), "k": k, "num_candidates": num_candidates}
    if layout.rescore:
        knn["rescore_vector"] = {"oversample": oversample}
    if layout.kind == "flat":
        knn["field"] = "vector"
        if restrict is not None:
            knn["filter"] = [{"terms": {"image_id": restrict}}]
        return {"knn": knn, "_source": False, "docvalue_fields": ["image_id", "kp"], "size": k}
    knn["field"] = "keypoints.vector"
    if variant == "images_k5":
        knn["k"] = 5
    if restrict is not None:
        knn["filter"] = [{"terms": {"image_id": restrict}}]
    if variant != "no_inner_hits":
        knn["inner_hits"] = {"size": 1 if variant == "inner_hits_1" else k, "_source": False}
    return {"knn": knn, "_source": False, "size": knn["k"]}


def run_query(
    es: Elasticsearch, layout: Layout, index: str, queries: np.ndarray, k: int, num_candidates: int, chunk: int,
    oversample: float, variant: str = "full", restrict: list[str] | None = None,
) -> list[list[tuple[float, int, int]]]:
    """Per query descriptor, its best k (similarity, image number, keypoint index)."""
    if layout.kind == "backend":
        backend = _BACKENDS[layout.name]
        backend.num_candidates = num_candidates
        neighbours = backend.knn(queries, k, image_ids=restrict)
        found: list[list[tuple[float, int, int]]] = [[] for _ in range(len(queries))]
        for q, image_id, kp, similarity in zip(neighbours.query_index, neighbours.image_ids,
                                               neighbours.keypoint_index, neighbours.similarity):
            found[q].append((float(similarity), int(image_id[4:]), int(kp)))
        return found
    if layout.kind == "flat":
        filter_path = [
            "responses.hits.hits._score", "responses.hits.hits.fields", "responses.error", "responses.status"
        ]
    else:
        filter_path = [
            "responses.hits.hits._id",
            "responses.hits.hits.inner_hits.keypoints.hits.hits._score",
            "responses.hits.hits.inner_hits.keypoints.hits.hits._nested.offset",
            "responses.error",
            "responses.status",
        ]
    out: list[list[tuple[float, int, int]]] = []
    for start in range(0, len(queries), chunk):
        body: list[dict] = []
        for vector in queries[start : start + chunk]:
            body.append({"index": index})
            body.append(search_body(layout, vector, k, num_candidates, oversample, variant, restrict))
        responses = es.msearch(searches=body, filter_path=filter_path)["responses"]
        for response in responses:
            if "error" in response:
                raise RuntimeError(json.dumps(response["error"])[:500])
            found: list[tuple[float, int, int]] = []
            for hit in response.get("hits", {}).get("hits", []):
                if layout.kind == "flat":
                    image = int(hit["fields"]["image_id"][0][4:])
                    found.append((2 * hit["_score"] - 1, image, int(hit["fields"]["kp"][0])))
                else:
                    image = int(hit["_id"][4:])
                    for inner in hit.get("inner_hits", {}).get("keypoints", {}).get("hits", {}).get("hits", []):
                        found.append((2 * inner["_score"] - 1, image, int(inner["_nested"]["offset"])))
            found.sort(key=lambda item: -item[0])
            out.append(found[:k])
    return out


def es_cpu_millis(es: Elasticsearch) -> int:
    """CPU time used by the Elasticsearch process so far (load-independent cost; 1 s granularity)."""
    time.sleep(1.1)  # the node refreshes its process stats at most once a second
    stats = es.nodes.stats(metric="process")
    return int(next(iter(stats["nodes"].values()))["process"]["cpu"]["total_in_millis"])


def exact_neighbours(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) flat ids (image * K + keypoint) of the exact nearest keypoints, in blocks."""
    flat = database.reshape(-1, database.shape[2])
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), 25):  # 25 x 1M scores = 100 MB at a time
        scores = queries[start : start + 25] @ flat.T
        out[start : start + 25] = np.argpartition(-scores, k, axis=1)[:, :k]
    return out


def search_phases(es: Elasticsearch, index: str) -> dict[str, int]:
    """Cumulative search counters of ``index`` (query phase = kNN, fetch phase = inner hits, fields)."""
    search = es.indices.stats(index=index, metric="search")["_all"]["primaries"]["search"]
    return {key: int(search[key]) for key in ("query_time_in_millis", "query_total", "fetch_time_in_millis",
                                              "fetch_total")}


def es_idle_cpu_rate(es: Elasticsearch, seconds: float = 5.0) -> float:
    """ES CPU ms per wall second while this benchmark sends nothing (GC, housekeeping, other clients)."""
    before = es_cpu_millis(es)
    time.sleep(seconds)
    return (es_cpu_millis(es) - before) / (seconds + 1.1)


def time_queries(
    es: Elasticsearch, layout: Layout, index: str, database: np.ndarray, model: Any, args: argparse.Namespace,
    rng: np.random.Generator, q: int, num_candidates: int, repeats: int, idle_rate: float, variant: str = "full",
    restrict_to: int = 0,
) -> dict:
    times, recalls = [], []
    kpi = database.shape[1]
    phases_before = search_phases(es, index)
    cpu_before, load_before, wall_before = es_cpu_millis(es), os.getloadavg()[0], time.perf_counter()
    for _ in range(repeats):
        queries = make_query(rng, database, q, model)
        subset = np.sort(rng.choice(len(database), restrict_to, replace=False)) if restrict_to else None
        restrict = None if subset is None else [f"img-{i:07d}" for i in subset]
        start = time.perf_counter()
        found = run_query(es, layout, index, queries, args.k, num_candidates, args.msearch_chunk, args.oversample,
                          variant, restrict)
        times.append(time.perf_counter() - start)
        if subset is None:
            truth = exact_neighbours(database, queries, args.k)
        else:  # exact over the allowed images, as flat ids of the whole database
            local = exact_neighbours(database[subset], queries, args.k)
            truth = subset[local // kpi] * kpi + local % kpi
        hits = sum(
            len({image * kpi + kp for _, image, kp in got} & set(true.tolist())) for got, true in zip(found, truth)
        )
        recalls.append(hits / truth.size)
    wall = time.perf_counter() - wall_before
    es_cpu = es_cpu_millis(es) - cpu_before - idle_rate * wall
    phases = {key: value - phases_before[key] for key, value in search_phases(es, index).items()}
    return {
        "p50_ms": round(1000 * float(np.percentile(times, 50)), 1),
        "p95_ms": round(1000 * float(np.percentile(times, 95)), 1),
        "mean_ms": round(1000 * float(np.mean(times)), 1),
        "per_descriptor_ms": round(1000 * float(np.median(times)) / q, 3),
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "repeats": repeats,
        "num_candidates": num_candidates,
        "es_cpu_ms_per_descriptor": round(max(es_cpu, 0.0) / (q * repeats), 3),
        # shard-level wall time per search (includes waiting for a core under load)
        "query_phase_ms_per_search": round(phases["query_time_in_millis"] / max(phases["query_total"], 1), 3),
        "fetch_phase_ms_per_search": round(phases["fetch_time_in_millis"] / max(phases["fetch_total"], 1), 3),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def segment_sizes(es: Elasticsearch, index: str, docs_per_unit: int) -> list[int]:
    """Searchable segments of ``index``, as images (nested: Lucene docs / (keypoints + 1)) or keypoints."""
    segments = es.cat.segments(index=index, h="docs.count,searchable", format="json")
    return sorted((int(s["docs.count"]) // docs_per_unit for s in segments if s["searchable"] == "true"),
                  reverse=True)


def measure_live(
    es: Elasticsearch, layout: Layout, names: list[str], database: np.ndarray, model: Any, args: argparse.Namespace
) -> dict:
    """Query the index as bulk loading left it (several segments, no force merge): a live index.
    Nested kNN collects num_candidates distinct images per segment, so a segment holding fewer
    images than that is searched exhaustively (all its keypoints)."""
    index = names[-1]
    unit = database.shape[1] + 1 if layout.kind == "nested" else 1
    results: dict[str, Any] = {
        "segments": segment_sizes(es, index, unit),
        "segment_unit": "images" if layout.kind == "nested" else "keypoints",
    }
    rng = np.random.default_rng(args.seed + 11)
    idle = es_idle_cpu_rate(es, 2.0)
    for num_candidates in args.live_candidates:
        key = f"Q=100,num_candidates={num_candidates}"
        results[key] = time_queries(es, layout, index, database, model, args, rng, 100, num_candidates, 2, idle)
        logger.info("%s live %s: %s", layout.name, key, results[key])
    return results


def measure_queries(
    es: Elasticsearch, layout: Layout, names: list[str], database: np.ndarray, model: Any, args: argparse.Namespace
) -> dict:
    index = names[-1]  # the keypoints index for flat, the images index for nested
    results: dict[str, Any] = {}
    rng = np.random.default_rng(args.seed + 7)
    run_query(es, layout, index, make_query(rng, database, 100, model), args.k, args.num_candidates,
              args.msearch_chunk, args.oversample)  # warm-up
    idle = es_idle_cpu_rate(es)
    results["es_idle_cpu_ms_per_s"] = round(idle, 1)
    for q in args.q:
        results[f"Q={q}"] = time_queries(es, layout, index, database, model, args, rng, q, args.num_candidates,
                                         args.repeats, idle)
        logger.info("%s Q=%d: %s", layout.name, q, results[f"Q={q}"])
    for num_candidates in args.sweep_candidates:
        key = f"Q=100,num_candidates={num_candidates}"
        results[key] = time_queries(es, layout, index, database, model, args, rng, 100, num_candidates,
                                    max(2, args.repeats // 2), idle)
        logger.info("%s %s: %s", layout.name, key, results[key])
    for q in args.q:  # the hybrid mode: kNN restricted to a global-descriptor shortlist of 100 images
        key = f"Q={q},image_ids=100"
        results[key] = time_queries(es, layout, index, database, model, args, rng, q, args.num_candidates,
                                    max(2, args.repeats // 2), idle, restrict_to=min(100, len(database)))
        logger.info("%s %s: %s", layout.name, key, results[key])
    if layout.kind == "nested" and args.nested_variants:
        for variant in ("no_inner_hits", "inner_hits_1", "images_k5"):
            key = f"Q=100,{variant}"
            results[key] = time_queries(es, layout, index, database, model, args, rng, 100, args.num_candidates,
                                        max(2, args.repeats // 2), idle, variant)
            results[key]["note"] = "recall counts keypoints: no_inner_hits returns none"
            logger.info("%s %s: %s", layout.name, key, results[key])
    return results


# ---- report --------------------------------------------------------------------------------


def _label(run: dict) -> str:
    return f"{run['layout']}\nN={run['num_images']}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(result["runs"], key=lambda r: (r["num_images"], r["layout"]))
    labels = [_label(r) for r in runs]
    fig, grid = plt.subplots(2, 3, figsize=(22, 11))
    axes = grid.ravel()

    ax = axes[0]
    groups = ["vectors_raw_float", "vectors_quantised", "hnsw_graph", "stored_fields_source_and_id", "doc_values",
              "inverted_index", "points", "other"]
    x = np.arange(len(runs))
    bottom = np.zeros(len(runs))
    for group in groups:
        values = np.array([r["bytes_per_image"].get("lucene_files", {}).get(group, 0) / 1024 for r in runs])
        if values.any():
            ax.bar(x, values, bottom=bottom, label=group)
            bottom += values
    ax.scatter(x, [r["bytes_per_image"]["store_size"] / 1024 for r in runs], color="black", marker="_", s=400,
               label="_stats store size", zorder=3)
    ax.axhline(240, color="red", linestyle="--", label="target 240 KB")
    ax.set_xticks(x, labels, rotation=30, fontsize=7)
    ax.set_ylabel("KB per image (1000 keypoints)")
    ax.set_title("Storage after force merge")
    ax.set_ylim(0, 1.45 * max(bottom.max(), 240))
    ax.legend(fontsize=7, loc="upper left", ncol=3)

    queried = [r for r in runs if r.get("queries")]
    qx = np.arange(len(queried))
    for ax, q in zip(axes[1:3], (100, 1000)):
        key = f"Q={q}"
        p50 = [r["queries"].get(key, {}).get("p50_ms", 0) for r in queried]
        p95 = [r["queries"].get(key, {}).get("p95_ms", 0) for r in queried]
        ax.bar(qx - 0.2, p50, 0.4, label="p50")
        ax.bar(qx + 0.2, p95, 0.4, label="p95")
        ax.axhline(150, color="red", linestyle="--", label="target p50 150 ms (at 10k images)")
        ax.set_xticks(qx, [_label(r) for r in queried], rotation=30, fontsize=7)
        ax.set_ylabel("ms per query image (end to end, msearch)")
        ax.set_title(f"kNN latency, {key} descriptors, k=10")
        ax.legend(fontsize=7)

    ax = axes[3]
    for i, q in enumerate((100, 1000)):
        recall = [r["queries"].get(f"Q={q}", {}).get("recall_at_10", 0) for r in queried]
        ax.bar(qx + (i - 0.5) * 0.4, recall, 0.4, label=f"Q={q}")
    ax.axhline(0.95, color="red", linestyle="--", label="target 0.95")
    ax.set_ylim(0.8, 1.0)
    ax.set_xticks(qx, [_label(r) for r in queried], rotation=30, fontsize=7)
    ax.set_title("ANN recall@10 vs exact (numpy)")
    ax.legend(fontsize=7)

    ax = axes[4]  # the trade-off: recall against time per descriptor, num_candidates swept
    for r in queried:
        points = sorted(
            (value["per_descriptor_ms"], value["recall_at_10"], value.get("num_candidates", r["num_candidates"]))
            for key, value in r["queries"].items()
            if key == "Q=100" or key.startswith("Q=100,num_candidates=")
        )
        if points:
            line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                           label=_label(r).replace("\n", " "))[0]
            for cpu, recall, candidates in points:
                ax.annotate(str(candidates), (cpu, recall), fontsize=6, color=line.get_color())
    ax.axhline(0.95, color="red", linestyle="--")
    ax.set_xlabel("ms per query descriptor, wall (Q=100; machine load differs between runs)")
    ax.set_ylabel("recall@10")
    ax.set_title("Recall vs cost after force merge, labels = num_candidates")
    ax.legend(fontsize=6)

    ax = axes[5]  # the live index: several segments, before the force merge
    for r in runs:
        live = r.get("queries_live")
        if not live:
            continue
        points = sorted((value["num_candidates"], value["per_descriptor_ms"], value["recall_at_10"])
                        for key, value in live.items() if key.startswith("Q=100,"))
        line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                       label=f"{_label(r).replace(chr(10), ' ')}, segments {live['segments']} {live['segment_unit']}")[0]
        for candidates, ms, recall in points:
            ax.annotate(f"r={recall:.2f}", (candidates, ms), fontsize=6, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("num_candidates")
    ax.set_ylabel("ms per query descriptor, wall (Q=100)")
    ax.set_title("Live index (before force merge): nested falls off a cliff")
    ax.legend(fontsize=6)

    fig.suptitle(f"Elasticsearch {result.get('es_version')}, heap {result.get('es_heap_bytes', 0) >> 20} MB, "
                 f"{result.get('machine', {}).get('cpus')} shared cores; data: {result.get('data')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_runs(path: Path) -> list[dict]:
    """Runs recorded so far (each self-describing); older single-run files are converted."""
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    if "runs" in previous:
        return previous["runs"]
    shared = {key: previous.get(key) for key in ("num_images", "num_keypoints", "k", "num_candidates",
                                                 "rescore_oversample", "msearch_chunk", "data")}
    return [{"layout": name, **shared, **entry} for name, entry in previous.get("layouts", {}).items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--es-url", default=os.environ.get("DELF_ES_ES_URL", "http://127.0.0.1:9200"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--keypoints", type=int, default=1000)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--storage-only", nargs="*", default=["nested-hnsw-jsonkp"], choices=list(LAYOUTS),
                        help="layouts measured for ingest and bytes only (no queries)")
    parser.add_argument("--q", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--num-candidates", type=int, default=100)
    parser.add_argument("--sweep-candidates", type=int, nargs="*", default=[],
                        help="also time Q=100 with these num_candidates (recall vs latency)")
    parser.add_argument("--live-candidates", type=int, nargs="*", default=[],
                        help="before the force merge (the live index: many segments), time Q=100 with these "
                             "num_candidates")
    parser.add_argument("--nested-variants", action="store_true",
                        help="nested layouts: also time the query without inner_hits etc. (what the cost is)")
    parser.add_argument("--oversample", type=float, default=1.0, help="rescore_vector oversample for int8_hnsw")
    parser.add_argument("--msearch-chunk", type=int, default=100, help="searches per _msearch request")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark indices")
    parser.add_argument("--out", type=Path, default=RESULTS / "es_layout.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from --out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("elastic_transport").setLevel(logging.WARNING)

    runs = load_runs(args.out)
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    es = connect(Settings(es_url=args.es_url), request_timeout=300)
    build = es.cluster.health()  # info() answers 405 on this build
    node = next(iter(es.nodes.info(metric="jvm,os")["nodes"].values()))
    database, source, model = make_database(args.images, args.keypoints, args.seed)
    logger.info("data: %s, %s", database.shape, source)
    result = {
        "description": "Elasticsearch keypoint layout: one doc per keypoint (flat) vs nested vectors in the image doc",
        "es_version": node["version"],
        "es_heap_bytes": node["jvm"]["mem"]["heap_max_in_bytes"],
        "es_cluster_status": build["status"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "client and Elasticsearch share the same 2 cores with other engineers' jobs; "
                            "loadavg_1min is recorded beside each timing, es_cpu_* is load-independent"},
        "data": source,
        "dims": DIM,
        "runs": runs,
    }
    for name in args.layouts:
        layout = LAYOUTS[name]
        logger.info("layout %s: indexing %d images", name, args.images)
        names = create_indices(es, layout, args.es_url)
        try:
            entry: dict[str, Any] = {
                "layout": name, "kind": layout.kind, "index_options": layout.index_type,
                "hnsw_m": layout.m, "hnsw_ef_construction": layout.ef_construction, "codec": layout.codec,
                "json_keypoints": layout.json_keypoints, "num_images": args.images, "num_keypoints": args.keypoints,
                "k": args.k, "num_candidates": args.num_candidates, "rescore_oversample": args.oversample,
                "msearch_chunk": args.msearch_chunk, "data": source,
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            def live() -> None:
                if name not in args.storage_only and args.live_candidates:
                    entry["queries_live"] = measure_live(es, layout, names, database, model, args)

            entry["ingest"] = ingest(es, layout, names, database, args.seed, before_merge=live)
            logger.info("%s ingest %s", name, entry["ingest"])
            entry["bytes_per_image"] = storage(es, names, args.images, args.images * args.keypoints, layout)
            logger.info("%s bytes/image %s", name, entry["bytes_per_image"]["store_size"])
            if name not in args.storage_only:
                entry["queries"] = measure_queries(es, layout, names, database, model, args)
            runs[:] = [r for r in runs if (r["layout"], r["num_images"], r["num_keypoints"]) !=
                       (name, args.images, args.keypoints)] + [entry]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        finally:
            if not args.keep:
                es.options(ignore_status=404).indices.delete(index=",".join(names))
    plot(result, args.out.with_suffix(".png"))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
