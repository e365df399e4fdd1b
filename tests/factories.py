"""Tiny real artefacts for tests: random BERT/RoBERTa checkpoint folders written by
transformers itself (built once per session, see :class:`Checkpoints`), and branch weight
files written by mtreg's own writer."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

import torch

from mtreg.artifacts.branch_file import BranchMeta, branch_shapes, write_branch
from mtreg.artifacts.checkpoint import Checkpoint
from mtreg.artifacts.config import TrunkConfig
from mtreg.core.spec import HeadSpec

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a an is was not very good bad great awful movie film book service food price "
    "slow fast love hate like okay fine terrible excellent boring fun i you it this that "
    "and or but refund order account password reset cancel help where when what how"
).split()
VOCAB = SPECIAL + WORDS + list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "sdegny"]


def make_checkpoint(
    folder: Path,
    num_layers: int = 3,
    seed: int = 0,
    model_type: str = "bert",
    hidden: int = 32,
    heads: int = 4,
    intermediate: int = 64,
    hidden_act: str = "gelu",
) -> Path:
    """Write a random Hugging Face checkpoint folder (config, safetensors, tokenizer).

    Same arguments give the same weights; another ``seed`` gives another trunk with the
    same architecture and tokenizer. Returns ``folder``.
    """
    from transformers import BertConfig, BertModel, BertTokenizer, RobertaConfig, RobertaModel
    from transformers.utils import logging

    logging.disable_progress_bar()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_act=hidden_act,
        max_position_embeddings=64,
    )
    if model_type == "roberta":
        config = RobertaConfig(**common, pad_token_id=1, type_vocab_size=1)
        model_class = RobertaModel
    else:
        config = BertConfig(**common, pad_token_id=0)
        model_class = BertModel
    torch.manual_seed(seed)
    model_class(config).eval().save_pretrained(folder)
    # transformers 5 ignores vocab_file here; the vocab itself must be passed.
    vocab = {word: index for index, word in enumerate(VOCAB)}
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(folder)
    return folder


class Checkpoints:
    """The session's random checkpoints (the ``checkpoints`` fixture): each distinct set of
    :func:`make_checkpoint` arguments is built once, under ``root``, and copied from there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple, tuple[Path, torch.Tensor]] = {}

    def shared(self, num_layers: int = 3, **options: Any) -> Path:
        """Return the folder holding ``make_checkpoint(folder, num_layers, **options)``,
        building it on first use. Shared by every test: read it, never write into it."""
        bound = inspect.signature(make_checkpoint).bind(None, num_layers, **options)
        bound.apply_defaults()
        key = tuple(bound.arguments.values())[1:]
        if key not in self._built:
            folder = make_checkpoint(self.root / str(len(self._built)), num_layers, **options)
            self._built[key] = (folder, torch.get_rng_state())
        folder, rng = self._built[key]
        # A build leaves torch's global generator seeded; leave it as a build would, so that
        # a test's later random draws do not depend on which test built the checkpoint.
        torch.set_rng_state(rng)
        return folder

    def copy(self, folder: Path, num_layers: int = 3, **options: Any) -> Path:
        """Copy that checkpoint into ``folder`` (created if missing), as
        ``make_checkpoint(folder, num_layers, **options)`` would write it. Returns ``folder``."""
        shutil.copytree(self.shared(num_layers, **options), folder, dirs_exist_ok=True)
        return Path(folder)


def random_branch(
    config: TrunkConfig, num_layers: int, head: HeadSpec, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Return random branch tensors of the right names and shapes (LayerNorms at 1/0)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in branch_shapes(config, num_layers, head).items():
        if "LayerNorm" in name:
            tensors[name] = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        else:
            tensors[name] = torch.randn(shape, generator=generator) * 0.05
    return tensors


def make_branch_file(
    path: Path,
    checkpoint: Checkpoint,
    task: str,
    version: str,
    depth: int,
    layers: int,
    head: HeadSpec,
    seed: int = 0,
    max_length: int = 32,
    training: dict | None = None,
) -> Path:
    """Write a branch file for ``task`` trained (so it says) on ``checkpoint`` at ``depth``.

    Returns ``path``.
    """
    meta = BranchMeta(
        task=task,
        task_version=version,
        fork_depth=depth,
        num_layers=layers,
        head=head,
        max_length=max_length,
        trunk_prefix=checkpoint.fingerprint.prefix(depth),
        training=training or {"dev_metrics": {"accuracy": 0.5}},
    )
    return write_branch(path, random_branch(checkpoint.config, layers, head, seed), meta)


def corrupt_header(path: Path) -> Path:
    """Overwrite the JSON header of a safetensors file with garbage of the same length."""
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    data[8 : 8 + length] = b"{" * length
    path.write_bytes(bytes(data))
    return path


def set_tensor(path: Path, name: str, value: torch.Tensor | None) -> Path:
    """Rewrite (or, with ``None``, delete) one tensor of a safetensors file, keeping its
    metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(path), metadata=metadata)
    return path
