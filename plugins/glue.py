"""Built-in GLUE tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte.

Data come from ``$MTREG_DATA_DIR/glue/<TASK>/`` (``--data-dir`` sets the variable, see
:mod:`mtreg.plugins.readers`), laid out and quirky like the shared data folder:

* CoLA has no header (source, label, original label, sentence).
* MRPC starts with a UTF-8 BOM.
* STS-B and QNLI have unbalanced ``"``: every file is read with quoting disabled.
* MNLI is ``dev_matched.tsv`` with reduced columns (index, sentence1, sentence2, gold_label).
* One QQP line has a space instead of a tab before its label (5 fields): it is repaired.

Splits: GLUE's test labels are not public, so no GLUE task has a ``test`` split; QNLI and
MNLI have no ``train`` split here (those files are not in the shared data), and asking for
one raises :class:`~mtreg.plugins.readers.MissingSplit`. The shared QQP file is a 23,497-row
subset of GLUE's train, and QQP's dev is missing: ``dev`` is the fixed 10% of that file
whose ``id`` hashes below 10 with seed ``mtreg-qqp-dev`` (:func:`readers.in_holdout`),
``train`` the other 90%; the two are disjoint and the same on every run.

Label lists are fixed here, never read from the data; the positive class comes second, as
the ``f1`` metric scores label index 1. Metric names are those of :mod:`mtreg.training.metrics`;
the first one selects checkpoints.

``max_length`` per task was chosen from the token lengths (MiniLM's WordPiece tokenizer,
pair tasks counted with both texts and the special tokens) of the shared data; see the
comment at each task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from mtreg.core.spec import HeadSpec, TaskSpec
from mtreg.errors import MtregError
from mtreg.plugins import readers
from mtreg.plugins.hookspecs import hookimpl

TRUNK = "minilm"
VERSION = "1.0.0"
QQP_DEV_SEED = "mtreg-qqp-dev"
QQP_DEV_PERCENT = 10

Example = dict[str, Any]

COLA_LABELS = ("unacceptable", "acceptable")
SST2_LABELS = ("negative", "positive")
MRPC_LABELS = ("not_equivalent", "equivalent")
QQP_LABELS = ("not_duplicate", "duplicate")
NLI2_LABELS = ("entailment", "not_entailment")  # QNLI and RTE
MNLI_LABELS = ("entailment", "neutral", "contradiction")
STSB_RANGE = (0.0, 5.0)

RTE_HEADER = ("index", "sentence1", "sentence2", "label")
QNLI_HEADER = ("index", "question", "sentence", "label")
MNLI_HEADER = ("index", "sentence1", "sentence2", "gold_label")
MRPC_HEADER = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
QQP_HEADER = ("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
STSB_HEADER = (
    *("index", "genre", "filename", "year", "old_index"),
    *("source1", "source2", "sentence1", "sentence2", "score"),
)


def _binary(raw: str, labels: Sequence[str], where: str) -> str:
    """Return ``labels[int(raw)]`` for a ``0``/``1`` label.

    Raises:
        MtregError: ``raw`` is neither ``0`` nor ``1``; the message names it and ``where``.
    """
    readers.check_label(raw, ("0", "1"), where)
    return labels[int(raw)]


def _file(folder: str, name: str) -> Path:
    """Return ``glue/<folder>/<name>`` in the data folder. Raises MtregError when missing."""
    return readers.data_file("glue", folder, name)


def read_cola(split: str) -> list[Example]:
    """Return CoLA ``split`` as ``{"sentence", "label"}`` examples (no header in the file).

    Raises:
        MtregError: a missing file or split, a malformed line, an unknown label.
    """
    readers.check_split("cola", split, ("train", "dev"), "GLUE's test labels are not public")
    path = _file("CoLA", f"{split}.tsv")
    return [
        {"sentence": f[3], "label": _binary(f[1], COLA_LABELS, f"{path}:{n}")}
        for n, f in readers.read_tsv(path, header=None)
    ]


def read_sst2(split: str) -> list[Example]:
    """Return SST-2 ``split`` as ``{"sentence", "label"}`` examples.

    Raises:
        MtregError: a missing file or split, a malformed line, an unknown label.
    """
    readers.check_split("sst2", split, ("train", "dev"), "GLUE's test labels are not public")
    path = _file("SST-2", f"{split}.tsv")
    return [
        {"sentence": f[0], "label": _binary(f[1], SST2_LABELS, f"{path}:{n}")}
        for n, f in readers.read_tsv(path, header=("sentence", "label"))
    ]


def read_mrpc(split: str) -> list[Example]:
    """Return MRPC ``split`` as ``{"sentence1", "sentence2", "label"}`` (BOM dropped).

    Raises:
        MtregError: a missing file or split, a malformed line, an unknown label.
    """
    readers.check_split("mrpc", split, ("train", "dev"), "GLUE's test labels are not public")
    path = _file("MRPC", f"{split}.tsv")
    return [
        {
            "sentence1": f[3],
            "sentence2": f[4],
            "label": _binary(f[0], MRPC_LABELS, f"{path}:{n}"),
        }
        for n, f in readers.read_tsv(path, header=MRPC_HEADER)
    ]


def read_stsb(split: str) -> list[Example]:
    """Return STS-B ``split`` as ``{"sentence1", "sentence2", "label"}``, label a float in 0..5.

    Raises:
        MtregError: a missing file or split, a malformed line, a score that is not a number
            in 0..5.
    """
    readers.check_split("stsb", split, ("train", "dev"), "GLUE's test labels are not public")
    path = _file("STS-B", f"{split}.tsv")
    return [
        {"sentence1": f[7], "sentence2": f[8], "label": _score(f[9], f"{path}:{n}")}
        for n, f in readers.read_tsv(path, header=STSB_HEADER)
    ]


def _score(raw: str, where: str) -> float:
    """Return an STS-B score as a float. Raises MtregError outside 0..5 or not a number."""
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    low, high = STSB_RANGE
    if not low <= value <= high:
        raise MtregError(f"{where}: score {raw!r} is not a number in {low:g}..{high:g}")
    return value


def _repair_qqp(fields: list[str]) -> list[str]:
    """Split a 5-field QQP line whose label follows question2 after a space, not a tab."""
    if len(fields) == 5:
        question2, sep, label = fields[4].rpartition(" ")
        if sep and label in ("0", "1"):
            return [*fields[:4], question2, label]
    return fields


def read_qqp(split: str) -> list[Example]:
    """Return QQP ``split`` as ``{"question1", "question2", "label"}`` examples.

    ``dev`` is the fixed 10% of the train subset chosen by :func:`readers.in_holdout` on the
    pair ``id`` (seed :data:`QQP_DEV_SEED`); ``train`` is the rest.

    Raises:
        MtregError: a missing file or split, a malformed line, an unknown label.
    """
    readers.check_split("qqp", split, ("train", "dev"), "GLUE's test labels are not public")
    path = _file("QQP", "train.tsv")
    held_out = split == "dev"
    return [
        {
            "question1": f[3],
            "question2": f[4],
            "label": _binary(f[5], QQP_LABELS, f"{path}:{n}"),
        }
        for n, f in readers.read_tsv(path, header=QQP_HEADER, repair=_repair_qqp)
        if readers.in_holdout(f[0], QQP_DEV_SEED, QQP_DEV_PERCENT) == held_out
    ]


def read_mnli(split: str) -> list[Example]:
    """Return MNLI-matched ``dev`` as ``{"premise", "hypothesis", "label"}`` examples.

    Raises:
        MissingSplit: ``train`` or ``test``: the data has MNLI's dev_matched only.
        MtregError: a missing file, a malformed line, an unknown label.
    """
    readers.check_split(
        "mnli",
        split,
        ("dev",),
        "the data folder has MNLI dev_matched only (GLUE's 392,702-row train is not in it)",
    )
    path = _file("MNLI", "dev_matched.tsv")
    return [
        {
            "premise": f[1],
            "hypothesis": f[2],
            "label": readers.check_label(f[3], MNLI_LABELS, f"{path}:{n}"),
        }
        for n, f in readers.read_tsv(path, header=MNLI_HEADER)
    ]


def read_qnli(split: str) -> list[Example]:
    """Return QNLI ``dev`` as ``{"question", "sentence", "label"}`` examples.

    Raises:
        MissingSplit: ``train`` or ``test``: the data has QNLI's dev only.
        MtregError: a missing file, a malformed line, an unknown label.
    """
    readers.check_split(
        "qnli",
        split,
        ("dev",),
        "the data folder has QNLI dev only (GLUE's 104,743-row train is not in it)",
    )
    path = _file("QNLI", "dev.tsv")
    return [
        {
            "question": f[1],
            "sentence": f[2],
            "label": readers.check_label(f[3], NLI2_LABELS, f"{path}:{n}"),
        }
        for n, f in readers.read_tsv(path, header=QNLI_HEADER)
    ]


def read_rte(split: str) -> list[Example]:
    """Return RTE ``split`` as ``{"sentence1", "sentence2", "label"}`` examples.

    Raises:
        MtregError: a missing file or split, a malformed line, an unknown label.
    """
    readers.check_split("rte", split, ("train", "dev"), "GLUE's test labels are not public")
    path = _file("RTE", f"{split}.tsv")
    return [
        {
            "sentence1": f[1],
            "sentence2": f[2],
            "label": readers.check_label(f[3], NLI2_LABELS, f"{path}:{n}"),
        }
        for n, f in readers.read_tsv(path, header=RTE_HEADER)
    ]


def _task(
    name: str,
    description: str,
    head: HeadSpec,
    inputs: tuple[str, ...],
    load: Callable[[str], list[Example]],
    metrics: tuple[str, ...],
    max_length: int,
) -> TaskSpec:
    return TaskSpec(
        name=name,
        version=VERSION,
        head=head,
        description=description,
        inputs=inputs,
        load_dataset=load,
        metrics=metrics,
        weights=None,
        trunk=TRUNK,
        max_length=max_length,
    )


PAIR = ("sentence1", "sentence2")
_classify = partial(HeadSpec, "classification")


def tasks() -> list[TaskSpec]:
    """Return the eight GLUE task specs (cheap: no data is read)."""
    return [
        # Longest train/dev sentence: 47 tokens.
        _task(
            "cola",
            "GLUE CoLA: grammatical acceptability",
            _classify(COLA_LABELS),
            ("sentence",),
            read_cola,
            ("mcc", "accuracy"),
            48,
        ),
        # 99.9% of train <= 56 tokens; 4 of 67,349 train sentences (none of dev) exceed 64.
        _task(
            "sst2",
            "GLUE SST-2: movie review sentiment",
            _classify(SST2_LABELS),
            ("sentence",),
            read_sst2,
            ("accuracy",),
            64,
        ),
        # Longest pair: 103 tokens.
        _task(
            "mrpc",
            "GLUE MRPC: paraphrase (news)",
            _classify(MRPC_LABELS),
            PAIR,
            read_mrpc,
            ("f1", "accuracy"),
            128,
        ),
        # Longest pair: 125 tokens.
        _task(
            "stsb",
            "GLUE STS-B: semantic similarity score 0-5",
            HeadSpec("regression"),
            PAIR,
            read_stsb,
            ("pearson", "spearman"),
            128,
        ),
        # 99.9% <= 108 tokens; 7 of 23,497 pairs exceed 128.
        _task(
            "qqp",
            "GLUE QQP: duplicate questions (10% of the train subset is dev)",
            _classify(QQP_LABELS),
            ("question1", "question2"),
            read_qqp,
            ("accuracy", "f1"),
            128,
        ),
        # 99% <= 98 tokens; 30 of 9,815 dev pairs exceed 128 (GLUE's usual length).
        _task(
            "mnli",
            "GLUE MNLI: natural language inference (matched dev only here)",
            _classify(MNLI_LABELS),
            ("premise", "hypothesis"),
            read_mnli,
            ("accuracy",),
            128,
        ),
        # 99% <= 116 tokens; 25 of 5,463 dev pairs exceed 128.
        _task(
            "qnli",
            "GLUE QNLI: question answering as inference (dev only here)",
            _classify(NLI2_LABELS),
            ("question", "sentence"),
            read_qnli,
            ("accuracy",),
            128,
        ),
        # Long premises: 128 would cut 304 of 2,490 train pairs (99% <= 197); 2 exceed 256.
        _task(
            "rte",
            "GLUE RTE: textual entailment",
            _classify(NLI2_LABELS),
            PAIR,
            read_rte,
            ("accuracy",),
            256,
        ),
    ]


@hookimpl
def register_tasks(register: Callable[[TaskSpec], None]) -> None:
    """Register the GLUE tasks."""
    for spec in tasks():
        register(spec)
