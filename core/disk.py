"""Disk faults a user can cause (a full disk, a read-only file system, no permission, a file
where a folder should be), turned into one-line errors that say what to do; and the one way
to replace a file atomically."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mtreg.errors import StorageError

_HINTS = {
    errno.ENOSPC: "free space on that disk and retry",
    errno.EDQUOT: "free space within your disk quota and retry",
    errno.EROFS: "use a writable {place} (commands that only read work as they are)",
    errno.EACCES: "check the permissions, or use another {place}",
    errno.EPERM: "check the permissions, or use another {place}",
    errno.ENOTDIR: "a part of that path is a regular file: use another {place}",
    # mkdir of a folder where a regular file already is.
    errno.EEXIST: "a regular file is in the way: use another {place}",
}


@contextmanager
def disk_errors(where: str | Path, place: str = "--home or --out") -> Iterator[None]:
    """Run the block, turning a disk fault in it into a :class:`StorageError`.

    ``where`` names the folder being written, for a fault that names no file; ``place``
    names the option that moves it, in the hint. Other ``OSError`` s (a missing source
    file, for one) pass through unchanged.

    Raises:
        StorageError: the disk is full or read-only, or the path cannot be written or created.
    """
    try:
        yield
    except OSError as exc:
        hint = _HINTS.get(exc.errno)
        if hint is None:
            raise
        path = exc.filename or where
        raise StorageError(
            f"cannot write {path}: {exc.strerror}: {hint.format(place=place)}"
        ) from None


def write_atomically(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, then rename it into place,
    creating the folder if needed: a reader sees the old file or the whole new one.

    The bytes are written by Python, whose writes raise ``OSError`` on a full disk; native
    writers may not (safetensors' ``save_file`` reported nothing writing to ``/dev/full``, and
    raises its own ``SafetensorError`` on a full file system).

    Raises:
        OSError: the folder or file cannot be written (the temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.incoming-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
