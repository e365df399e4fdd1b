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
    from transformers import AutoModel, BertTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = family_config(model_type, num_layers, hidden, heads, intermediate, hidden_act)
    torch.manual_seed(seed)
    AutoModel.from_config(config).eval().save_pretrained(folder)
    # transformers 5 ignores vocab_file here; the vocab itself must be passed.
    vocab = {word: index for index, word in enumerate(VOCAB)}
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(folder)
    return folder


# Every encoder family mtreg serves, as the model types tests parametrise over.
FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2", "modernbert")


def family_config(
    model_type: str,
    num_layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    intermediate: int = 64,
    hidden_act: str = "gelu",
    **extra: Any,
):
    """Return a tiny random-architecture transformers config of ``model_type``, using the
    family's own options (DeBERTa's relative attention, ModernBERT's local attention every
    other layer, ELECTRA's narrower embeddings) so that tests reach them."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=64,
    )
    act = {"hidden_act": hidden_act}
    options: dict[str, Any] = {
        "bert": dict(act, pad_token_id=0),
        "roberta": dict(act, pad_token_id=1, type_vocab_size=1),
        "xlm-roberta": dict(act, pad_token_id=1, type_vocab_size=1),
        "electra": dict(act, pad_token_id=0, embedding_size=hidden // 2),
        "deberta-v2": dict(
            act,
            pad_token_id=0,
            relative_attention=True,
            position_buckets=8,
            max_relative_positions=16,
            norm_rel_ebd="layer_norm",
            pos_att_type=["p2c", "c2p"],
            share_att_key=True,
            position_biased_input=False,
            type_vocab_size=0,
        ),
        "modernbert": dict(
            pad_token_id=0,
            hidden_activation=hidden_act,
            local_attention=4,
            global_attn_every_n_layers=2,
            bos_token_id=2,
            eos_token_id=3,
            cls_token_id=2,
            sep_token_id=3,
        ),
    }
    if model_type == "distilbert":
        return AutoConfig.for_model(
            "distilbert",
            vocab_size=len(VOCAB),
            dim=hidden,
            n_layers=num_layers,
            n_heads=heads,
            hidden_dim=intermediate,
            activation=hidden_act,
            max_position_embeddings=64,
            pad_token_id=0,
            **extra,
        )
    return AutoConfig.for_model(model_type, **common, **options[model_type], **extra)


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
    config: TrunkConfig,
    num_layers: int,
    head: HeadSpec,
    seed: int = 0,
    fork_depth: int = 0,
    trunk_embeddings: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Return random branch tensors of the right names and shapes (norms at 1/0), forking
    at ``fork_depth``; DeBERTa's relative-position copy is taken from ``trunk_embeddings``
    when given, as training does."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in branch_shapes(config, num_layers, head, fork_depth).items():
        if trunk_embeddings is not None and name in trunk_embeddings:
            tensors[name] = trunk_embeddings[name].clone()
        elif "norm" in name.lower():
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
    # DeBERTa branches copy the trunk's relative-position table; a test's stand-in for a
    # checkpoint may carry only its config and fingerprint.
    trunk = getattr(checkpoint, "embeddings", None)
    tensors = random_branch(checkpoint.config, layers, head, seed, depth, trunk)
    return write_branch(path, tensors, meta)


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
