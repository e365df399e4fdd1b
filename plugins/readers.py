"""Reading task data: the data folder, TSV/CSV/JSONL files, label checks, seeded splits.

Shared by the built-in GLUE and intent plugins and by plugins made with ``mtreg new-plugin``.

The data folder
---------------
``TaskSpec.load_dataset`` is a plain ``load_dataset(split)`` callable, so the folder is looked
up when it is *called*, from ``$MTREG_DATA_DIR``. A command taking ``--data-dir PATH`` sets
that variable around loading data (:func:`mtreg.core.env.using_data_dir`). The built-in
plugins expect the layout of the shared data folder::

    glue/<TASK>/train.tsv, dev.tsv (MNLI: dev_matched.tsv)
    intent/CLINC150/{train,val,test}.tsv    intent/SNIPS/{train,dev,test}.tsv

A scaffolded plugin reads ``$MTREG_DATA_DIR/<task>/{train,dev,test}.{csv,tsv,jsonl}``.

Errors
------
Every problem is an :class:`~mtreg.errors.MtregError` whose one-line message names the file
(and line) and says what to do: the data folder unset or missing, a missing file (with the
expected path and the variable), a split this data does not have (:class:`MissingSplit`), a
malformed line, or a label the task's head does not know.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from mtreg.core import env
from mtreg.core.env import DATA_DIR_ENV
from mtreg.core.text import read_jsonl
from mtreg.errors import MtregError

TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".jsonl")

# Lines of the real data can be long (RTE passages); the csv module's default cap is 128 KiB.
csv.field_size_limit(2**30)


class MissingSplit(MtregError):
    """A split (``train``, ``dev``, ``test``) the task's data does not have."""


def data_dir() -> Path:
    """Return the data folder named by ``$MTREG_DATA_DIR``.

    Raises:
        MtregError: the variable is unset or empty, or names no existing directory.
    """
    raw = env.data_dir()
    if raw is None:
        raise MtregError(
            f"no data folder: pass --data-dir PATH or set {DATA_DIR_ENV} "
            "(laid out like the shared data folder: glue/..., intent/...)"
        )
    folder = Path(raw).expanduser()
    if not folder.is_dir():
        raise MtregError(f"data folder {folder} (from {DATA_DIR_ENV}) does not exist")
    return folder


def data_file(*parts: str) -> Path:
    """Return ``data_dir()/parts...``, which must be a file.

    Raises:
        MtregError: the file is missing; the message names the expected path and the variable.
    """
    path = data_dir().joinpath(*parts)
    if not path.is_file():
        raise MtregError(
            f"missing data file {path} (data folder from {DATA_DIR_ENV}={env.data_dir()}): "
            "put the file there or point --data-dir / MTREG_DATA_DIR at the right folder"
        )
    return path


def check_split(task: str, split: str, available: Collection[str], reason: str = "") -> None:
    """Raise unless ``split`` is one of the ``available`` splits of ``task``.

    Raises:
        MtregError: ``split`` is not train, dev or test.
        MissingSplit: a known split this task's data lacks; ``reason`` says why.
    """
    if split not in ("train", "dev", "test"):
        raise MtregError(f"unknown split {split!r} for task {task!r}: use train, dev or test")
    if split not in available:
        have = ", ".join(s for s in ("train", "dev", "test") if s in available)
        why = f": {reason}" if reason else ""
        raise MissingSplit(f"task {task!r} has no {split} split (it has {have}){why}")


def read_tsv(
    path: Path,
    *,
    header: Sequence[str] | None,
    repair: Callable[[list[str]], list[str]] | None = None,
) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` for each data line of a tab-separated file.

    Quoting is disabled (a ``"`` is an ordinary character: STS-B and QNLI have unbalanced
    quotes), a leading UTF-8 BOM is dropped (MRPC), ``\\r\\n`` endings and a missing final
    newline are accepted (CoLA dev), blank lines are skipped.

    Args:
        header: the expected first line, checked and skipped; ``None`` for a file without one
            (CoLA). Every line must have ``len(header)`` fields, or as many as the first line.
        repair: called on a line with the wrong field count; returns fixed fields (QQP).

    Raises:
        MtregError: a wrong header, or a line with the wrong field count after ``repair``;
            the message names the file and line.
    """
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        width = len(header) if header is not None else None
        for number, fields in enumerate(rows, start=1):
            if not fields or fields == [""]:
                continue
            if number == 1 and header is not None:
                if [f.strip() for f in fields] != list(header):
                    raise MtregError(
                        f"{path}:1: expected the header {list(header)}, found {fields}"
                    )
                continue
            width = len(fields) if width is None else width
            if len(fields) != width and repair is not None:
                fields = repair(fields)
            if len(fields) != width:
                raise MtregError(
                    f"{path}:{number}: expected {width} tab-separated fields, found {len(fields)}"
                )
            yield number, fields


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, record)`` from a ``.csv``, ``.tsv`` (both with a header line) or
    ``.jsonl`` file (one JSON object per line).

    CSV uses standard quoting; TSV has quoting disabled, as in :func:`read_tsv`.

    Raises:
        MtregError: an unknown suffix, a CSV/TSV line with the wrong field count, or a JSONL
            line that is not a JSON object; the message names the file and line.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, record in read_jsonl(path):
            if not isinstance(record, dict):
                raise MtregError(f"{path}:{number}: expected a JSON object per line")
            yield number, record
        return
    if suffix not in (".csv", ".tsv"):
        raise MtregError(f"{path}: unknown data format, use one of {', '.join(TABLE_SUFFIXES)}")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if suffix == ".csv":
            rows = csv.reader(handle)
        else:
            rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns: list[str] | None = None
        for number, fields in enumerate(rows, start=1):
            if not fields or fields == [""]:
                continue
            if columns is None:
                columns = [f.strip() for f in fields]
                continue
            if len(fields) != len(columns):
                raise MtregError(
                    f"{path}:{number}: expected {len(columns)} fields ({', '.join(columns)}), "
                    f"found {len(fields)}"
                )
            yield number, dict(zip(columns, fields, strict=True))


def check_label(label: str, known: Collection[str], where: str) -> str:
    """Return ``label`` if the head knows it.

    Raises:
        MtregError: an unknown label; the message names it and ``where`` (``file:line``).
    """
    if label not in known:
        shown = sorted(known)
        listed = ", ".join(shown[:10]) + (", ..." if len(shown) > 10 else "")
        raise MtregError(f"{where}: unknown label {label!r} (the task's labels are {listed})")
    return label


def in_holdout(key: str, seed: str, percent: int) -> bool:
    """Return whether ``key`` falls in a fixed ``percent`` share of keys for ``seed``.

    The choice is ``sha256(seed + ":" + key)`` read as an integer, modulo 100, below
    ``percent``: it depends on the key alone, so it is the same on every machine and run,
    and a key is either held out or not (the two sides are disjoint).
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent
