"""A trunk's tokenizer folder, read offline with transformers' fast tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtreg.errors import MtregError


def load_tokenizer(path: Path) -> Any:
    """Return the fast tokenizer stored in folder ``path`` (never remote code, never a hub).

    Raises:
        MtregError: the folder holds no tokenizer transformers can read offline.
    """
    # transformers takes seconds to import: only when a tokenizer is actually loaded.
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as exc:
        raise MtregError(f"cannot load the tokenizer in {path}: {exc}") from None
