"""Where ``delf-es extract`` writes each image's features, without ever overwriting another's.

``a/img.jpg`` and ``b/img.jpg`` both have the stem ``img``; writing ``<stem>.npz`` for each
would silently keep one.  :func:`feature_file_names` gives every input of a run its own file:
``<stem>.npz`` when no other input of the run shares the stem (compared case-folded, for
case-insensitive file systems), else ``<stem>-<10 hex of the canonical path>.npz`` for each of
the colliding inputs (the same name whatever order the inputs come in).  Two spellings of one
file are one input.  :func:`write_features` then refuses (:class:`OutputConflict`) to replace
a file that holds another image's features or is not a feature file at all, and writes through
a temporary file and a rename, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from pathlib import Path

from delf_es.errors import FeatureShapeError, OutputConflict
from delf_es.types import Features

__all__ = ["feature_file_names", "prepare_output_folder", "write_features"]


def feature_file_names(sources: list[str]) -> dict[str, str]:
    """``{canonical path: file name}`` for the run's inputs (see the module docstring)."""
    canonical = list(dict.fromkeys(os.path.realpath(s) for s in sources))
    stems = Counter(Path(c).stem.casefold() for c in canonical)
    names: dict[str, str] = {}
    for path in canonical:
        stem = Path(path).stem
        if stems[stem.casefold()] == 1:
            names[path] = f"{stem}.npz"
        else:
            names[path] = f"{stem}-{hashlib.blake2b(path.encode(), digest_size=5).hexdigest()}.npz"
    return names


def prepare_output_folder(folder: Path) -> Path:
    """Create ``folder`` (and parents) and check it can be written, before any work starts.

    Raises:
        OutputConflict: ``folder`` (or a parent) is a file, or it cannot be created or written.
    """
    if folder.exists() and not folder.is_dir():
        raise OutputConflict("exists and is not a folder", str(folder))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputConflict(f"cannot create the output folder: {error.strerror or error}", str(folder)) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputConflict("the output folder is not writable", str(folder))
    return folder


def write_features(features: Features, path: Path) -> Path:
    """Write ``features`` to ``path`` atomically; an existing file is replaced only when it
    holds features of the same ``image_id`` (a re-run).

    Raises:
        OutputConflict: ``path`` holds another image's features, is not a feature file, or
            cannot be written.
    """
    if path.exists() or path.is_symlink():
        try:
            previous = Features.load(path).image_id
        except (FeatureShapeError, OSError, KeyError, ValueError):
            raise OutputConflict("exists and is not a delf-es feature file; not overwritten", str(path)) from None
        if previous != features.image_id:
            raise OutputConflict(f"already holds the features of {previous!r}; not overwritten", str(path))
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(features.to_bytes())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
    except OSError as error:
        raise OutputConflict(f"cannot write: {error.strerror or error}", str(path)) from None
    return path
