"""What a task plugin declares: :class:`TaskSpec` and its :class:`HeadSpec`.

Both are frozen dataclasses validated on construction, so a bad name, version or label list
fails inside the plugin's own ``register(...)`` call, with a message naming the task.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion as _PkgInvalidVersion
from packaging.version import Version

from mtreg.errors import InvalidName, InvalidVersion, MtregError


@dataclass(frozen=True)
class KindRules:
    """What a head kind demands of a spec, checked while plugins load (so without torch).

    Each kind's behaviour (label encoding, loss, decoding, default metrics, export) lives in
    its module under :mod:`mtreg.heads`.

    Attributes:
        min_labels: the fewest labels a head of this kind may declare.
        per_token: one output row per token: the task reads one text, split into words (one
            label per word), and its branch has no pooler.
    """

    min_labels: int
    per_token: bool = False


KIND_RULES: dict[str, KindRules] = {
    "classification": KindRules(min_labels=2),
    "multilabel": KindRules(min_labels=1),
    "regression": KindRules(min_labels=0),
    "tagging": KindRules(min_labels=2, per_token=True),
}
HEAD_KINDS: tuple[str, ...] = tuple(KIND_RULES)
SPLITS: tuple[str, ...] = ("train", "dev", "test")

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
VERSION_MAX = 64  # characters: the registry's version column

Example = Mapping[str, Any]
"""One example: the input field(s) named by ``TaskSpec.inputs`` plus ``label``.

``label`` is a label string (classification), a list of label strings (multilabel), a float
(regression) or a list of tags, one per whitespace token of the text (tagging).
"""

DatasetLoader = Callable[[str], Iterable[Example]]


def validate_name(name: object, what: str = "task") -> str:
    """Return ``name`` if it is a valid task/trunk/alias name.

    Raises:
        InvalidName: unless ``name`` matches ``[a-z0-9][a-z0-9_-]{0,63}``; path characters,
            NUL, upper case and empty names are all refused here, before anything touches disk.
    """
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidName(
            f"invalid {what} name {name!r}: use 1-64 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def parse_version(text: object) -> Version:
    """Parse a semantic version ``MAJOR.MINOR.PATCH`` (pre-release suffixes allowed).

    Raises:
        InvalidVersion: for anything else, such as ``"1.0"``, ``"v1"`` or ``"latest"``, or
            one longer than VERSION_MAX characters.
    """
    version = version_key(text) if isinstance(text, str) else None
    if (
        version is None
        or len(text) > VERSION_MAX
        or len(version.release) != 3
        or version.epoch
        or version.local
        or version.post is not None
        or version.dev is not None
    ):
        raise InvalidVersion(
            f"invalid version {text!r}: use a semantic version such as 1.0.0 or 2.1.0rc1"
        )
    return version


def version_key(text: str) -> Version | None:
    """Return the comparable form of a version string, or None when it is none.

    Normalised forms compare equal: ``1.0``, ``1.0.0`` and ``v1.0.0`` are one version, as are
    ``1.0.0-rc1`` and ``1.0.0rc1``.
    """
    try:
        return Version(text)
    except _PkgInvalidVersion:
        return None


def find_version(wanted: str, registered: Iterable[str]) -> str | None:
    """Return the version among ``registered`` that ``wanted`` names (compared by
    :func:`version_key`, so ``1.0`` finds ``1.0.0``), or None."""
    key = version_key(wanted)
    if key is None:
        return None
    return next((version for version in registered if version_key(version) == key), None)


@dataclass(frozen=True)
class HeadSpec:
    """What a branch outputs.

    ``labels`` is ordered and frozen at registration: output unit *i* means ``labels[i]``.
    A regression head may name its outputs (one per label) or leave ``labels`` empty for a
    single score.
    """

    kind: str
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise MtregError(f"unknown head kind {self.kind!r}: use one of {', '.join(HEAD_KINDS)}")
        labels = tuple(self.labels)
        object.__setattr__(self, "labels", labels)
        if not all(isinstance(label, str) and label for label in labels):
            raise MtregError("head labels must be non-empty strings")
        if len(set(labels)) != len(labels):
            raise MtregError(f"head labels repeat a name: {list(labels)}")
        minimum = KIND_RULES[self.kind].min_labels
        if len(labels) < minimum:
            raise MtregError(f"a {self.kind} head needs at least {minimum} labels")

    @property
    def per_token(self) -> bool:
        """Whether the head outputs one row per token (see :class:`KindRules`)."""
        return KIND_RULES[self.kind].per_token

    @property
    def num_outputs(self) -> int:
        """Width of the head's output layer."""
        return max(len(self.labels), 1)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict; :meth:`from_dict` reverses it."""
        return {"kind": self.kind, "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadSpec:
        """Build a HeadSpec from :meth:`to_dict` output. Raises MtregError when invalid."""
        return cls(kind=data["kind"], labels=tuple(data.get("labels", ())))


@dataclass(frozen=True)
class TaskSpec:
    """One task contributed by a plugin.

    Attributes:
        name: unique task name, ``[a-z0-9][a-z0-9_-]{0,63}``.
        version: semantic version of this task's branch (``1.2.0``).
        head: the head spec; its label list is frozen once registered.
        description: one line shown by ``mtreg list``.
        inputs: names of the text fields of an example, one (``("text",)``) or a pair.
        load_dataset: ``load_dataset(split)`` yields examples for ``train``, ``dev``, ``test``.
        metrics: metric names, the first one selects checkpoints (``accuracy``, ``f1``, ...).
        weights: path of the branch safetensors file; ``None`` for a task not trained yet.
        trunk: name of the registered trunk the branch was trained on.
        max_length: longest tokenised input the branch was trained with.
    """

    name: str
    version: str
    head: HeadSpec
    description: str = ""
    inputs: tuple[str, ...] = ("text",)
    load_dataset: DatasetLoader | None = field(default=None, compare=False)
    metrics: tuple[str, ...] = ()
    weights: Path | None = None
    trunk: str | None = None
    max_length: int = 128

    def __post_init__(self) -> None:
        validate_name(self.name)
        try:
            parse_version(self.version)
        except InvalidVersion as exc:
            raise InvalidVersion(f"task {self.name!r}: {exc}") from None
        if not isinstance(self.head, HeadSpec):
            raise MtregError(f"task {self.name!r}: head must be a mtreg.HeadSpec")
        inputs = (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs)
        if len(inputs) not in (1, 2) or len(set(inputs)) != len(inputs):
            raise MtregError(
                f"task {self.name!r}: inputs must name one text field or a pair, got {inputs}"
            )
        if self.head.per_token and len(inputs) != 1:
            raise MtregError(f"task {self.name!r}: a tagging task takes one text field")
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if self.weights is not None:
            object.__setattr__(self, "weights", Path(self.weights))
        if self.trunk is not None:
            validate_name(self.trunk, "trunk")
        if not isinstance(self.max_length, int) or not 2 <= self.max_length <= 8192:
            raise MtregError(f"task {self.name!r}: max_length must be an integer in 2..8192")

    @property
    def parsed_version(self) -> Version:
        """The version as a comparable :class:`packaging.version.Version`."""
        return parse_version(self.version)
