"""Index templates and aliases: which concrete indices hold an image index, and creating them.

The concrete indices are ``<alias>-v1-<h>`` and ``<alias>-keypoints-v1-<h>`` (``h`` = 12 hex of
sha1(model_id)), created on the first write (dims from the first record) from the versioned
templates in ``mappings/`` and aliased in one atomic ``_aliases`` call; everything goes through
the aliases, so a reindex can fill new indices and swap both aliases at once.  Model and dims live
in the mappings' ``_meta`` (this Elasticsearch build has neither ``constant_keyword`` nor ingest
processors to enforce them server-side: writers check records against them client-side).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from delf_es.errors import RequestRejected
from delf_es.index.es.transport import Transport

logger = logging.getLogger(__name__)


def _mappings_dir() -> Path:
    """The top-level ``mappings/``: shipped as ``delf_es/mappings/`` in a wheel (pyproject.toml),
    read from the source tree in a checkout or an editable install."""
    packaged = Path(__file__).resolve().parents[2] / "mappings"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[3] / "mappings"


#: Versioned index templates: ``images-<SCHEMA>.json`` and ``keypoints-<SCHEMA>.json``.
MAPPINGS_DIR = _mappings_dir()
SCHEMA = "v1"
#: Suffix of the keypoints alias and index names.
KEYPOINTS_SUFFIX = "-keypoints"


def render_template(
    name: str = f"images-{SCHEMA}.json",
    *,
    model_id: str,
    local_dims: int,
    global_dims: int | None = None,
    keypoint_vectors: bool = True,
    directory: Path = MAPPINGS_DIR,
) -> dict[str, Any]:
    """The index body (``settings``, ``mappings``) of template ``name`` with its parameters filled.

    A string value that is exactly ``{{param}}`` becomes the parameter's value (numbers stay
    numbers); a ``dims`` whose value is None is dropped (Elasticsearch then takes the dimension
    from the first vector); top-level keys starting with ``_`` (comments) are dropped.
    """
    params = {"model_id": model_id, "local_dims": local_dims, "global_dims": global_dims,
              "keypoint_vectors": keypoint_vectors}
    template = json.loads((directory / name).read_text())

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                value = fill(value)
                if key == "dims" and value is None:
                    continue
                out[key] = value
            return out
        if isinstance(node, list):
            return [fill(item) for item in node]
        if isinstance(node, str) and node.startswith("{{") and node.endswith("}}"):
            key = node[2:-2].strip()
            if key not in params:
                raise KeyError(f"template {name}: unknown parameter {node}")
            return params[key]
        return node

    return {key: fill(value) for key, value in template.items() if not key.startswith("_")}


def with_layout(index_settings: Mapping[str, Any], shards: int, replicas: int) -> dict[str, Any]:
    """``index_settings`` with ``number_of_shards`` / ``number_of_replicas`` set (whether the
    template spells them flat or under ``index``)."""
    out = {k: v for k, v in index_settings.items() if k not in ("index.number_of_shards", "index.number_of_replicas")}
    if isinstance(out.get("index"), Mapping):
        out["index"] = {k: v for k, v in out["index"].items() if k not in ("number_of_shards", "number_of_replicas")}
    out["number_of_shards"] = int(shards)
    out["number_of_replicas"] = int(replicas)
    return out


def index_names(alias: str, model_id: str) -> tuple[str, str]:
    """The concrete, versioned (images, keypoints) indices behind ``alias`` for ``model_id``."""
    digest = hashlib.sha1(model_id.encode()).hexdigest()[:12]
    return f"{alias}-{SCHEMA}-{digest}", f"{alias}{KEYPOINTS_SUFFIX}-{SCHEMA}-{digest}"


def is_keypoints_index(index: str) -> bool:
    return f"{KEYPOINTS_SUFFIX}-{SCHEMA}-" in index


def paired_images_index(keypoints_index: str, default: str) -> str:
    """The concrete images index created with ``keypoints_index`` (``default`` if unknown)."""
    head, sep, tail = keypoints_index.rpartition(f"{KEYPOINTS_SUFFIX}-{SCHEMA}-")
    return f"{head}-{SCHEMA}-{tail}" if sep and head else default


@dataclass(frozen=True)
class Indices:
    """The concrete indices behind the aliases, as recorded in their mappings' ``_meta``.

    Attributes:
        local_dims: D of the keypoint vectors (-1: nothing will be written, see ``Aliases.for_write``).
        global_dims: G, None until a record with a global descriptor was written.
        quantised_global: the global vectors are int8-quantised in the HNSW graph (rescore needed).
        keypoint_vectors: the keypoints index holds a vector per keypoint (the keypoint kNN works);
            False: it stays empty and only the image documents are written (``_meta.keypoint_vectors``,
            absent = True: indices created before the setting have them).
    """

    images: str
    keypoints: str
    model_id: str
    local_dims: int
    global_dims: int | None
    quantised_global: bool
    thumbnails: bool = False  # the mapping has the thumbnail fields (indexes since the HTTP API)
    keypoint_vectors: bool = True


class Aliases:
    """The image alias and its keypoints alias (``<alias>-keypoints``), read and created through
    ``transport``; remembers the indices behind them until :meth:`load` reads them again.

    ``shards`` and ``replicas`` (settings ``es_number_of_shards`` / ``es_number_of_replicas``)
    replace the templates' 1 / 0 when :meth:`create` creates the indices."""

    def __init__(self, transport: Transport, alias: str, shards: int = 1, replicas: int = 0) -> None:
        self.transport = transport
        self.images = alias
        self.keypoints = alias + KEYPOINTS_SUFFIX
        self.shards = shards
        self.replicas = replicas
        self._indices: Indices | None = None

    def load(self) -> Indices | None:
        """Read which indices the aliases point at, and their ``_meta``; None if not both exist."""
        found = self.transport.call(
            "reading the index",
            self.transport.client.indices.get,
            index=f"{self.images},{self.keypoints}",
            features="aliases,mappings",
            ignore_unavailable=True,
            allow_no_indices=True,
        )
        images = self._behind(found, self.images)
        keypoints = self._behind(found, self.keypoints)
        if images is None or keypoints is None:
            self._indices = None
            return None
        mapping = found[images]["mappings"]
        meta = mapping.get("_meta") or {}
        if not meta.get("model_id") or not meta.get("local_dims"):
            raise RequestRejected(
                f"{images} (behind {self.images}) at {self.transport.url} is not a delf-es image index")
        global_type = mapping.get("properties", {}).get("global_vector", {})
        global_dims = meta.get("global_dims") or global_type.get("dims")
        self._indices = Indices(
            images=images,
            keypoints=keypoints,
            model_id=str(meta["model_id"]),
            local_dims=int(meta["local_dims"]),
            global_dims=int(global_dims) if global_dims else None,
            quantised_global=global_type.get("index_options", {}).get("type", "hnsw") != "hnsw",
            thumbnails="thumbnail" in mapping.get("properties", {}),
            keypoint_vectors=meta.get("keypoint_vectors", True) is not False,
        )
        return self._indices

    def current(self) -> Indices | None:
        """The indices as last read (read now if never)."""
        return self._indices if self._indices is not None else self.load()

    def _behind(self, found: Mapping[str, Any], alias: str) -> str | None:
        """The (write) index that ``alias`` points at, among ``found``."""
        names = [name for name, body in found.items() if alias in body.get("aliases", {}) or name == alias]
        if len(names) <= 1:
            return names[0] if names else None
        for name in names:
            if found[name]["aliases"][alias].get("is_write_index"):
                return name
        raise RequestRejected(
            f"alias {alias} at {self.transport.url} points at {sorted(names)} and none is its write index")

    def create(self, model_id: str, local_dims: int, global_dims: int | None, keypoint_vectors: bool = True) -> Indices:
        """Create both versioned indices and point the aliases at them in one atomic call
        (idempotent; a concurrent creator of the same model ends with the same indices).  The
        keypoints index is created even without ``keypoint_vectors`` (then it stays empty), so
        both aliases exist for every index and a reindex can swap them alike."""
        images, keypoints = index_names(self.images, model_id)
        client = self.transport.client
        for name, template in ((keypoints, f"keypoints-{SCHEMA}.json"), (images, f"images-{SCHEMA}.json")):
            body = render_template(template, model_id=model_id, local_dims=local_dims, global_dims=global_dims,
                                   keypoint_vectors=keypoint_vectors)
            body["settings"] = with_layout(body.get("settings", {}), self.shards, self.replicas)
            try:
                self.transport.call(f"creating index {name}", client.indices.create, index=name, **body)
                logger.info("created index %s (model %s)", name, model_id)
            except RequestRejected as exc:
                if "resource_already_exists_exception" not in exc.message:
                    raise
        try:
            self.transport.call(
                "pointing the aliases at the new indices",
                client.indices.update_aliases,
                actions=[
                    {"add": {"index": images, "alias": self.images, "is_write_index": True}},
                    {"add": {"index": keypoints, "alias": self.keypoints, "is_write_index": True}},
                ],
            )
        except RequestRejected:
            # The aliases already point elsewhere (another creator, another model): use that.
            if self.load() is None:
                raise
        indices = self.load()
        if indices is None:
            raise RequestRejected(f"indices {images}, {keypoints} were created but the aliases do not point at them")
        return indices
