"""On-disk cache of frozen activations: the trunk's hidden state at depth k per example.

The layers below a fork never change during training, so each example's hidden state at
depth k is computed once and reused across epochs, learning rates and branch depths that
share the fork. Entries are safetensors files (never pickle) under
``MTREG_HOME/cache/activations``, keyed by everything that determines their content, and the
cache is bounded: the least recently used entries are evicted beyond ``max_bytes``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mtreg.artifacts.tensor_file import write_safetensors
from mtreg.core.disk import disk_errors
from mtreg.core.env import cache_max_bytes

DEFAULT_MAX_BYTES = 4 << 30


def cache_key(**parts: Any) -> str:
    """Return a sha256 over the canonical JSON of everything an entry depends on."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ActivationCache:
    """Variable-length per-example tensors, stored packed: ``values`` [total, ...] plus
    ``lengths`` [n]; :meth:`get` returns them split back into a list."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        if max_bytes is None:
            max_bytes = cache_max_bytes()
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> list[torch.Tensor] | None:
        """Return the cached tensors for ``key``, or None (also for an unreadable entry)."""
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            data = load_file(path)
        except (SafetensorError, OSError, KeyError):
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # mark as recently used, for eviction
        self.hits += 1
        lengths = data["lengths"].tolist()
        if not lengths:
            return []
        return list(torch.split(data["values"], lengths))

    def put(self, key: str, tensors: Sequence[torch.Tensor]) -> None:
        """Store ``tensors`` under ``key`` atomically, then evict beyond the size bound.

        Raises:
            StorageError: the disk is full or read-only, or a file is in the cache's way.
        """
        values = torch.cat([t.contiguous() for t in tensors]) if tensors else torch.empty(0)
        lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
        with disk_errors(self.root):
            write_safetensors(self._path(key), {"values": values, "lengths": lengths})
        self._evict(keep=self._path(key))

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used entries until the total fits ``max_bytes``.

        ``keep`` (the entry just written) is never evicted: it is compared by path, not
        by position, because two entries written within the file system's timestamp
        resolution share an mtime.
        """
        entries = []
        for path in self.root.glob("*.safetensors"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted by a concurrent writer
                continue
            entries.append((stat.st_mtime_ns, path.name, stat.st_size, path))
        entries.sort()
        total = sum(size for _, _, size, _ in entries)
        for _, _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
