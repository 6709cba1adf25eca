"""What callers hand in, checked once for the SDK, the CLI and the workers' submitter: image ids,
metadata, search arguments, and the items of a bulk add.

* An image id is a ``str`` of 1..:data:`MAX_ID_BYTES` UTF-8 bytes (Elasticsearch's cap on
  document ids; the SDK and the workers apply the same rule, so an id accepted by one is accepted
  by the other), encodable (no lone surrogate).
* Metadata is a JSON object with non-empty string keys, nested at most :data:`MAX_DEPTH` deep
  (deeper documents overflow Python's and Elasticsearch's parsers: refused up front).
* An item of a bulk add is a path/URL, a ``(path, metadata)`` pair or a mapping with ``path``
  (and optional ``image_id``, ``img``, ``bytestream``, ``metadata``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from delf_es.errors import InvalidRequest

#: Elasticsearch's limit on document ids; longer names are refused rather than silently hashed.
MAX_ID_BYTES = 512
#: Deepest nesting of metadata and of a metadata filter (Elasticsearch's own default mapping
#: depth limit is 20; JSON parsers overflow in the thousands).
MAX_DEPTH = 20


def check_id(name: Any) -> str:
    """``name`` as an image id, or :class:`InvalidRequest` saying why not."""
    if isinstance(name, Path):
        name = str(name)
    if not isinstance(name, str):
        raise InvalidRequest(f"an image id is a string, got {type(name).__name__}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise InvalidRequest(f"image id {name!r} is not valid Unicode text ({error.reason})") from None
    if not 1 <= size <= MAX_ID_BYTES:
        raise InvalidRequest(f"image id must be 1..{MAX_ID_BYTES} bytes, got {size}")
    return name


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON-like value (a scalar is 0), counted without recursion and stopping
    once past ``limit``."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, Mapping):
            children = list(node.values())
        elif isinstance(node, (list, tuple)):
            children = list(node)
        else:
            continue
        deepest = max(deepest, level + 1)
        if deepest > limit:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def check_metadata(metadata: Any) -> dict[str, Any]:
    """A JSON copy of ``metadata`` (None -> {}), or :class:`InvalidRequest`."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and k for k in metadata):
        raise InvalidRequest("metadata must be a mapping with non-empty string keys")
    if depth(metadata) > MAX_DEPTH:
        raise InvalidRequest(f"metadata is nested more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise InvalidRequest(f"metadata must be JSON-serialisable: {error}") from error


def check_filter(pre_filter: Any) -> Mapping[str, Any] | None:
    """A metadata filter (an Elasticsearch query object) or None, or :class:`InvalidRequest`."""
    if pre_filter is None:
        return None
    if not isinstance(pre_filter, Mapping):
        raise InvalidRequest(f"pre_filter is an Elasticsearch query object (a mapping), got {type(pre_filter).__name__}")
    if depth(pre_filter) > MAX_DEPTH:
        raise InvalidRequest(f"pre_filter is nested more than {MAX_DEPTH} levels deep")
    return pre_filter


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """An int argument (``limit``, ``min_inliers``) >= ``minimum``; a string or bool is refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Item:
    """One entry of a bulk add or a submission.

    Attributes:
        path: file path or URL to read (or, for ``bytestream`` items without ``img``, bytes).
        image_id: the id to store it under (default: ``path``).
        invalid: why the entry cannot describe an image, or "" (reported per item, never raised).
    """

    path: Any
    image_id: str
    metadata: Mapping[str, Any] | None = None
    img: Any = None
    bytestream: bool = False
    invalid: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How reports name the item."""
        return self.image_id if isinstance(self.image_id, str) else "<bytes>"


def parse_item(entry: Any) -> Item:
    """An :class:`Item` from a path/URL, a ``(path, metadata)`` pair or a mapping with ``path``."""
    if isinstance(entry, (str, Path)):
        return Item(path=str(entry), image_id=str(entry))
    if isinstance(entry, tuple) and len(entry) == 2:
        return Item(path=str(entry[0]), image_id=str(entry[0]), metadata=entry[1])
    if isinstance(entry, Mapping) and "path" in entry:
        path = entry["path"]
        image_id = entry.get("image_id") or (str(path) if isinstance(path, (str, Path)) else "<bytes>")
        return Item(path=path, image_id=image_id, metadata=entry.get("metadata"), img=entry.get("img"),
                    bytestream=bool(entry.get("bytestream", False)))
    return Item(path=repr(entry)[:80], image_id=repr(entry)[:80],
                invalid="an item is a path, a (path, metadata) pair or a mapping with 'path'")

