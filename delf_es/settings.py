"""The one settings object.  Built once per entry point (CLI, worker, SDK) and
passed down; nothing else reads the environment.  Every field can be set with an
environment variable ``DELF_ES_<FIELD>`` (e.g. ``DELF_ES_ES_URL``)."""

from __future__ import annotations

import difflib
import os
import shlex
from pathlib import Path
from typing import Any, Mapping

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from delf_es.errors import InvalidSetting

DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
ENV_PREFIX = "DELF_ES_"


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "delf-es"


#: Allowed values of the settings that name one of a few choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "scoring": ("auto", "attention", "norm"),
    "precision": ("auto", "float32", "bfloat16", "float16", "int8"),
    "runtime": ("auto", "torch", "openvino", "onnxruntime"),
    "shortlist_mode": ("local", "global", "hybrid"),
    "correspondences": ("knn", "matching"),
    "rank_by": ("inliers", "verified-then-global", "inliers+global"),
    "ransac_model": ("homography", "fundamental", "affine", "homography-magsac"),
    "id_from": ("path", "content"),
    "backend": ("auto", "embedded", "elasticsearch"),
}


def shown(value: Any) -> str:
    """A setting's value as a user would type it (lists comma-joined, shell-quoted)."""
    if isinstance(value, (tuple, list)):
        value = ",".join(str(v) for v in value)
    return shlex.quote(str(value))


def setting_source(field: str, overrides: Mapping[str, Any], options: Mapping[str, str] | None = None) -> str:
    """Where ``field``'s value came from: ``--option VALUE`` (``options`` maps fields to the
    command line's names), ``field=VALUE`` (given in code), ``DELF_ES_FIELD=VALUE`` (the
    environment) or just the field."""
    if field in overrides:
        option = (options or {}).get(field)
        return f"{option} {shown(overrides[field])}" if option else f"{field}={shown(overrides[field])}"
    variable = ENV_PREFIX + field.upper()
    if variable in os.environ:
        return f"{variable}={shown(os.environ[variable])}"
    return field


def invalid_setting(error: ValidationError | SettingsError, overrides: Mapping[str, Any]) -> InvalidSetting:
    """pydantic's report (many lines, every error) as one line about the first bad value."""
    if isinstance(error, SettingsError):  # a complex field (tuple, list) whose variable is not JSON
        text = str(error)
        field = text.split('"')[1] if text.count('"') >= 2 else ""
        return InvalidSetting("cannot parse the value: give a JSON list, e.g. [0.5, 1.0]",
                              setting_source(field, overrides), field)
    first = error.errors()[0]
    field = str(first["loc"][0]) if first.get("loc") else ""
    message = first.get("msg", str(error)).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        suggestion = difflib.get_close_matches(field, list(Settings.model_fields), n=1)
        message = f"not a setting{f' (did you mean {suggestion[0]}?)' if suggestion else ''}"
    return InvalidSetting(message, setting_source(field, overrides), field)


