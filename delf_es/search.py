"""Query features -> shortlist -> geometric verification -> ranked hits.

1. shortlist (``shortlist_mode``):
   - ``local``: batched approximate kNN of the query's strongest descriptors; every database
     keypoint within ``knn_min_similarity`` votes for its image (one vote per query keypoint);
   - ``global``: nearest global (DELG GeM) descriptors;
   - ``hybrid``: the two rankings interleaved;
2. keypoint locations of the shortlisted images from the cache (misses read from the index
   and written back);
3. correspondences (``correspondences``), then RANSAC; images are ranked by ``rank_by``
   (see :func:`rank_hits`):
   - ``knn``: the kNN pairs (query keypoint, database keypoint) of each image, made one-to-one
     (shortlisted images without pairs get a kNN restricted to them);
   - ``matching``: the query's descriptors matched to the image's stored int8 codes (mutual
     nearest neighbours above ``knn_min_similarity``), codes read like the locations
     (cache, then index).  With the global shortlist no keypoint kNN runs at all (one kNN
     search instead of one per query descriptor), but matching costs CPU here instead: a
     1000 x 1000 product and two argmaxes per shortlisted image (benchmarks/search_speed.py).
     Measured alternatives (benchmarks/verify_speed.py, real features): one product over
     several shortlisted images at once is slower on this CPU (the reductions leave the
     cache), float16 has no fast product on AVX2, and an early exit below ``min_inliers``
     mutual matches never fires on real shortlists (the fewest seen is ~60 matches); what
     scales is verifying images in threads (``verify_threads``): the products and pydegensac
     release the GIL.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
from threadpoolctl import threadpool_limits

from delf_es.cache import LocationCache, codes_namespace, image_revisions, revision_key
from delf_es.degenerate import keypoint_extent
from delf_es.index.codes import decode_codes
from delf_es.index.base import Backend, MetadataFilter, Neighbours
from delf_es.errors import KeypointVectorsDisabled
from delf_es.settings import Settings, needs_keypoint_knn
from delf_es.types import Features, SearchHit
from delf_es.verify import estimate_model, scale_consistent

log = logging.getLogger(__name__)

_NO_PAIRS = np.zeros((0, 4), np.float32)


@dataclass
class _Candidate:
    votes: int = 0
    global_similarity: float = float("nan")
    query_index: list[np.ndarray] = field(default_factory=list)
    keypoint_index: list[np.ndarray] = field(default_factory=list)
    similarity: list[np.ndarray] = field(default_factory=list)


class Searcher:
    """Runs the search pipeline against any :class:`Backend` and :class:`LocationCache`."""

    def __init__(self, backend: Backend, cache: LocationCache, settings: Settings, model_id: str) -> None:
        self.backend = backend
        self.cache = cache
        self.settings = settings
        self.model_id = model_id

    def search(
        self, query: Features, limit: int | None = None, metadata_filter: MetadataFilter | None = None
    ) -> list[SearchHit]:
        """Ranked hits, best first: every shortlisted image, verified (``inliers`` set)."""
        s = self.settings
        candidates: dict[str, _Candidate] = defaultdict(_Candidate)
        descriptors = query.descriptors[: s.query_max_descriptors]
        local_order: list[str] = []
        keypoint_vectors = self.backend.has_keypoint_vectors()
        # the embedded default plan follows the index's size (its count is in memory; Elasticsearch's
        # default does not depend on it, so no count request is sent there)
        images = self.backend.count() if s.index_backend() == "embedded" else None
        shortlist_mode, correspondences = s.search_plan(keypoint_vectors, images)
        if not keypoint_vectors and needs_keypoint_knn(shortlist_mode, correspondences):
            raise KeypointVectorsDisabled(
                f"shortlist_mode={shortlist_mode!r} with correspondences={correspondences!r} needs the keypoint kNN, "
                "but this index was created without keypoint vectors (keypoint_vectors=false): use "
                "shortlist_mode='global' and correspondences='matching', or rebuild the index with keypoint vectors")
        if shortlist_mode in ("local", "hybrid") and len(descriptors):
            self._collect(self.backend.knn(descriptors, s.knn_k, metadata_filter), candidates)
            local_order = sorted(
                candidates,
                key=lambda i: (-candidates[i].votes, -float(sum(x.sum() for x in candidates[i].similarity)), tie_break(i)),
            )
        global_order: list[str] = []
        if shortlist_mode in ("global", "hybrid") and query.global_desc.size:
            for image_id, similarity in self.backend.global_knn(query.global_desc, s.shortlist_size, metadata_filter):
                candidates[image_id].global_similarity = similarity
                global_order.append(image_id)
        shortlist = _interleave([local_order, global_order], s.shortlist_size)
        matching = correspondences == "matching"
        hits = rank_hits(self._verify_images(query, descriptors, shortlist, candidates, matching, metadata_filter), s)
        if s.query_expansion and query.global_desc.size:
            hits = self._expand(query, descriptors, hits, candidates, matching, metadata_filter)
        return hits[:limit] if limit else hits

    def _verify_images(self, query: Features, descriptors: np.ndarray, image_ids: list[str],
                       candidates: dict[str, _Candidate], matching: bool,
                       metadata_filter: MetadataFilter | None) -> list[SearchHit]:
        """Correspondences and RANSAC of ``image_ids`` (unranked hits, in that order)."""
        s = self.settings
        without_pairs = [i for i in image_ids if not candidates[i].query_index]
        if without_pairs and len(descriptors) and not matching:
            restricted = self.backend.knn(descriptors, s.knn_k, metadata_filter, image_ids=without_pairs)
            self._collect(restricted, candidates, count_votes=True)
        # The index's revision of each shortlisted image is part of its cache key: an entry cached
        # for another revision (a re-add while Redis was paused, killed or partitioned) is a miss.
        revisions = image_revisions(self.backend, image_ids)
        locations = self._cached(self.model_id, image_ids, revisions, self.backend.keypoints)
        codes = (self._cached(codes_namespace(self.model_id), image_ids, revisions, self.backend.descriptor_codes)
                 if matching else {})
        # scales are read only for the scale rule (one more read of the shortlist; not cached)
        scales = self.backend.keypoint_scales(image_ids) if s.ransac_scale_tolerance is not None else {}
        # One BLAS thread: the products here are small (1000 x 40 x 1000), and OpenBLAS threads
        # on a busy machine made them 25x slower (72 ms vs 2.7 ms measured on 2 loaded cores).
        with threadpool_limits(limits=1, user_api="blas"):
            return self._verify_all(query, descriptors, image_ids, candidates, locations, codes, matching, scales)

    def _expand(self, query: Features, descriptors: np.ndarray, hits: list[SearchHit],
                candidates: dict[str, _Candidate], matching: bool,
                metadata_filter: MetadataFilter | None) -> list[SearchHit]:
        """Verified alpha-QE (Chum et al. 2007's "Total Recall" with the weights of Radenovic et
        al.'s alpha-QE): the query's global descriptor plus its best ``query_expansion`` hits
        with at least ``qe_min_inliers`` inliers, each weighted cos(query, hit)^``qe_alpha``;
        the expanded vector's global kNN brings images the first shortlist missed, which are
        verified too, and every hit is re-ranked with its similarity to the expanded vector."""
        s = self.settings
        verified = [h.image_id for h in hits if (h.inliers or 0) >= s.qe_min_inliers][: s.query_expansion]
        if not verified:
            return hits
        vectors = self.backend.global_descriptors(verified)
        expanded = alpha_query_expansion(query.global_desc, [vectors[i] for i in verified if i in vectors], s.qe_alpha)
        similarity = dict(self.backend.global_knn(expanded, s.shortlist_size, metadata_filter))
        seen = {h.image_id for h in hits}
        fresh = [image_id for image_id in similarity if image_id not in seen]
        if fresh:
            hits = hits + self._verify_images(query, descriptors, fresh, candidates, matching, metadata_filter)
        hits = [replace(h, global_similarity=similarity.get(h.image_id, float("nan"))) for h in hits]
        return rank_hits(hits, s)

    def _verify_all(self, query: Features, descriptors: np.ndarray, shortlist: list[str],
                    candidates: dict[str, _Candidate], locations: dict[str, np.ndarray],
                    codes: dict[str, np.ndarray], matching: bool,
                    scales: dict[str, np.ndarray] | None = None) -> list[SearchHit]:
        s = self.settings
        scales = scales or {}

        def verify_one(image_id: str) -> SearchHit:
            candidate = candidates[image_id]
            if matching:
                q_idx, db_idx = mutual_matches(descriptors, codes.get(image_id), s.knn_min_similarity)
                candidate.votes = max(candidate.votes, len(q_idx))
                pairs = self._ransac(query, q_idx, db_idx, locations.get(image_id), scales.get(image_id))
            else:
                pairs = self._verify(query, candidate, locations.get(image_id), scales.get(image_id))
            inliers = len(pairs)
            return SearchHit(image_id=image_id, score=float(inliers), inliers=inliers,
                             votes=candidate.votes, global_similarity=candidate.global_similarity,
                             inlier_pairs=pairs)

        threads = min(verify_thread_count(s.verify_threads), len(shortlist))
        if threads <= 1:
            return [verify_one(image_id) for image_id in shortlist]
        # Each image's result depends only on its own inputs (RANSAC is seeded), so the order
        # of completion cannot change a hit; map() keeps the shortlist order.
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="delf-es-verify") as pool:
            return list(pool.map(verify_one, shortlist))

    def _collect(self, neighbours: Neighbours, candidates: dict[str, _Candidate], count_votes: bool = True) -> None:
        keep = neighbours.similarity >= self.settings.knn_min_similarity
        if not keep.any():
            return
        image_ids = neighbours.image_ids[keep]
        query_index = neighbours.query_index[keep]
        keypoint_index = neighbours.keypoint_index[keep]
        similarity = neighbours.similarity[keep]
        order = np.argsort(image_ids, kind="stable")
        boundaries = np.flatnonzero(image_ids[order][1:] != image_ids[order][:-1]) + 1
        for group in np.split(order, boundaries):
            candidate = candidates[str(image_ids[group[0]])]
            candidate.query_index.append(query_index[group])
            candidate.keypoint_index.append(keypoint_index[group])
            candidate.similarity.append(similarity[group])
            if count_votes:
                candidate.votes += int(len(np.unique(query_index[group])))

    def _cached(self, namespace: str, image_ids: list[str], revisions: dict[str, str], read) -> dict[str, np.ndarray]:
        """Arrays of ``image_ids`` from the cache under their revision keys; misses read with
        ``read`` and written back.  Ids without a revision (no longer indexed) are left out."""
        keys = {i: revision_key(i, revisions[i]) for i in image_ids if i in revisions}
        cached, seen = self.cache.read_many(namespace, list(keys.values()))
        found = {i: cached[key] for i, key in keys.items() if key in cached}
        missing = [i for i in keys if i not in found]
        if missing:
            fetched = read(missing)
            # not over a writer's newer version of the same key (versions, cache.py)
            self.cache.fill_many(namespace, {keys[i]: a for i, a in fetched.items() if i in keys}, seen)
            found.update(fetched)
        return found

    def _verify(self, query: Features, candidate: _Candidate, locations: np.ndarray | None,
                scales: np.ndarray | None = None) -> np.ndarray:
        if locations is None or not candidate.query_index:
            return _NO_PAIRS
        q_idx, db_idx = one_to_one(
            np.concatenate(candidate.query_index), np.concatenate(candidate.keypoint_index),
            np.concatenate(candidate.similarity),
        )
        return self._ransac(query, q_idx, db_idx, locations, scales)

    def _ransac(self, query: Features, q_idx: np.ndarray, db_idx: np.ndarray, locations: np.ndarray | None,
                scales: np.ndarray | None = None) -> np.ndarray:
        """The verified pairs, (K, 4) float32 ``[qx, qy, x, y]`` px (K = the inlier count)."""
        if locations is None or not len(q_idx):
            return _NO_PAIRS
        valid = db_idx < len(locations)
        q_idx, db_idx = q_idx[valid], db_idx[valid]
        s = self.settings
        # the database image's size is not read here: its stored keypoints' extent stands in
        sizes = (query.image_size, keypoint_extent(locations) if s.min_inlier_spread_fraction > 0 else None)
        model, mask = estimate_model(query.keypoints[q_idx], locations[db_idx], s.ransac_model, s.ransac_px,
                                     s.ransac_confidence, s.ransac_max_iters, s.ransac_seed, s.min_inlier_spread,
                                     min_spread_fraction=s.min_inlier_spread_fraction, image_sizes=sizes)
        mask = np.asarray(mask, bool)
        # the scale rule needs the image's stored scales; an image stored without them keeps its inliers
        if s.ransac_scale_tolerance is not None and scales is not None and len(scales) == len(locations):
            mask = scale_consistent(model, s.ransac_model, query.keypoints[q_idx], query.scales[q_idx],
                                    scales[db_idx], mask, s.ransac_scale_tolerance)
        return np.hstack([query.keypoints[q_idx][mask], locations[db_idx][mask]]).astype(np.float32)


def verify_thread_count(setting: int, cpu_count: int | None = None, load: float | None = None) -> int:
    """Threads to verify with: ``setting`` when > 0; 0 = auto, the cores the 1-minute load average
    leaves free, counting this process's own (it is running, so it is part of the load), at least 1
    and at most ``cpu_count``, rounded to the nearest whole core (a load of 1.1-1.2 on 2 cores is
    this search plus a little: 2 threads were 1.32x faster there, benchmarks/results/verify_speed.json;
    rounding down had given 1).  A busy machine gets 1 thread: there, threads only fight for cores."""
    if setting > 0:
        return setting
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    busy = load if load is not None else os.getloadavg()[0]
    return max(1, min(cores, int(cores - busy + 1 + 0.5)))


def alpha_query_expansion(query: np.ndarray, hits: list[np.ndarray], alpha: float) -> np.ndarray:
    """(G,) unit vector: ``query`` plus each of ``hits`` weighted max(cos(query, hit), 0)^alpha,
    L2-normalised (alpha = 0: the plain average query expansion of Chum et al.)."""
    q = np.asarray(query, np.float32)
    total = q.astype(np.float64).copy()
    for vector in hits:
        v = np.asarray(vector, np.float64)
        total += max(float(q @ v), 0.0) ** alpha * v
    norm = np.linalg.norm(total)
    return (total / norm).astype(np.float32) if norm > 0 else q


def rank_hits(hits: list[SearchHit], s: Settings) -> list[SearchHit]:
    """The final order (``rank_by``), best first; ``score`` is what the rule ranks by.

    - ``inliers``: inliers, then votes, then global similarity (score = inliers);
    - ``verified-then-global`` (DELG's rule): hits with at least ``min_inliers`` inliers
      first, by inliers; the rest below them by global similarity, unknown last (score =
      inliers);
    - ``inliers+global``: inliers + ``rank_global_weight`` x global cosine.  A hit the
      global kNN did not return (unknown similarity) gets the lowest similarity it did
      return: the kNN returns the most similar images, so that is an upper bound.
    """
    known = [h.global_similarity for h in hits if np.isfinite(h.global_similarity)]
    floor = min(known) if known else 0.0

    def global_sim(h: SearchHit, unknown: float) -> float:
        return float(h.global_similarity) if np.isfinite(h.global_similarity) else unknown

    if s.rank_by == "inliers+global":
        hits = [replace(h, score=h.inliers + s.rank_global_weight * global_sim(h, floor)) for h in hits]
        return sorted(hits, key=lambda h: (-h.score, -h.inliers, -h.votes, tie_break(h.image_id)))
    if s.rank_by == "verified-then-global":
        def key(h: SearchHit):
            verified = h.inliers >= s.min_inliers
            return (not verified, -h.inliers if verified else 0, -global_sim(h, -2.0), -h.inliers, -h.votes,
                    tie_break(h.image_id))
        return sorted(hits, key=key)
    return sorted(hits, key=lambda h: (-h.inliers, -h.votes, -global_sim(h, -2.0), tie_break(h.image_id)))


def tie_break(image_id: str) -> str:
    """Order of exact ties: a hash of the id, never the id itself (ids such as paths often
    group images by subject, which would leak into tied rankings)."""
    return hashlib.blake2b(image_id.encode(), digest_size=8).hexdigest()


def one_to_one(query_index: np.ndarray, keypoint_index: np.ndarray, similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs, most similar first: each query keypoint keeps its best database
    keypoint, then each database keypoint its best query keypoint (kNN returns several
    candidates per keypoint, and repeated points would bias RANSAC)."""
    order = np.argsort(-similarity, kind="stable")
    q, d = query_index[order], keypoint_index[order]
    _, first = np.unique(q, return_index=True)
    first.sort()
    q, d = q[first], d[first]
    _, first = np.unique(d, return_index=True)
    first.sort()
    return q[first], d[first]


#: Query rows per block of the matching product: a (256, 1000) float32 block is 1 MB, so the row
#: argmax and the running column max read it from cache; the whole (1000, 1000) product (4 MB per
#: image, 8 MB with two verify threads = this CPU's whole L3) was written to memory and read back
#: twice.  Same pairs, bit for bit (test_mutual_matches_in_blocks_equal_the_whole_product); 0.84x
#: the CPU time per image (benchmarks/verify_speed.py, "blocked_product").
MATCH_BLOCK_ROWS = 256


def mutual_matches(query: np.ndarray, codes: np.ndarray | None, min_similarity: float,
                   block_rows: int = MATCH_BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours between (Q, D) unit ``query`` descriptors and an image's (N, D)
    int8 ``codes``, cosine at least ``min_similarity``: (query index, keypoint index) arrays.

    The (Q, N) cosines are computed ``block_rows`` query rows at a time: each block gives its rows'
    best keypoints and updates every keypoint's best cosine so far (a column max is a contiguous
    reduction; argmax down the columns of a C-ordered matrix costs 2-3x more, profiled)."""
    if codes is None or not len(codes) or not len(query):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    database_t = decode_codes(codes).T
    rows = len(query)
    step = max(1, min(int(block_rows), rows))
    best_keypoint = np.empty(rows, np.int64)
    best = np.empty(rows, np.float32)
    column_best = np.full(len(codes), -np.inf, np.float32)
    block = np.empty((step, len(codes)), np.float32)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        similarity = block[: stop - start]
        np.matmul(query[start:stop], database_t, out=similarity)
        keypoint = similarity.argmax(axis=1)
        best_keypoint[start:stop] = keypoint
        best[start:stop] = similarity[np.arange(stop - start), keypoint]
        np.maximum(column_best, similarity.max(axis=0), out=column_best)
    # Mutual iff no query row beats this one on its keypoint.
    keep = (best >= column_best[best_keypoint]) & (best >= min_similarity)
    q, keypoint = np.flatnonzero(keep), best_keypoint[keep]
    _, first = np.unique(keypoint, return_index=True)  # exact ties: the lowest query row, as argmax
    first.sort()
    return q[first], keypoint[first]


def _interleave(rankings: list[list[str]], size: int) -> list[str]:
    """Round-robin merge of rankings without duplicates, up to ``size`` ids."""
    out: list[str] = []
    seen: set[str] = set()
    for position in range(max((len(r) for r in rankings), default=0)):
        for ranking in rankings:
            if position < len(ranking) and ranking[position] not in seen:
                seen.add(ranking[position])
                out.append(ranking[position])
                if len(out) == size:
                    return out
    return out
