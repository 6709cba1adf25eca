"""Read a file a user named without ever blocking: only regular files, never more than a cap.

A path can name a FIFO (``mkfifo p.jpg``), a character device (``/dev/zero``, a terminal), a
socket or a directory.  ``open(path).read()`` on the first two blocks forever or never ends,
so every path delf-es reads on a user's behalf (images, ``@list.txt`` files, JSON configs)
goes through :func:`read_regular_file`:

1. ``os.open`` with ``O_NONBLOCK`` (opening a FIFO for reading with it returns at once instead
   of waiting for a writer) and ``O_NOCTTY`` (a terminal never becomes our controlling tty);
2. ``fstat`` on the opened descriptor, not ``stat`` on the name, so a file swapped between the
   check and the read cannot slip through: anything but a regular file is refused;
3. read at most ``max_bytes + 1`` bytes: a longer file is refused rather than truncated.
"""

from __future__ import annotations

import errno
import os
import stat

from delf_es.errors import UnreadableFile

__all__ = ["read_regular_file", "file_kind"]

_READ_CHUNK = 1 << 20

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` describes, for messages: "a regular file", "a named pipe (FIFO)"..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The whole content of the regular file ``path``, at most ``max_bytes`` bytes.

    Raises:
        UnreadableFile: the path does not exist, cannot be opened (permissions, a name too
            long, a symlink loop), is not a regular file (directory, FIFO, device, socket), or
            holds more than ``max_bytes`` bytes.  Never blocks on a FIFO or a device.
    """
    name = os.fspath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags)
    except FileNotFoundError:
        raise UnreadableFile("file not found", name) from None
    except IsADirectoryError:
        raise UnreadableFile("is a directory, not a file", name) from None
    except OSError as error:
        reason = "file name too long" if error.errno == errno.ENAMETOOLONG else (error.strerror or str(error))
        raise UnreadableFile(f"cannot open: {reason}", name) from None
    except ValueError as error:  # an embedded NUL byte in the name
        raise UnreadableFile(f"invalid file name: {error}", name) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(f"is {file_kind(info.st_mode)}, not a regular file", name)
        if info.st_size > max_bytes:
            raise UnreadableFile(f"file is {info.st_size} bytes, more than the cap of {max_bytes}", name)
        chunks: list[bytes] = []
        total = 0
        while True:  # st_size can lie (a file growing, /proc): bounded by the cap anyway
            chunk = os.read(fd, min(_READ_CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise UnreadableFile(f"file holds more than the cap of {max_bytes} bytes", name)
        return b"".join(chunks)
    except OSError as error:  # EIO and friends while reading
        raise UnreadableFile(f"cannot read: {error.strerror or error}", name) from None
    finally:
        os.close(fd)
