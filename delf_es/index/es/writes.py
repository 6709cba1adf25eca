"""The write path: the two-slot, generation-checked commit, the sweep of dead keypoints, deletes.

Consistency without transactions.  Each image has two keypoint *slots*; keypoint ``j`` of slot
``s`` has ``_id`` ``<key>.<s>.<j>`` (:func:`~delf_es.index.es.codec.keypoint_id`).  A write:

1. writes the new keypoints, with a fresh random ``generation``, into the slot the live version
   does not use (and deletes that slot's surplus keypoints from an older version);
2. only if every keypoint was accepted, writes the image document naming the new generation and
   slot: the commit point;
3. deletes the previous version's keypoints (best effort: a leftover is never counted, since a
   keypoint hit counts only if its ``generation`` equals its image document's, and it is deleted
   by the next write of that image, which knows its count), then sweeps anything else not of
   the new generation (left by a writer that died).

An index created without keypoint vectors (``Indices.keypoint_vectors`` False) writes only step 2:
its keypoints index stays empty, so there is nothing to write, delete or sweep there.

So a search sees a whole version of each image or nothing of a version: a crash or a rejected
keypoint leaves the previous version intact and searchable, never half an image.  A delete
removes the keypoints, then the image document; interrupted, the image stays partly searchable
until the delete is retried (deletes are idempotent).  This Elasticsearch build has no painless,
``_reindex`` or ``_delete_by_query``: hence the deterministic keypoint ids.
"""

from __future__ import annotations

import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from delf_es.errors import ItemFailure
from delf_es.index.base import BulkReport, ImageRecord
from delf_es.index.codes import int8_codes
from delf_es.index.es.codec import byte_vector, document_id, image_document, keypoint_id
from delf_es.index.es.templates import Aliases, Indices, index_names
from delf_es.index.es.transport import Transport
from delf_es.index.records import record_problem

logger = logging.getLogger(__name__)

#: Images per write round (one mget, then keypoints, image documents, old keypoints).
IMAGES_PER_ROUND = 10
#: Elasticsearch's cap on a search's ``size`` (the sweep's).
MAX_RESULT_WINDOW = 10_000
#: What a write needs to know of the live version of an image.
VERSION_FIELDS = ["generation", "slot", "num_keypoints", "other_slot_keypoints"]


@dataclass(frozen=True)
class Version:
    """The live version of an image, from its image document."""

    generation: int
    slot: int
    num_keypoints: int
    other_slot_keypoints: int


@dataclass
class _Write:
    """One image being written (see the module docstring for the steps)."""

    position: int
    record: ImageRecord
    generation: int
    slot: int
    surplus_in_slot: int  # keypoints of an older version that may remain in ``slot``
    previous: Version | None
    error: str | None = None


