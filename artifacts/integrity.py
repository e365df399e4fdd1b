"""Checking the files of a bundle folder against the hashes its manifest records.

Loading (:mod:`mtreg.runtime.bundle`) raises on the first problem; ``mtreg verify``
(:mod:`mtreg.registry.integrity`) collects every problem of a bundle. Both read the same
checks from here, so what loading refuses is exactly what verify reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mtreg.artifacts.manifest import TOKENIZER_DIR, Manifest
from mtreg.artifacts.objects import sha256_file
from mtreg.errors import Damaged

REPAIR_HINT = "run `mtreg verify --repair` for a registry bundle, or export the folder again"


@dataclass(frozen=True)
class FileProblem:
    """One damaged file of a folder: its folder-relative path and what is wrong with it."""

    file: str
    problem: str

    def error(self, root: Path) -> Damaged:
        """Return the one-line error that refuses loading folder ``root`` for this problem."""
        return Damaged(f"{root / self.file} {self.problem}: {REPAIR_HINT}")


def file_problem(
    root: Path, relative: str, expected: str | None, record: str = "the manifest"
) -> FileProblem | None:
    """Return what is wrong with file ``relative`` of folder ``root`` against the sha256
    ``expected`` that ``record`` lists (None: it does not list the file), or None when the
    file matches."""
    path = root / relative
    if expected is None:
        return FileProblem(relative, f"is not listed in {record}")
    if not path.is_file():
        return FileProblem(relative, f"is missing ({record} lists it)")
    if sha256_file(path) != expected:
        return FileProblem(relative, f"does not match {record} (its sha256 differs)")
    return None


def checked_file(root: Path, files: Mapping[str, str], relative: str) -> Path:
    """Return the path of file ``relative`` of folder ``root`` once its bytes hash to what
    ``files`` (relative path -> sha256) records.

    Raises:
        Damaged: the file is unlisted, missing or its bytes differ (the message names it).
    """
    problem = file_problem(root, relative, files.get(relative))
    if problem is not None:
        raise problem.error(root)
    return root / relative


def tokenizer_problems(root: Path, manifest: Manifest) -> list[FileProblem]:
    """Return the files of ``root``'s tokenizer folder that are not exactly the manifest's
    tokenizer files: an unlisted extra file would be read by the tokenizer loader, a
    missing one changes how text is split. Hashes are not checked here."""
    listed = set(manifest.tokenizer_files)
    folder = root / TOKENIZER_DIR
    present = (
        {p.relative_to(root).as_posix() for p in folder.rglob("*") if not p.is_dir()}
        if folder.is_dir()
        else set()
    )
    extra = [FileProblem(rel, "is not listed in the manifest") for rel in sorted(present - listed)]
    missing = sorted(listed - present)
    return extra + [FileProblem(rel, "is missing (the manifest lists it)") for rel in missing]


def check_tokenizer(root: Path, manifest: Manifest) -> None:
    """Check that bundle folder ``root`` holds exactly the manifest's tokenizer files, each
    with the recorded sha256.

    Raises:
        Damaged: an extra, missing or changed tokenizer file (the message names it).
    """
    problems = tokenizer_problems(root, manifest)
    if problems:
        raise problems[0].error(root)
    for relative in manifest.tokenizer_files:
        checked_file(root, manifest.files, relative)


def bundle_problems(root: Path, manifest: Manifest) -> list[FileProblem]:
    """Return every damaged file of bundle folder ``root``: each listed file missing or
    hashing to another sha256, and the tokenizer folder's extra files."""
    problems = [
        problem
        for relative, sha in manifest.files.items()
        if (problem := file_problem(root, relative, sha)) is not None
    ]
    seen = {p.file for p in problems}
    return problems + [p for p in tokenizer_problems(root, manifest) if p.file not in seen]
