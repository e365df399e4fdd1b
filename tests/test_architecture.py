"""The architecture, enforced: the import contracts of pyproject.toml ([tool.importlinter]),
the layers of docs/architecture.md and no import cycle inside a package, hold for every
import statement of mtreg, function-local ones included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_graph_keeps_every_declared_contract() -> None:
    # The console script next to this interpreter: the test runs in the project's .venv.
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_graph_holds_function_local_imports() -> None:
    # A lazy import must not hide an upward import or a cycle; the facade's lazy imports of
    # Registry and load_bundle are the witnesses that grimp sees inside function bodies.
    graph = grimp.build_graph("mtreg", cache_dir=None)
    assert graph.direct_import_exists(importer="mtreg", imported="mtreg.registry.api")
    assert graph.direct_import_exists(importer="mtreg", imported="mtreg.runtime.bundle")