class Settings(BaseSettings):
    """Configuration of extraction, verification, index and services.

    Units: sizes in px, times in s, byte caps in bytes.  ``Settings(**values)`` (the
    environment fills the rest) raises :class:`~delf_es.errors.InvalidSetting`, one line naming
    the first invalid value and where it came from, never pydantic's multi-line report.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except (ValidationError, SettingsError) as error:
            raise invalid_setting(error, values) from None

    # --- model and extraction -------------------------------------------------
    backbone: str = "efficientnet-lite2"
    backbone_weights: Path | None = Field(
        default=None, description="state_dict file; required for backbones without packaged weights (resnet50)"
    )
    attention_weights: Path | None = Field(
        default=None, description="trained attention head; None = the shipped default for the backbone, if any"
    )
    scoring: str = Field(default="auto", description="'auto' (attention if available), 'attention' or 'norm'")
    pca_path: Path | None = Field(default=None, description="PCA artifact; None = the shipped default")
    use_pca: bool = True
    scales: tuple[float, ...] = DELF_SCALES
    global_scales: tuple[float, ...] = Field(
        default=(0.7071, 1.0, 1.4142), description="pyramid scales pooled into the global descriptor (DELG's)"
    )
    local_layer: str | None = Field(default=None, description="None = the backbone preset's choice")
    max_image_size: int = Field(default=1024, gt=0, description="longer side, px, before the pyramid")
    max_feature_num: int = Field(default=1000, ge=1, le=1 << 20, description="keypoints kept per image")
    score_threshold: float = Field(default=0.0, ge=0.0, description="keep descriptors scoring above this")
    device: str = "cpu"
    runtime: str = Field(
        default="auto", description="what runs the network: 'auto' (on CPU the fastest measured that is installed, "
        "see delf_es/model/runtime.py and docs/extraction.md; on CUDA torch), 'torch', 'openvino' or 'onnxruntime'",
    )
    precision: str = Field(
        default="auto", description="'auto' (float32), 'float32', 'bfloat16' (CPU: bf16 weights; CUDA: autocast), "
        "'float16' (CUDA autocast) or 'int8' (OpenVINO + NNCF; changes the model id)",
    )
    model_cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "delf-es" / "models",
        description="converted networks (OpenVINO, ONNX), built at first use from the shipped weights; "
        "named by the weights' digests, so every data_dir and process can share one",
    )
    int8_calibration: Path | None = Field(
        default=None, description="photos INT8 is calibrated on: the list written by scripts/training_images.sh "
        "(one path per line) or a folder; never evaluation images",
    )
    torch_threads: int = Field(default=0, ge=0, description="threads of the network runtime (torch, OpenVINO, ONNX "
                               "Runtime); 0 = the runtime's default")
    extract_processes: int = Field(
        default=0, ge=0, description="processes that decode + extract in bulk indexing (delf-es index, "
        "DelfEs.bulk_add), each with torch_threads threads (0 there = cores / processes); 0 = one per core on CPU",
    )
    channels_last: bool = Field(default=True, description="torch on CPU: channels-last memory format")
    torch_compile: bool = Field(default=False, description="torch runtime: torch.compile the network")
    extract_batch: int = Field(
        default=1, ge=1, description="images per forward pass in extract_many: same-size pyramid levels of "
        "different images share one batch (a GPU's throughput; on CPU 1 is as fast)",
    )

    # --- input safety -----------------------------------------------------------
    max_pixels: int = Field(default=64_000_000, gt=0, description="decoded pixel cap (decompression bombs)")
    max_file_bytes: int = Field(
        default=256 * 1024 * 1024, gt=0, description="bytes; a larger image file is refused before decoding"
    )
    min_image_side: int = Field(default=32, gt=0, description="px; smaller images are rejected")
    url_timeout: float = Field(default=10.0, gt=0)
    url_max_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    allow_private_urls: bool = False

    # --- matching and verification --------------------------------------------
    match_max_distance: float = Field(default=0.9, gt=0, description="L2 between unit descriptors")
    match_mutual: bool = True
    ransac_model: str = Field(
        default="homography",
        description="'homography' (pydegensac), 'fundamental' (pydegensac), 'affine' (OpenCV) or 'homography-magsac' (OpenCV USAC_MAGSAC)",
    )
    ransac_px: float = Field(default=12.0, gt=0, description="inlier reprojection threshold, px")
    ransac_confidence: float = Field(default=0.999, gt=0, lt=1)
    ransac_max_iters: int = Field(default=2000, gt=0)
    ransac_seed: int = 0
    ransac_scale_tolerance: float | None = Field(
        default=None, gt=0, description="when set, an inlier also needs its keypoints' pyramid scales to agree with "
        "the model's zoom within this many log2 units (levels are 0.5 apart); None = off (see verify.scale_consistent)",
    )
    min_inlier_spread: float = Field(
        default=4.0, ge=0, description="px; a model whose inliers spread less than this (minor-axis std) in either "
        "image, i.e. lie on a line or in a spot, is no match (delf_es/degenerate.py); 0 = no check.  The floor under "
        "min_inlier_spread_fraction (small images, unknown sizes): below every true pair's spread (>= 8.7 px), above "
        "a line's or a point cloud's (< 3 px) (benchmarks/results/chance_inliers.json, docs/quality.md)",
    )
    min_inlier_spread_fraction: float = Field(
        default=0.02, ge=0, lt=1, description="the same rule relative to the image: a model also needs its inliers to "
        "spread at least this fraction of each image's short side (the larger of the two thresholds applies; in "
        "search the stored keypoints' extent stands in for the database image's size); 0 = px rule only.  Chosen "
        "on the pairs: the smallest that rejects every degenerate case (a line 0.013, a 24 px spot 0.016-0.017), "
        "while solved true pairs spread >= 0.086 (benchmarks/results/chance_inliers.json, docs/quality.md)",
    )
    min_keypoint_contrast: float = Field(
        default=1.0, ge=0, description="grey levels; keypoints whose cell has a lower pixel std are dropped from "
        "added and query images, so flat images match nothing (delf_es/degenerate.py); 0 = keep all.  Chosen on "
        "the pairs: 1 costs 1 of 1008 true-pair inliers, 2 cost 19 (benchmarks/results/degenerate_geometry*.json)",
    )

    # --- search -------------------------------------------------------------------
    shortlist_mode: str | None = Field(
        default=None,
        description="'hybrid' (both, interleaved), 'local' (keypoint votes) or 'global' (DELG); None = the "
        "backend's measured best (see search_plan)",
    )
    shortlist_size: int = Field(default=100, ge=1, description="images verified per query")
    correspondences: str | None = Field(
        default=None,
        description="'knn': RANSAC on the kNN pairs of each shortlisted image; 'matching': match the query's "
        "descriptors to each shortlisted image's stored int8 codes (mutual nearest neighbours), so the "
        "global shortlist needs no keypoint kNN at all; None = the backend's measured best (see search_plan)",
    )
    knn_k: int = Field(default=10, ge=1, description="database keypoints fetched per query descriptor")
    knn_min_similarity: float = Field(default=0.595, ge=-1, le=1, description="cosine; 0.595 = L2 0.9 between unit vectors")
    query_max_descriptors: int = Field(default=1000, ge=1, description="strongest query keypoints used for kNN")
    min_inliers: int = Field(default=12, ge=0, description="verified inliers for a hit to count as a match")
    verify_threads: int = Field(
        default=0, ge=0, description="threads verifying shortlisted images; 0 = auto: the cores the 1-minute load "
        "average leaves free (at least 1, see search.verify_thread_count).  numpy's products and pydegensac both "
        "release the GIL (benchmarks/verify_speed.py measures it), so threads scale on idle cores; on busy shared "
        "cores 1 was measured faster (p50 252-280 ms vs 326-365 ms with 2 at 10k images, "
        "benchmarks/results/search_speed_es_10k*.json), which auto picks there; at load 1.1-1.8 (niced jobs beside) 2 were "
        "1.32x faster (p50 651 vs 862 ms, benchmarks/results/verify_speed.json)",
    )
    rank_by: str = Field(
        default="inliers+global",
        description="final order: 'inliers+global' (inliers + rank_global_weight x global cosine; best measured, "
        "benchmarks/rank_by.py), 'inliers' or 'verified-then-global' (>= min_inliers by inliers, the rest by global similarity)",
    )
    query_expansion: int = Field(
        default=5, ge=0, description="verified query expansion (alpha-QE, as in the DELG and cirtorch evaluations): "
        "re-query the global index with the query's global descriptor averaged with those of its best this many "
        "verified hits (>= qe_min_inliers), verify the new images it brings and re-rank by the expanded "
        "similarity; 0 = off.  On by default: +4.5 mAP on paris250 (87.57 vs 83.06) for +20 ms per query, and "
        "it changes no pair's verification.  Costs one more global kNN, one read of those hits' vectors and "
        "the RANSAC of the new images (benchmarks/results/eval/quality-qe-5.json)",
    )
    qe_min_inliers: int = Field(default=22, ge=1, description="inliers for a hit to join the expanded query; "
                                "above every different-scene pair's (max 21 of 2,924, p99 12), and no true pair of the "
                                "pairs check is lost against 15 (benchmarks/results/chance_inliers.json)")
    qe_alpha: float = Field(default=3.0, ge=0, description="alpha-QE: a verified hit weighs cos(query, hit)^alpha")
    rank_global_weight: float = Field(
        default=150.0, ge=0, description="inliers one unit of global cosine is worth (rank_by='inliers+global'); "
        "chosen on the pairs check: the weight that puts most true pairs above different-scene pairs (AUC 0.9877 "
        "of 44 x 2,924; 50, chosen on paris250 before, 0.9852: benchmarks/results/rank_weight_pairs.json)"
    )

    # --- index and services -----------------------------------------------------
    commit_seconds: float = Field(
        default=1.0, ge=0, description="s; bulk adds commit what is extracted at least this often (and every "
        "batch_size images), so a crash or Ctrl-C loses at most this much work; 0 = after every image",
    )
    id_from: str = Field(
        default="path", description="id of an image added from a file: 'path' (its canonical path: absolute, "
        "symlinks resolved, so every spelling of one file is one id) or 'content' (sha256 of its bytes)",
    )
    backend: str = Field(
        default="auto", description="index backend: 'auto' (Elasticsearch when es_url is set, else embedded), "
        "'embedded' (even with es_url set) or 'elasticsearch' (es_url required)",
    )
    keypoint_vectors: bool | None = Field(
        default=None, description="index every keypoint's descriptor for the keypoint kNN (HNSW on Elasticsearch, "
        "faiss on the embedded index), which the 'local' and 'hybrid' shortlists and 'knn' correspondences need; "
        "recorded in the index when it is created (an index created before this setting has them).  None = the "
        "backend's default plan decides: off on Elasticsearch (global shortlist + matching never searches them; "
        "they were about half of each image's bytes and most of its ingest time), on for the embedded index "
        "(see index_keypoint_vectors, benchmarks/results/keypoint_vectors.json)",
    )
    embedded_exact_limit: int | None = Field(
        default=200_000, ge=0, description="embedded index: most keypoint vectors searched exactly (flat); above "
        "it an IVF index is trained; None = always exact, 0 = always IVF (benchmarks/embedded_index.py)",
    )
    embedded_nprobe: int | None = Field(
        default=None, ge=1, description="embedded index: IVF lists visited per query; None = auto, "
        "0.14 nlist^0.7 (0.19 with SQ8 codes) and at least 16, so recall@10 stays >= 0.95 as the index grows "
        "(16 fixed gave 0.86 at 1000 images, 0.80 at 3000 and 10,000; auto gave 0.954 / 0.957 at 10,000 / 30,000: "
        "benchmarks/results/embedded_recall.json, scale_embedded.json)",
    )
    embedded_sq8_from: int | None = Field(
        default=4_000_000, ge=0, description="embedded index: keypoint vectors from which the IVF stores them as "
        "8-bit codes (48 B per vector with its id instead of 168: 4.8 GB instead of 16.8 at 100,000 images of 1000 "
        "keypoints), for a recall cost measured in benchmarks/results/embedded_structure.json; None = always float32",
    )
    embedded_hybrid_max_images: int | None = Field(
        default=2000, ge=0, description="embedded index: most images for which the default plan (shortlist_mode "
        "and correspondences unset) is the hybrid shortlist with kNN pairs; on a larger index it is the global "
        "shortlist with descriptor matching, as on Elasticsearch.  The hybrid plan's keypoint kNN of 1000 query "
        "descriptors grows with the index while matching the shortlist does not; measured on one index, p50 ms "
        "hybrid vs global + matching: 769 vs 1044 at 1000 images, 1563 vs 1187 at 3000, 2826 vs 1238 at 5000 "
        "(benchmarks/results/scale_embedded_crossover.json), 2246 vs 826 at 10,000 (scale_embedded.json); "
        "None = hybrid at any size",
    )
    es_url: str | None = None
    redis_url: str | None = None
    index_alias: str = "delf-images"
    es_timeout: float = Field(default=10.0, gt=0, description="s, per Elasticsearch request: a dead server fails fast")
    es_knn_num_candidates: int = Field(
        default=300, ge=1, le=10_000, description="HNSW candidates per keypoint kNN search (recall vs latency; "
        "one search per query descriptor, so it scales the local and hybrid plans' cost)"
    )
    es_global_knn_num_candidates: int = Field(
        default=1000, ge=1, le=10_000, description="HNSW candidates per shard of the global kNN (one search per "
        "query): one shard at 100k images gave recall@10 0.968 (session 6's build) and 0.992 (session 7's) at 300, "
        "0.995 at 1000 for +1.6 ms (12.2 -> 13.8 ms per kNN; benchmarks/results/scale.json)"
    )
    data_dir: Path = Field(default_factory=default_data_dir)

    # --- workers (Celery; see delf_es/workers/) -------------------------------------------
    worker_redis_url: str | None = Field(
        default=None, description="Celery broker, result backend and staging; None = redis_url"
    )
    worker_namespace: str = Field(
        default="delf-es", min_length=1, description="prefix of every Redis key the workers use (isolates fleets)"
    )
    worker_index_batch: int = Field(default=32, ge=1, description="images per bulk write of the index queue")
    worker_extract_batch: int = Field(
        default=1, ge=1, description="images per extract task sent by the submitter: a GPU fleet sets this (and "
        "extract_batch on its workers) to run several images' pyramid levels per forward pass",
    )
    worker_visibility_timeout: float = Field(
        default=3600.0, gt=0, description="s; a task of a worker that died unacknowledged is redelivered after this"
    )
    worker_lock_ttl: float = Field(default=300.0, gt=0, description="s; the index writer's lock outlives a dead writer this long")
    worker_max_retries: int = Field(default=8, ge=0, description="retries (exponential backoff) on index/Redis outages")
    worker_reindex_schedule: str = Field(
        default="0 3 * * *",
        description="when beat checks for a model/PCA change and reindexes: a crontab "
        "(minute hour day-of-month month day-of-week) or an interval in s",
    )
    worker_flush_interval: float = Field(default=60.0, gt=0, description="s between beat's straggler flushes")

    # --- HTTP server (delf-es serve, delf_es/api/) ---------------------------------
    api_token: str | None = Field(
        default=None, repr=False, description="bearer token every /v1 route requires; serve refuses a "
        "non-loopback host without one",
    )
    api_max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="request body cap, bytes")
    api_max_extractions: int = Field(default=1, ge=1, description="extractions (model runs) at once")
    api_max_queued: int = Field(
        default=32, ge=0, description="requests waiting for an extraction slot; beyond that, 503 + Retry-After"
    )
    api_request_timeout: float = Field(default=120.0, gt=0, description="s a request may take (queue + work) before 503")
    api_body_timeout: float = Field(default=30.0, gt=0, description="s to receive a request body before 408")
    api_cors_origins: tuple[str, ...] = Field(default=(), description="origins allowed by CORS; empty = CORS off")
    api_upload_dir: Path | None = Field(
        default=None, description="where uploads for the workers (?wait=false) are staged; the workers must "
        "see the same folder; None = <data_dir>/api-uploads",
    )
    thumbnails: bool = Field(default=True, description="store a small JPEG (<= 256 px, <= 16 KB) with each image")

    # --- Elasticsearch index layout (applied when the indices are created) ----------------
    es_number_of_shards: int = Field(
        default=1, ge=1, le=1024, description="primary shards of the image and keypoint indices; 1 suits one "
        "node, as many as nodes (3) spreads a cluster's work (docs/operations.md)",
    )
    es_number_of_replicas: int = Field(
        default=0, ge=0, le=32, description="replica copies of each shard (images, keypoints and failures "
        "indices); 0 on one node (a replica there is never assigned: health stays yellow), 1 on 3 nodes so "
        "losing one node loses nothing",
    )
    es_bulk_load_images: int = Field(
        default=1000, ge=0, description="an add_features_bulk load that passes this many images runs as a bulk "
        "load (refresh off, no replicas, es_bulk_writers writers; settings restored at the end, also on "
        "error: delf_es/index/es/bulk_load.py); 0 = never",
    )
    es_bulk_writers: int = Field(default=4, ge=1, le=16, description="concurrent write rounds during a bulk load "
                                 "(4: the fastest of 1, 2, 4 in benchmarks/results/bulk_load.json)")

    # --- local services (delf-es services, delf_es/services/) ---------------------------
    services_home: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "delf-es" / "services",
        description="binaries, data, logs and pid files of the local Elasticsearch and Redis",
    )
    es_port: int = Field(default=9200, ge=1, le=65535, description="HTTP port of local node 0; node i uses es_port + i")
    es_transport_port: int | None = Field(
        default=None, ge=1, le=65535, description="transport port of local node 0 (node i: + i); None = es_port + 1100",
    )
    es_nodes: int = Field(default=1, ge=1, le=9, description="local Elasticsearch nodes started as one cluster")
    es_heap: str = Field(default="512m", pattern=r"^[0-9]+[kKmMgG]$", description="-Xms/-Xmx of each local node, e.g. 512m")
    es_java_opts: str = Field(default="", description="extra JVM options of the local nodes")
    es_user: str = Field(default="delfes", min_length=1, description="unprivileged user running the local nodes "
                         "(Elasticsearch refuses root)")
    es_start_timeout: float = Field(default=120.0, gt=0, description="s a start may take until the cluster is healthy")
    java_home: Path | None = Field(default=None, description="JDK (>= 21) for the local nodes; None = the newest found")
    redis_port: int = Field(default=6379, ge=1, le=65535, description="port of the local Redis")
    redis_appendonly: bool = Field(
        default=False, description="local Redis writes an append-only file (fsync every second), so a restart "
        "keeps queues and state; off = no persistence (tests, caches)",
    )

    @field_validator("scales", "global_scales")
    @classmethod
    def _scales_positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(s <= 0 for s in value):
            raise ValueError("scales must be a non-empty list of positive numbers")
        return tuple(sorted(value))

    @field_validator("worker_reindex_schedule")
    @classmethod
    def _schedule_form(cls, value: str) -> str:
        try:
            seconds = float(value)
        except ValueError:
            if len(value.split()) != 5:
                raise ValueError("worker_reindex_schedule: a 5-field crontab or a number of seconds") from None
            return value
        if seconds <= 0:
            raise ValueError("worker_reindex_schedule: an interval must be positive")
        return value

    @field_validator(*CHOICES)
    @classmethod
    def _known_choice(cls, value: str | None, info: ValidationInfo) -> str | None:
        allowed = CHOICES[info.field_name]
        if value is None and cls.model_fields[info.field_name].default is None:
            return value  # unset: the backend's measured best (see search_plan)
        if value not in allowed:
            quoted = [f"'{choice}'" for choice in allowed]
            raise ValueError(f"{info.field_name} must be {', '.join(quoted[:-1])} or {quoted[-1]}")
        return value

    def index_backend(self) -> str:
        """The backend this configuration uses: ``backend``, with 'auto' resolved from ``es_url``."""
        if self.backend == "auto":
            return "elasticsearch" if self.es_url else "embedded"
        return self.backend

    def index_keypoint_vectors(self) -> bool:
        """Whether an index created with these settings indexes keypoint vectors: ``keypoint_vectors``,
        unset = whether the backend's default plan (:meth:`search_plan`) uses the keypoint kNN."""
        if self.keypoint_vectors is not None:
            return self.keypoint_vectors
        mode, correspondences = self.search_plan()
        return needs_keypoint_knn(mode, correspondences)

    def search_plan(self, keypoint_vectors: bool = True, images: int | None = None) -> tuple[str, str]:
        """(shortlist_mode, correspondences) to search with.  Unset, each is the best measured for
        the backend (benchmarks/search_speed.py, benchmarks/results/eval/): on Elasticsearch the
        global shortlist with descriptor matching (one kNN search per query instead of one per
        query descriptor: p50 0.7 s vs 11.4 s at 1000 images, mAP 84.8 vs 85.1); on the embedded
        index, whose faiss kNN is cheap while it is small, the hybrid shortlist with kNN pairs up
        to ``embedded_hybrid_max_images`` indexed ``images`` (None = size unknown: hybrid), the
        global plan above.  On an index without keypoint vectors (``keypoint_vectors=False``) an
        unset one is the choice needing no keypoint kNN (global, matching); a set one is kept (and
        refused by the search)."""
        small = images is None or self.embedded_hybrid_max_images is None or images <= self.embedded_hybrid_max_images
        knn_by_default = keypoint_vectors and self.index_backend() != "elasticsearch" and small
        mode = self.shortlist_mode or ("hybrid" if knn_by_default else "global")
        correspondences = self.correspondences or ("knn" if knn_by_default else "matching")
        return mode, correspondences


def needs_keypoint_knn(shortlist_mode: str, correspondences: str) -> bool:
    """True when a search plan runs the keypoint kNN: a local or hybrid shortlist, or kNN pairs
    (the kNN restricted to the shortlisted images)."""
    return shortlist_mode in ("local", "hybrid") or correspondences == "knn"
