"""Adding a trunk: its name checked free, its checkpoint's components stored as objects."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtreg.artifacts.hub import is_hub_id
from mtreg.errors import AlreadyExists
from mtreg.registry.records import TrunkRecord

if TYPE_CHECKING:
    from mtreg.artifacts.checkpoint import Checkpoint, Tensors
    from mtreg.registry.store import Tx
    from mtreg.registry.writing import Write


def refuse_taken_trunk(tx: Tx, name: str) -> None:
    """Return if no trunk is called ``name``.

    Raises:
        AlreadyExists: the name is taken.
    """
    if tx.get_trunk(name) is not None:
        raise AlreadyExists(
            f"trunk {name!r} is already registered: choose another name "
            "(`mtreg trunk list` shows the registered ones)"
        )


def component_files(checkpoint: Checkpoint, scratch: Path) -> dict[str, Any]:
    """Write each tensor component of ``checkpoint`` as a file under ``scratch``.

    Returns:
        The layout of a trunk's ``objects`` with files instead of object ids: the
        ``embeddings`` file, the ``layers`` files in order, the ``pooler`` file (or None)
        and the ``tokenizer`` files by name (the checkpoint's own, sorted).
    """
    # torch comes with the tensor writer: only when a trunk is added or repaired, never
    # for `mtreg list`.
    from mtreg.artifacts.checkpoint import save_component

    def written(tensors: Tensors, label: str) -> Path:
        file = scratch / f"{label}.safetensors"
        save_component(tensors, file)
        return file

    return {
        "embeddings": written(checkpoint.embeddings, "embeddings"),
        "layers": [written(t, f"layer{i}") for i, t in enumerate(checkpoint.layers)],
        "pooler": written(checkpoint.pooler, "pooler") if checkpoint.pooler else None,
        "tokenizer": dict(sorted(checkpoint.tokenizer_files.items())),
    }


def store_trunk(
    write: Write, name: str, checkpoint: Checkpoint, source: Path, given: str | Path = ""
) -> None:
    """Copy the embeddings, layers, pooler and tokenizer files of ``checkpoint`` into the
    object store and add the trunk ``name`` (read from folder ``source``, which the user
    gave as ``given``: a Hub id becomes the trunk's ``base_model``) in ``write``.

    Returns:
        None; the trunk row and its ``trunk.add`` event are added to the transaction.
    """
    with tempfile.TemporaryDirectory() as scratch:
        files = component_files(checkpoint, Path(scratch))
        objects = {
            "embeddings": write.put_object(files["embeddings"]),
            "layers": [write.put_object(file) for file in files["layers"]],
            "pooler": write.put_object(files["pooler"]) if files["pooler"] else None,
            "tokenizer": {
                name: write.put_object(file) for name, file in files["tokenizer"].items()
            },
        }
    config = checkpoint.config
    if str(given) != str(source) and is_hub_id(str(given)):
        # Added by its Hub id (resolved to a cached snapshot): that id, without a revision.
        config = replace(config, base_model=str(given).partition("@")[0])
    record = TrunkRecord(
        name=name,
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        config=config.to_dict(),
        fingerprint=checkpoint.fingerprint.to_dict(),
        objects=objects,
        source=str(source.resolve()),
    )
    write.tx.add_trunk(record)
    write.tx.add_event("trunk.add", name, {"source": record.source})