class Writer:
    """Upserts and deletes on the indices behind ``aliases`` (records of another ``model_id``
    than the backend's are refused; None = the index's, or the first record's).  Indices it
    creates index keypoint vectors when ``keypoint_vectors`` is True; existing ones keep theirs.

    ``writers`` rounds of one upsert run at once (threads; 1 = one after the other): rounds hold
    distinct images, so their commits are independent.  A bulk load (``bulk_load.BulkLoad``) raises it."""

    def __init__(self, transport: Transport, aliases: Aliases, model_id: str | None,
                 keypoint_vectors: bool = True) -> None:
        self.transport = transport
        self.aliases = aliases
        self.model_id = model_id
        self.keypoint_vectors = keypoint_vectors
        self.writers = 1
        self.bulk_loading = False

    # ------------------------------------------------------------------ upsert

    def refusal(self, record: ImageRecord, indices: Indices) -> str | None:
        """Why ``record`` cannot go into ``indices``, or None (the shared record rules)."""
        if self.model_id is not None:
            problem = record_problem(record, model_id=self.model_id, local_dims=None, global_dims=None,
                                     index_name="this backend")
            if problem:
                return problem
        return record_problem(record, model_id=indices.model_id, local_dims=indices.local_dims,
                              global_dims=indices.global_dims, index_name=f"index {indices.images}")

    def _indices_for(self, records: list[ImageRecord]) -> Indices:
        """The indices to write to, created from the first record of the right model if missing."""
        indices = self.aliases.load()  # re-read on every write: the aliases may have been swapped
        if indices is not None:
            return indices
        valid = [r for r in records if record_problem(r, model_id=None, local_dims=None, global_dims=None) is None]
        wanted = self.model_id or (valid[0].features.model_id if valid else "")
        first = next((r.features for r in valid if r.features.model_id == wanted), None)
        if first is None:  # every record is invalid or of another model: nothing will be written
            images, keypoints = index_names(self.aliases.images, wanted or "none")
            return Indices(images, keypoints, wanted, -1, None, False)
        global_sizes = (len(r.features.global_desc) for r in valid if r.features.model_id == wanted)
        global_dims = next((size for size in global_sizes if size), None)
        return self.aliases.create(wanted, first.descriptor_dim, global_dims, self.keypoint_vectors)

    def upsert(self, records: Iterable[ImageRecord]) -> BulkReport:
        """Write images, each replacing any image of the same id (all or nothing per image, as
        searches see it).  An id given twice: the last record wins.  Raises IndexUnavailable when
        the server cannot be reached or still answers 429 after the retries."""
        records = list(records)
        if not records:
            return BulkReport()
        indices = self._indices_for(records)
        outcome: dict[int, str | None] = {}  # position -> None (written) or error
        last: dict[str, int] = {}
        for position, record in enumerate(records):
            refusal = self.refusal(record, indices)
            if refusal is not None:
                outcome[position] = refusal
            else:
                last[record.image_id] = position
        chosen = sorted(last.values())
        rounds = [[(p, records[p]) for p in chosen[start : start + IMAGES_PER_ROUND]]
                  for start in range(0, len(chosen), IMAGES_PER_ROUND)]

        def write(items: list[tuple[int, ImageRecord]]) -> list[_Write]:
            return self._write_round(items, indices.keypoint_vectors)

        if self.writers > 1 and len(rounds) > 1:
            with ThreadPoolExecutor(min(self.writers, len(rounds)), thread_name_prefix="delf-es-writer") as pool:
                done = list(pool.map(write, rounds))  # the first round's error is raised, after all ran
        else:
            done = [write(items) for items in rounds]
        for writes in done:
            for one in writes:
                outcome[one.position] = one.error
        for position, record in enumerate(records):  # earlier copies of an id share the last one's fate
            if position not in outcome:
                outcome[position] = outcome[last[record.image_id]]
        ids = [str(getattr(r, "image_id", r)) for r in records]
        return BulkReport(
            succeeded=[ids[p] for p in sorted(outcome) if outcome[p] is None],
            failed=[ItemFailure(ids[p], str(outcome[p])) for p in sorted(outcome) if outcome[p] is not None],
        )

    def _keypoint_actions(self, write: _Write) -> Iterator[dict[str, Any]]:
        """Index the new keypoints into ``write.slot``; delete what an older version left there."""
        record = write.record
        metadata = dict(record.metadata)
        n = record.features.num_keypoints
        for j, row in enumerate(int8_codes(record.features.descriptors)):
            yield {
                "_op_type": "index",
                "_index": self.aliases.keypoints,
                "_id": keypoint_id(record.image_id, write.slot, j),
                "_source": {"image_id": record.image_id, "keypoint": j, "generation": write.generation,
                            "metadata": metadata, "vector": byte_vector(row)},
            }
        for j in range(n, write.surplus_in_slot):
            yield {"_op_type": "delete", "_index": self.aliases.keypoints,
                   "_id": keypoint_id(record.image_id, write.slot, j)}

    @property
    def _thumbnails(self) -> bool:
        indices = self.aliases.current()
        return indices is not None and indices.thumbnails

    def _write_round(self, items: list[tuple[int, ImageRecord]], keypoint_vectors: bool = True) -> list[_Write]:
        """Write a few images: new keypoints, then image documents, then old keypoints (only the
        image documents without ``keypoint_vectors``)."""
        live = self.versions([record.image_id for _, record in items])
        writes = []
        for position, record in items:
            previous = live.get(record.image_id)
            writes.append(_Write(
                position=position,
                record=record,
                generation=secrets.randbits(31),
                slot=1 - previous.slot if previous else 0,
                surplus_in_slot=previous.other_slot_keypoints if previous else 0,
                previous=previous,
            ))
        # 1. keypoints into the free slot
        by_id: dict[str, _Write] = {}
        actions: list[dict[str, Any]] = []
        for write in writes if keypoint_vectors else []:
            for action in self._keypoint_actions(write):
                by_id[action["_id"]] = write
                actions.append(action)
        for action, result, ok in self.transport.bulk("upsert (keypoints)", actions):
            write = by_id[action["_id"]]
            if not ok and action["_op_type"] == "index" and write.error is None:
                write.error = f"keypoint {action['_source']['keypoint']}: {result}"
        # 2. image documents: the commit point
        complete = [write for write in writes if write.error is None]
        documents = [
            {"_op_type": "index", "_index": self.aliases.images, "_id": document_id(w.record.image_id),
             "_source": image_document(w.record, w.generation, w.slot, w.previous.num_keypoints if w.previous else 0,
                                       thumbnails=self._thumbnails)}
            for w in complete
        ]
        by_doc = {document_id(w.record.image_id): w for w in complete}
        for action, result, ok in self.transport.bulk("upsert (images)", documents):
            if not ok:
                by_doc[action["_id"]].error = str(result)
        # 3. the previous version's keypoints, now dead (best effort)
        dead = [
            {"_op_type": "delete", "_index": self.aliases.keypoints,
             "_id": keypoint_id(w.record.image_id, w.previous.slot, j)}
            for w in complete
            if w.error is None and w.previous is not None and keypoint_vectors
            for j in range(w.previous.num_keypoints)
        ]
        leftovers = sum(not ok for _, _, ok in self.transport.bulk("upsert (old keypoints)", dead))
        # 4. anything else not of the new generations (left by a writer that died), as of the last refresh
        committed = {w.record.image_id: w.generation for w in complete if w.error is None and keypoint_vectors}
        leftovers += self.sweep(committed, {action["_id"] for action in dead})
        if leftovers:
            logger.warning("%d dead keypoints could not be deleted; the next write of their images will", leftovers)
        return writes

    def sweep(self, keep: Mapping[str, int | None], skip: set[str]) -> int:
        """Delete the keypoint documents of images ``keep`` whose generation is not the one given
        (None: every generation), except ids in ``skip``; returns how many could not be deleted.
        Sees the index as of its last refresh: later strays wait for the next write."""
        if not keep:
            return 0
        clauses = [
            {"bool": {"filter": [{"term": {"image_id": image_id}}],
                      "must_not": [] if generation is None else [{"term": {"generation": generation}}]}}
            for image_id, generation in keep.items()
        ]
        body = {"query": {"bool": {"should": clauses, "minimum_should_match": 1}}, "size": MAX_RESULT_WINDOW,
                "_source": False, "seq_no_primary_term": True}
        hits_path = "responses.hits.hits."
        (response,) = self.transport.msearch(
            self.aliases.keypoints, [body], [hits_path + "_id", hits_path + "_seq_no", hits_path + "_primary_term"]
        )
        # A hit may be stale: its id may since have been rewritten by the new version (slots reuse
        # ids), so each delete only applies to the document the search saw (409 otherwise: kept).
        actions = [
            {"_op_type": "delete", "_index": self.aliases.keypoints, "_id": hit["_id"],
             "if_seq_no": hit["_seq_no"], "if_primary_term": hit["_primary_term"]}
            for hit in response.get("hits", {}).get("hits", [])
            if hit["_id"] not in skip
        ]
        return sum(not ok for _, _, ok in self.transport.bulk("sweep", actions))

    def versions(self, image_ids: list[str]) -> dict[str, Version]:
        """The live version of each indexed image among ``image_ids``."""
        ids = [document_id(image_id) for image_id in image_ids]
        return {
            doc["_source"]["image_id"]: Version(
                generation=int(doc["_source"].get("generation", 0)),
                slot=int(doc["_source"].get("slot", 0)),
                num_keypoints=int(doc["_source"].get("num_keypoints", 0)),
                other_slot_keypoints=int(doc["_source"].get("other_slot_keypoints") or 0),
            )
            for doc in self.transport.mget(self.aliases.images, ids, ["image_id", *VERSION_FIELDS])
        }

    # ------------------------------------------------------------------ delete

    def delete(self, image_ids: Iterable[str]) -> BulkReport:
        """Remove images (keypoints first, then the image document); an unknown id is a failed item."""
        ids = [str(image_id) for image_id in image_ids]
        if not ids:
            return BulkReport()
        indices = self.aliases.current()
        if indices is None:
            return BulkReport(failed=[ItemFailure(image_id, "not found") for image_id in ids])
        outcome: dict[int, str | None] = {}
        live = self.versions(list(dict.fromkeys(ids)))
        seen: set[str] = set()
        targets: list[int] = []
        for position, image_id in enumerate(ids):
            if image_id not in live or image_id in seen:
                outcome[position] = "not found"
            else:
                seen.add(image_id)
                targets.append(position)
        actions, owner = [], {}
        for position in targets if indices.keypoint_vectors else []:
            version = live[ids[position]]
            for slot, count in ((version.slot, version.num_keypoints), (1 - version.slot, version.other_slot_keypoints)):
                for j in range(count):
                    key = keypoint_id(ids[position], slot, j)
                    owner[key] = position
                    actions.append({"_op_type": "delete", "_index": self.aliases.keypoints, "_id": key})
        for action, result, ok in self.transport.bulk("delete (keypoints)", actions):
            position = owner[action["_id"]]
            if not ok and outcome.get(position) is None:
                outcome[position] = str(result)
        swept = {ids[p]: None for p in targets if p not in outcome and indices.keypoint_vectors}
        if self.sweep(swept, set(owner)):
            logger.warning("some stray keypoints of deleted images could not be deleted")
        documents = [
            {"_op_type": "delete", "_index": self.aliases.images, "_id": document_id(ids[p])}
            for p in targets if p not in outcome
        ]
        by_doc = {document_id(ids[p]): p for p in targets}
        for action, result, ok in self.transport.bulk("delete (images)", documents):
            outcome[by_doc[action["_id"]]] = None if ok else str(result)
        return BulkReport(
            succeeded=[ids[p] for p in sorted(outcome) if outcome[p] is None],
            failed=[ItemFailure(ids[p], str(outcome[p])) for p in sorted(outcome) if outcome[p] is not None],
        )
