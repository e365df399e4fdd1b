"""Built-in intent tasks: clinc150, snips-intent, snips-slots.

Data come from ``$MTREG_DATA_DIR/intent/`` (``--data-dir`` sets the variable, see
:mod:`mtreg.plugins.readers`), laid out like the shared data folder:

* ``CLINC150/{train,val,test}.tsv``: ``text``, ``intent``; 150 intents plus ``oos``
  (out of scope), which is a class like the others. ``val`` is the ``dev`` split.
* ``SNIPS/{train,dev,test}.tsv``: ``text``, ``intent``, ``slots`` (one BIO tag per
  whitespace token of the lower-cased, tokenised text).

Every task has train, dev and test: select checkpoints on dev, report test.

Label lists are fixed: SNIPS's 7 intents are written here; CLINC150's 151 classes and SNIPS's
72 slot tags are too many to write inline, so they ship as package data
(``intent_labels/*.json``, written once from the shared data and committed). A label that is
not in the list is an error naming it and its line, never a silent new class.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

from mtreg.core.spec import HeadSpec, TaskSpec
from mtreg.errors import MtregError
from mtreg.plugins import readers
from mtreg.plugins.hookspecs import hookimpl

TRUNK = "minilm"
VERSION = "1.0.0"

Example = dict[str, Any]

SNIPS_INTENTS = (
    "AddToPlaylist",
    "BookRestaurant",
    "GetWeather",
    "PlayMusic",
    "RateBook",
    "SearchCreativeWork",
    "SearchScreeningEvent",
)
CLINC150_FILES = {"train": "train.tsv", "dev": "val.tsv", "test": "test.tsv"}
SPLITS = ("train", "dev", "test")


@cache
def packaged_labels(file_name: str) -> tuple[str, ...]:
    """Return the label list stored in ``intent_labels/<file_name>`` (package data).

    Raises:
        MtregError: the file is missing or is not ``{"labels": [str, ...]}`` (a broken
            installation).
    """
    try:
        text = resources.files("mtreg.plugins").joinpath("intent_labels", file_name).read_text()
        labels = json.loads(text)["labels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MtregError(f"cannot read the packaged label list {file_name}: {exc}") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise MtregError(f"packaged label list {file_name} is not a list of strings")
    return tuple(labels)


def clinc150_labels() -> tuple[str, ...]:
    """Return CLINC150's 150 intents and ``oos``, sorted (package data)."""
    return packaged_labels("clinc150_intents.json")


def snips_slot_tags() -> tuple[str, ...]:
    """Return SNIPS's 72 BIO slot tags, ``O`` first (package data)."""
    return packaged_labels("snips_slot_tags.json")


def read_clinc150(split: str) -> list[Example]:
    """Return CLINC150 ``split`` as ``{"text", "label"}`` examples (``dev`` is ``val.tsv``).

    Raises:
        MtregError: an unknown split, a missing file, a malformed line, an unknown intent.
    """
    readers.check_split("clinc150", split, SPLITS)
    path = readers.data_file("intent", "CLINC150", CLINC150_FILES[split])
    known = frozenset(clinc150_labels())
    return [
        {"text": f[0], "label": readers.check_label(f[1], known, f"{path}:{n}")}
        for n, f in readers.read_tsv(path, header=("text", "intent"))
    ]


def _snips_rows(split: str, task: str) -> list[tuple[str, list[str]]]:
    """Return ``(location, fields)`` per line of SNIPS ``split``. Raises MtregError."""
    readers.check_split(task, split, SPLITS)
    path = readers.data_file("intent", "SNIPS", f"{split}.tsv")
    rows = readers.read_tsv(path, header=("text", "intent", "slots"))
    return [(f"{path}:{n}", fields) for n, fields in rows]


def read_snips_intent(split: str) -> list[Example]:
    """Return SNIPS ``split`` as ``{"text", "label"}`` intent examples.

    Raises:
        MtregError: an unknown split, a missing file, a malformed line, an unknown intent.
    """
    return [
        {"text": f[0], "label": readers.check_label(f[1], SNIPS_INTENTS, where)}
        for where, f in _snips_rows(split, "snips-intent")
    ]


def read_snips_slots(split: str) -> list[Example]:
    """Return SNIPS ``split`` as ``{"text", "label"}`` tagging examples, ``label`` the list of
    BIO tags, one per whitespace token of ``text``.

    Raises:
        MtregError: an unknown split, a missing file, a malformed line, an unknown tag, or a
            line whose tag count differs from its token count.
    """
    known = frozenset(snips_slot_tags())
    examples = []
    for where, f in _snips_rows(split, "snips-slots"):
        tags = f[2].split()
        if len(tags) != len(f[0].split()):
            raise MtregError(
                f"{where}: {len(tags)} slot tags for {len(f[0].split())} words; "
                "give one tag per whitespace-separated word"
            )
        for tag in tags:
            readers.check_label(tag, known, where)
        examples.append({"text": f[0], "label": tags})
    return examples


def tasks() -> list[TaskSpec]:
    """Return the three intent task specs (reads only the two small packaged label lists)."""
    common: dict[str, Any] = {"version": VERSION, "inputs": ("text",), "trunk": TRUNK}
    return [
        TaskSpec(
            name="clinc150",
            description="CLINC150: 150 assistant intents plus out-of-scope (oos)",
            head=HeadSpec("classification", clinc150_labels()),
            load_dataset=read_clinc150,
            metrics=("accuracy",),
            # Longest train query: 33 tokens (one of 15,100); dev and test all fit in 32.
            max_length=32,
            **common,
        ),
        TaskSpec(
            name="snips-intent",
            description="SNIPS: voice assistant intents (7)",
            head=HeadSpec("classification", SNIPS_INTENTS),
            load_dataset=read_snips_intent,
            metrics=("accuracy",),
            # Longest query in any split: 38 tokens.
            max_length=48,
            **common,
        ),
        TaskSpec(
            name="snips-slots",
            description="SNIPS: slot filling (BIO tags per word)",
            head=HeadSpec("tagging", snips_slot_tags()),
            load_dataset=read_snips_slots,
            metrics=("span_f1", "token_accuracy"),
            # Longest query in any split: 38 tokens; nothing is cut, so every word keeps its tag.
            max_length=48,
            **common,
        ),
    ]


@hookimpl
def register_tasks(register: Callable[[TaskSpec], None]) -> None:
    """Register the intent tasks."""
    for spec in tasks():
        register(spec)
