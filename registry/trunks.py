"""Adding a trunk: its name checked free, its checkpoint's components stored as objects."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

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


def store_trunk(write: Write, name: str, checkpoint: Checkpoint, source: Path) -> None:
    """Copy the embeddings, layers, pooler and tokenizer files of ``checkpoint`` into the
    object store and add the trunk ``name`` (read from folder ``source``) in ``write``.

    Returns:
        None; the trunk row and its ``trunk.add`` event are added to the transaction.
    """
    # torch comes with the tensor writer: only when a trunk is added, never for `mtreg list`.
    from mtreg.artifacts.checkpoint import save_component

    with tempfile.TemporaryDirectory() as scratch:

        def put_tensors(tensors: Tensors, label: str) -> str:
            file = Path(scratch) / f"{label}.safetensors"
            save_component(tensors, file)
            return write.put_object(file)

        objects = {
            "embeddings": put_tensors(checkpoint.embeddings, "embeddings"),
            "layers": [put_tensors(t, f"layer{i}") for i, t in enumerate(checkpoint.layers)],
            "pooler": put_tensors(checkpoint.pooler, "pooler") if checkpoint.pooler else None,
            "tokenizer": {
                file_name: write.put_object(file_path)
                for file_name, file_path in sorted(checkpoint.tokenizer_files.items())
            },
        }
    record = TrunkRecord(
        name=name,
        model_type=checkpoint.config.model_type,
        num_layers=checkpoint.config.num_hidden_layers,
        config=checkpoint.config.to_dict(),
        fingerprint=checkpoint.fingerprint.to_dict(),
        objects=objects,
        source=str(source.resolve()),
    )
    write.tx.add_trunk(record)
    write.tx.add_event("trunk.add", name, {"source": record.source})
