"""Turn command-line inputs (files, folders, ``@list.txt``, URLs) into a list of sources.

Nothing here opens an image.  Folders are walked with :func:`os.walk` (symlinked folders are
not followed, so a symlink loop cannot recurse forever; unreadable folders are reported, not
fatal); list files are read with :func:`~delf_es.safe_files.read_regular_file`, so
``@fifo`` cannot block.  Special files found in a folder (a FIFO named ``p.jpg``) are kept,
so the run reports them as failed instead of silently dropping them; they are never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

from delf_es.errors import UnreadableFile
from delf_es.safe_files import read_regular_file

__all__ = ["IMAGE_SUFFIXES", "MAX_LIST_BYTES", "Inputs", "expand_inputs"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
#: A list file larger than this is refused (about a million paths).
MAX_LIST_BYTES = 256 * 1024 * 1024


@dataclass
class Inputs:
    """Sources in order (duplicates as given), and folders that could not be walked."""

    sources: list[str] = field(default_factory=list)
    unreadable: list[UnreadableFile] = field(default_factory=list)


def expand_inputs(items: Iterable[str]) -> Inputs:
    """Files and URLs as given; folders expanded to the image files below them (sorted);
    ``@list.txt`` read one source per line (blank lines skipped, no recursion into folders).

    Raises:
        UnreadableFile: a ``@list`` file is missing, not a regular file, too large or not
            UTF-8.  Raised before any work starts.
    """
    out = Inputs()
    for item in items:
        if item.startswith("@"):
            out.sources += _read_list(item[1:])
        elif os.path.isdir(item):
            out.sources += _walk(item, out.unreadable)
        else:
            out.sources.append(item)
    return out


def _read_list(path: str) -> list[str]:
    data = read_regular_file(path, MAX_LIST_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UnreadableFile(f"list file is not UTF-8 text: {error}", path) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _walk(folder: str, unreadable: list[UnreadableFile]) -> list[str]:
    found: list[str] = []

    def report(error: OSError) -> None:
        unreadable.append(UnreadableFile(f"cannot list folder: {error.strerror or error}", error.filename or folder))

    for root, dirs, files in os.walk(folder, onerror=report, followlinks=False):
        dirs.sort()
        for name in files:  # os.walk lists FIFOs, devices and sockets among files
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append(os.path.join(root, name))
    return sorted(found)
