"""Disk faults in what mtreg writes beside the registry: the activation cache training fills,
the ONNX cache the server exports into, the ``mtreg demo`` folder, and every safetensors
writer. Each is one line (``core/disk.py``) saying what to do, exit code 1, no traceback and
no half-written file.

A file in the way is made with plain files; the full disk is a real small tmpfs in a private
mount namespace (``helpers.unshare``: root, or a user namespace; ``helpers.require_namespaces``
probes for it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factories import Checkpoints
from harness import CliPool
from helpers import publish_tasks, require_namespaces, unshare
from toy import FLAGS, open_toy_registry

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.artifacts.home import Home
from mtreg.errors import StorageError
from mtreg.registry.api import Registry
from mtreg.serving.reload import load_served
from mtreg.training.cache import ActivationCache

TENSORS = [torch.ones(64, 8), torch.zeros(3, 8)]


def _one_line(result: object) -> str:
    """Return the error line of a failed command; it must be its only line."""
    assert result.code == 1, result.stderr  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert "Traceback" not in result.stderr, result.stderr  # type: ignore[attr-defined]
    return lines[-1]


# -- the activation cache ---------------------------------------------------------------------


def test_a_file_where_the_activation_cache_goes_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "activations").write_text("not a folder")
    with pytest.raises(StorageError) as caught:
        ActivationCache(tmp_path / "activations").put("k", TENSORS)
    assert str(caught.value) == (
        f"cannot write {tmp_path / 'activations'}: File exists: a regular file is in the way: "
        "use another --home or --out"
    )
    with pytest.raises(StorageError, match="Not a directory: a part of that path is a regular"):
        ActivationCache(tmp_path / "activations" / "deeper").put("k", TENSORS)


def test_the_activation_cache_still_stores_and_reads(tmp_path: Path) -> None:
    cache = ActivationCache(tmp_path / "activations")
    cache.put("k", TENSORS)
    read = cache.get("k")
    assert read is not None and [t.shape for t in read] == [(64, 8), (3, 8)]
    assert [p.name for p in (tmp_path / "activations").iterdir()] == ["k.safetensors"]


FULL = textwrap.dedent(
    """
    import sys, torch
    from mtreg.errors import StorageError
    from mtreg.training.cache import ActivationCache

    try:
        ActivationCache(sys.argv[1]).put("k", [torch.ones(64 * 1024, 8)])  # 2 MB
    except StorageError as exc:
        print(exc)
    """
)


def on_a_full_disk(mnt: Path, code: str, folder: Path) -> str:
    """Run ``code`` (argv[1]: ``folder``) with ``mnt`` a 256 KB tmpfs in a private mount
    namespace, then list ``folder``; return what both printed (skip, or fail under CI, where
    mounts are not allowed)."""
    require_namespaces()
    mnt.mkdir()
    script = (
        f'mount -t tmpfs -o size=256k tmpfs "{mnt}" && '
        f'{sys.executable} -c "$CODE" "{folder}" && ls -A "{folder}"'
    )
    done = subprocess.run(
        [*unshare("--mount"), "bash", "-c", script],
        env={**os.environ, "CODE": code},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_a_full_disk_under_the_activation_cache_is_one_line(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    message, *left = on_a_full_disk(mnt, FULL, mnt / "activations").splitlines()
    assert message.startswith(f"cannot write {mnt}/activations")
    assert message.endswith("No space left on device: free space on that disk and retry")
    assert left == []  # the half-written entry is gone


# -- every safetensors writer, on a real full disk ---------------------------------------------

WRITERS = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from mtreg.artifacts.checkpoint import save_component
    from mtreg.artifacts.tensor_file import write_safetensors

    big = {"w": torch.ones(64 * 1024, 8)}  # 2 MB
    writers = {
        "write_safetensors": lambda path: write_safetensors(path, big),
        "save_component": lambda path: save_component(big, path),
    }
    for name, write in writers.items():
        try:
            write(Path(sys.argv[1]) / f"{name}.safetensors")
            print(name, "wrote")
        except OSError as exc:
            print(name, exc.strerror)
    """
)


@pytest.mark.slow
def test_safetensors_writers_report_a_full_disk_and_leave_nothing(tmp_path: Path) -> None:
    """``safetensors.torch.save_file`` reported nothing writing to ``/dev/full`` and raised a
    ``SafetensorError`` (no ``OSError``) on a full tmpfs; every tensor file (trunk components,
    saved training runs, the HF export, the activation cache) goes through
    ``write_safetensors``, which raises ``OSError`` and leaves no file behind."""
    mnt = tmp_path / "mnt"
    assert on_a_full_disk(mnt, WRITERS, mnt).splitlines() == [
        "write_safetensors No space left on device",
        "save_component No space left on device",
    ]  # and `ls -A` printed nothing: no file, no temporary left


@pytest.mark.slow
def test_training_with_a_file_in_the_cache_way_is_one_line(
    pool: CliPool, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    open_toy_registry(checkpoints, tmp_path).close()
    home = Home(tmp_path / "home")
    home.cache.mkdir(parents=True, exist_ok=True)
    home.activations.write_text("in the way")
    values = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MTREG_")},
        "MTREG_HOME": str(home.root),
        "MTREG_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.db'}",
        "MTREG_PLUGINS_PATH": str(tmp_path / "plugins"),
    }
    line = _one_line(pool.run(values, "onboard", "toy", *FLAGS))
    assert line == (
        f"Error: cannot write {home.activations}: File exists: a regular file is in the way: "
        "use another --home or --out"
    )
    assert home.activations.read_text() == "in the way"


# -- the server's ONNX cache ------------------------------------------------------------------

SERVE = ["--bundle", "latest", "--backend", "onnx", "--port", "0"]


@pytest.fixture
def served(tmp_path: Path, checkpoints: Checkpoints) -> Home:
    """A registry home (SQLite) with task ``sentiment`` registered, its ``cache/onnx`` a
    regular file."""
    home = Home(tmp_path / "home")
    folder = checkpoints.copy(tmp_path / "trunk", num_layers=2)
    with Registry(home.sqlite_url, home.root) as registry:
        registry.plugins_dirs = (tmp_path / "plugins",)
        registry.add_trunk("tiny", folder)
        task = ("sentiment", ("classification", ("neg", "pos")), 1, 1, ("text",))
        publish_tasks(tmp_path, read_checkpoint(folder), [task], {"sentiment": "1.0.0"})
        registry.discover(refresh=True)
        registry.register(all=True)
    home.cache.mkdir(parents=True, exist_ok=True)
    home.onnx_cache.write_text("in the way")
    return home


@pytest.mark.slow
def test_a_file_where_the_onnx_cache_goes_is_one_line(served: Home) -> None:
    registry = Registry(served.sqlite_url, served.root)
    with registry, pytest.raises(StorageError) as caught:
        load_served("latest", None, "onnx", registry)
    assert str(caught.value) == (
        f"cannot write {served.onnx_cache}: File exists: a regular file is in the way: "
        "use another --home or --out"
    )
    assert served.onnx_cache.read_text() == "in the way"


@pytest.mark.slow
def test_serve_with_a_file_in_the_onnx_cache_way_exits_with_one_line(served: Home) -> None:
    values = {k: v for k, v in os.environ.items() if not k.startswith("MTREG_")}
    done = subprocess.run(
        [sys.executable, "-m", "mtreg", "--home", str(served.root), "serve", *SERVE],
        env=values,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: cannot write {served.onnx_cache}: File exists: a regular file is in the way: "
        "use another --home or --out"
    )


# -- the demo folder --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("file/demo", "Not a directory: a part of that path is a regular file: use another --dir"),
        ("file", None),  # click refuses a file as --dir itself (a usage error, exit 2)
    ],
    ids=["under-a-file", "a-file"],
)
def test_a_demo_folder_that_cannot_be_written_is_one_line(
    pool: CliPool, tmp_path: Path, where: str, error: str | None
) -> None:
    (tmp_path / "file").write_text("not a folder")
    values = {k: v for k, v in os.environ.items() if not k.startswith("MTREG_")}
    result = pool.run(values, "demo", "--dir", str(tmp_path / where))
    if error is None:
        assert result.code == 2 and "is a file" in result.stderr, result.stderr
    else:
        line = _one_line(result)
        assert line == f"Error: cannot write {tmp_path / where}: {error}"
    assert (tmp_path / "file").read_text() == "not a folder"
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["file"]'
