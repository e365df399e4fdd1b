"""A content-addressed object store: ``objects/<sha256>`` files under ``MTREG_HOME``.

Registered weights, trunk components and tokenizer files are copied here, so moving,
editing or uninstalling their source never breaks a registered version. Objects are
written once (temporary file, fsync, rename) and made read-only; a bundle hard-links them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from mtreg.core import faults
from mtreg.errors import MtregError

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename inside it) to disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_object_id(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


class ObjectStore:
    """Files named by the sha256 of their bytes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        """Return where the object ``sha256`` lives (it may not exist).

        Raises:
            MtregError: if ``sha256`` is not 64 lower-case hex digits (no path tricks).
        """
        if not _is_object_id(sha256):
            raise MtregError(f"invalid object id {sha256!r}")
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        """Return True if the object is present."""
        return self.path(sha256).is_file()

    def existing(self, sha256: str) -> Path:
        """Return the path of object ``sha256``, which must be present.

        Raises:
            MtregError: the object is not in the store (files under MTREG_HOME were deleted,
                or the database belongs to another home).
        """
        path = self.path(sha256)
        if not path.is_file():
            raise MtregError(
                f"object {sha256[:12]} is missing from the store {self.root}: check that "
                "--home (MTREG_HOME) is the home of this database, or add the trunk or task "
                "version that owns it again"
            )
        return path

    def put(self, source: Path) -> tuple[str, bool]:
        """Copy ``source`` into the store.

        Returns:
            ``(sha256, created)``: ``created`` is False when the object was already there,
            so a caller that must undo its writes knows which objects are its own.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        # Hash while copying, so a file edited during the copy cannot be stored under a
        # name that does not match its content.
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            faults.point("objects.incoming")
            sha = digest.hexdigest()
            target = self.path(sha)
            if target.exists():
                tmp.unlink()
                return sha, False
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)
            fsync_dir(self.root)
            faults.point("objects.stored")
            return sha, True
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def list(self) -> list[str]:
        """Return the ids of the stored objects, sorted (temporary files excluded)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _is_object_id(p.name))

    def discard(self, sha256: str) -> None:
        """Delete an object (used to undo a failed registration and by gc)."""
        self.path(sha256).unlink(missing_ok=True)

    def link_or_copy(self, sha256: str, target: Path) -> None:
        """Place object ``sha256`` at ``target``: a hard link where possible, else a copy.

        Raises:
            MtregError: the object is not in the store.
        """
        source = self.existing(sha256)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)

    def clean_incoming(self) -> None:
        """Remove temporary files left by a writer that was killed mid-copy."""
        if self.root.is_dir():
            for leftover in self.root.glob(".incoming-*"):
                leftover.unlink(missing_ok=True)
