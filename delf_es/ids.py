"""Image ids for files: one id per file, however its path is spelled.

``dir/a.jpg``, ``./dir/a.jpg``, ``dir/../dir/a.jpg``, the absolute path and a symlink to it
all name one file, so they must give one id, or the same image is indexed several times.
With ``id_from="path"`` (the default) the id is the file's canonical path:
``os.path.realpath`` (absolute, ``.``/``..`` and repeated separators removed, symlinks
resolved).  With ``id_from="content"`` it is ``sha256:<hex>`` of the file's bytes, so a
copy of the same file under another name, or a file that moved, is still one image.

URLs are ids as given, and a name the caller chose (``add_image(name, img=...)``) is kept.
"""

from __future__ import annotations

import hashlib
import os

from delf_es.safe_files import read_regular_file

__all__ = ["content_id", "file_image_id", "is_url"]


def is_url(source: str) -> bool:
    """True for ``scheme://...`` sources (fetched, never opened as files)."""
    return "://" in source


def content_id(data: bytes) -> str:
    """``sha256:<64 hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_image_id(path: str, id_from: str, max_bytes: int) -> str:
    """The id of the file ``path`` (see the module docstring); URLs are returned unchanged.

    Raises:
        UnreadableFile: ``id_from="content"`` and the file cannot be read (see
            :func:`~delf_es.safe_files.read_regular_file`).
    """
    if is_url(path):
        return path
    if id_from == "content":
        return content_id(read_regular_file(path, max_bytes))
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):  # an embedded NUL: the read that follows reports it
        return os.path.abspath(path)
