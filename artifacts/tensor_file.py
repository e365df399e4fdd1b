"""Writing a safetensors file: the one way every tensor file mtreg writes reaches the disk.

The tensors are serialised in memory (``safetensors.torch.save``) and the bytes written by
:func:`~mtreg.core.disk.write_atomically`, so a full disk is an ``OSError`` that
:func:`~mtreg.core.disk.disk_errors` turns into one line: ``safetensors.torch.save_file``
reported nothing writing to ``/dev/full``, and on a full file system raised its own
``SafetensorError`` (a traceback from ``export --format hf``). Reading stays with each
format's module (``checkpoint``, ``branch_file``, the caches).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save

from mtreg.core.disk import write_atomically


def write_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (and the string ``metadata``) to ``path`` as a safetensors file,
    atomically; the bytes equal ``save_file``'s for the same arguments.

    Returns:
        ``path``.

    Raises:
        OSError: the disk is full, read-only or the path cannot be written; nothing is left
            at ``path`` that was not there before.
    """
    data = save(dict(tensors), metadata=dict(metadata) if metadata is not None else None)
    write_atomically(path, data)
    return Path(path)
