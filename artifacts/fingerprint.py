"""Trunk fingerprints: content hashes that decide whether a branch fits a trunk.

A branch forking at depth k depends on the tokenizer, the architecture config, the
embeddings and layers 0..k-1 (docs/architecture.md, "Compatibility rule"). The trunk records
one hash per component; a branch records the prefix it was trained on; registration compares
them and names the first component that differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Keys of tokenizer JSON files that name where a file came from, not how it tokenises.
_TOKENIZER_NOISE = frozenset({"name_or_path", "tokenizer_file", "auto_map"})


def _framed(digest: Any, data: bytes) -> None:
    # Length-prefixing makes the hash unambiguous: ("ab", "c") never equals ("a", "bc").
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def tensor_group_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """Return the sha256 of a group of tensors: names in sorted order, dtype, shape, bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        _framed(digest, name.encode())
        _framed(digest, str(tensor.dtype).encode())
        _framed(digest, json.dumps(list(tensor.shape)).encode())
        _framed(digest, tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_hash(files: Mapping[str, Path]) -> str:
    """Return the sha256 of the tokenizer files (vocab, special tokens, normalisation).

    JSON files are hashed in canonical form without the keys that only say where a file
    came from, so re-saving a tokenizer elsewhere keeps its hash.
    """
    digest = hashlib.sha256()
    for name in sorted(files):
        data = Path(files[name]).read_bytes()
        if name.endswith(".json"):
            content = json.loads(data)
            if isinstance(content, dict):
                content = {k: v for k, v in content.items() if k not in _TOKENIZER_NOISE}
            data = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
        _framed(digest, name.encode())
        _framed(digest, data)
    return digest.hexdigest()


@dataclass(frozen=True)
class TrunkFingerprint:
    """Hashes of a trunk's tokenizer, architecture config, embeddings and each layer."""

    tokenizer: str
    config: str
    embeddings: str
    layers: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (:meth:`from_dict` reverses it)."""
        return {
            "tokenizer": self.tokenizer,
            "config": self.config,
            "embeddings": self.embeddings,
            "layers": list(self.layers),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrunkFingerprint:
        """Build a fingerprint from :meth:`to_dict` output."""
        return cls(data["tokenizer"], data["config"], data["embeddings"], tuple(data["layers"]))

    def prefix(self, depth: int) -> dict[str, Any]:
        """Return what a branch forking at ``depth`` depends on, for its weight file.

        Raises:
            ValueError: ``depth`` is negative or deeper than the trunk.
        """
        if not 0 <= depth <= len(self.layers):
            raise ValueError(f"depth {depth} outside 0..{len(self.layers)}")
        return {**self.to_dict(), "layers": list(self.layers[:depth]), "depth": depth}

    def first_mismatch(self, prefix: Mapping[str, Any]) -> str | None:
        """Compare a branch's recorded prefix with this trunk.

        Returns:
            None when the branch fits, else a phrase naming the first component that
            differs (tokenizer, config, embeddings, then layers in order).
        """
        layers = list(prefix.get("layers", []))
        depth = int(prefix.get("depth", len(layers)))
        if depth != len(layers):
            return f"its trunk record is inconsistent (depth {depth}, {len(layers)} layer hashes)"
        if depth > len(self.layers):
            return f"it forks at depth {depth} but the trunk has only {len(self.layers)} layers"
        if prefix.get("tokenizer") != self.tokenizer:
            return "the tokenizer differs"
        if prefix.get("config") != self.config:
            return "the architecture config differs"
        if prefix.get("embeddings") != self.embeddings:
            return "the embeddings differ"
        for index, (mine, theirs) in enumerate(zip(self.layers, layers, strict=False)):
            if mine != theirs:
                return f"trunk layer {index} differs (first differing layer below its fork)"
        return None
