"""Test helpers: task plugins written to disk, and snapshots of a whole registry."""

from __future__ import annotations

import hashlib
import os
import pty
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, NoReturn

import pytest
import sqlalchemy as sa


def task_spec(
    name: str,
    weights: Path | str,
    version: str = "1.0.0",
    head: tuple[str, tuple[str, ...]] = ("classification", ("neg", "pos")),
    **more: Any,
) -> dict[str, Any]:
    """Return TaskSpec keyword arguments for :func:`write_plugin`: task ``name`` on the
    ``tiny`` trunk with branch file ``weights``."""
    return {
        "name": name,
        "version": version,
        "head": head,
        "weights": str(weights),
        "trunk": "tiny",
        **more,
    }


def write_plugin(directory: Path, module: str, tasks: list[dict[str, Any]]) -> Path:
    """Write a path plugin ``directory/module.py`` registering ``tasks``.

    Each task dict holds TaskSpec keyword arguments, with ``head`` as ``(kind, labels)``.
    Returns the plugin file's path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    calls = []
    for task in tasks:
        fields = dict(task)
        kind, labels = fields.pop("head")
        args = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        calls.append(
            f"    register(mtreg.TaskSpec({args}, head=mtreg.HeadSpec({kind!r}, {labels!r})))"
        )
    source = (
        textwrap.dedent(
            """\
        import mtreg


        @mtreg.hookimpl
        def register_tasks(register):
        """
        )
        + "\n".join(calls or ["    pass"])
        + "\n"
    )
    path = directory / f"{module}.py"
    path.write_text(source)
    return path


def publish_tasks(
    tmp: Path,
    checkpoint: Any,
    tasks: list[tuple],
    versions: dict[str, str],
    seed: int = 0,
) -> dict[str, Path]:
    """Write a branch file per task and plugin ``tmp/plugins/p.py`` offering them on trunk
    ``tiny``. ``tasks`` holds ``(name, (kind, labels), depth, layers, inputs)``.

    Returns task name -> weight file.
    """
    from factories import make_branch_file

    from mtreg.core.spec import HeadSpec

    files, specs = {}, []
    for name, head, depth, layers, inputs in tasks:
        version = versions[name]
        files[name] = make_branch_file(
            tmp / "w" / f"{name}-{version}.safetensors",
            checkpoint,
            name,
            version,
            depth,
            layers,
            HeadSpec(*head),
            seed=seed + len(name),
        )
        specs.append(
            {
                "name": name,
                "version": version,
                "head": head,
                "inputs": inputs,
                "weights": str(files[name]),
                "trunk": "tiny",
            }
        )
    write_plugin(tmp / "plugins", "p", specs)
    return files


def stamp(url: str, revision: str) -> None:
    """Write ``revision`` into a database's alembic_version (a database from elsewhere
    or from the future)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    engine.dispose()


def snapshot(url: str, home: Path) -> dict[str, Any]:
    """Return every row of every table and the sha256 of every file under ``home``.

    Two equal snapshots mean an operation changed nothing, in the database or on disk.
    """
    engine = sa.create_engine(url)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            rows = {
                name: sorted(
                    (tuple(str(v) for v in row) for row in conn.execute(table.select())),
                )
                for name, table in meta.tables.items()
            }
    finally:
        engine.dispose()
    files = {}
    for path in sorted(home.rglob("*")):
        # SQLite's own files change on every read (WAL, shm); the rows above cover them.
        if path.is_file() and not path.name.startswith("registry.db"):
            files[str(path.relative_to(home))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"rows": rows, "files": files}


# An ISO 8601 time to the second with its UTC offset, as mtreg shows every time.
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"
_ESCAPE = re.compile(r"\x1b\[(\??)(\d*)([A-Za-z])")


def screen(text: str) -> list[str]:
    """Return the rows a terminal shows after ``text``; the last row is the one the cursor
    is on. Understood: line feeds, carriage returns, cursor up (``ESC[nA``) and erase line
    (``ESC[2K``), what rich's live display uses; colours and cursor hiding are ignored."""
    rows: list[list[str]] = [[]]
    line = col = 0
    at = 0
    while at < len(text):
        escape = _ESCAPE.match(text, at)
        if escape:
            private, number, command = escape.groups()
            if command == "A" and not private:
                line = max(0, line - int(number or 1))
            elif command == "K" and not private:
                rows[line] = []
            at = escape.end()
            continue
        char = text[at]
        at += 1
        if char == "\n":
            line, col = line + 1, 0
            if line == len(rows):
                rows.append([])
        elif char == "\r":
            col = 0
        else:
            row = rows[line]
            row.extend(" " * (col - len(row)))
            row[col : col + 1] = [char]
            col += 1
    # Rows below the cursor that nothing was left on (a bar moved down, then erased) are
    # not part of what is shown.
    while len(rows) > line + 1 and not rows[-1]:
        rows.pop()
    return ["".join(row).rstrip() for row in rows]


def on_terminal(argv: list[str], env: dict[str, str], columns: int = 80) -> tuple[int, str]:
    """Run ``python -m mtreg *argv`` with stdout and stderr on a pseudo-terminal
    ``columns`` wide (a real process, as a user at a terminal runs it); return its exit
    code and everything it wrote, with the terminal's line endings (\\r\\n) as \\n."""
    main, child = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "mtreg", *argv],
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env={**os.environ, **env, "COLUMNS": str(columns), "TERM": "xterm"},
    )
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    code = process.wait(timeout=300)
    return code, b"".join(chunks).decode().replace("\r\n", "\n")


def ray_tmpdir() -> str:
    """Return a new short folder for a Ray's sessions and sockets (``RAY_TMPDIR``): Ray
    otherwise shares ``/tmp/ray`` with every other Ray on the machine (tests on other
    workers included), and a socket path must stay under 107 characters."""
    return tempfile.mkdtemp(prefix="ray", dir="/tmp")


def registered_bundle(tmp: Path, trunk: Path, tasks: list[tuple]) -> Path:
    """Publish ``tasks`` (as :func:`publish_tasks` takes them, all at 1.0.0) as plugins under
    ``tmp`` for the trunk checkpoint folder ``trunk``, register them in a SQLite registry
    there, and return the latest bundle's folder."""
    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.registry.api import Registry

    publish_tasks(tmp, read_checkpoint(trunk), tasks, {t[0]: "1.0.0" for t in tasks})
    with Registry(url=f"sqlite:///{tmp / 'r.db'}", home=tmp / "home") as registry:
        registry.plugins_dirs = (tmp / "plugins",)
        registry.add_trunk("tiny", trunk)
        registry.register(all=True)
        return registry.bundle_path("latest")


# Tasks as publish_tasks takes them, (task, head, fork depth, branch layers, inputs): every
# head kind and a pair task, forking at 0, 2, 3 and 4 (the last layer of a 4-layer trunk);
# the serving tests' bundle. ONE_TEXT_TASKS: those that read one text.
SERVING_TASKS = [
    ("sentiment", ("classification", ("neg", "pos")), 2, 1, ("text",)),
    ("topics", ("multilabel", ("a", "b", "c")), 0, 1, ("text",)),
    ("score", ("regression", ()), 4, 0, ("text",)),
    ("slots", ("tagging", ("O", "B-x", "I-x")), 2, 1, ("text",)),
    ("paraphrase", ("classification", ("no", "yes")), 3, 1, ("text_a", "text_b")),
]
ONE_TEXT_TASKS = ["sentiment", "topics", "score", "slots"]


MOUNT_PROBE = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"
LOOPBACK_UP = "ip link set lo up"  # first thing in a new network namespace, and its probe


def unshare(*namespaces: str) -> list[str]:
    """Return the argv prefix that runs a command in new ``namespaces`` (``unshare``'s flags).

    Root makes them directly. Any other user first makes a user namespace in which it is
    root (``--map-root-user``), which kernels with unprivileged user namespaces allow, so a
    newcomer's test run needs no sudo for the Ray, full-disk and read-only-home tests."""
    as_user = [] if os.geteuid() == 0 else ["--map-root-user"]
    return ["unshare", *as_user, *namespaces]


def missing(message: str) -> NoReturn:
    """Skip the calling test for ``message``; under CI (``CI=true``: .ci/run installs all the
    suite needs) fail it instead, so that nothing CI should run is ever skipped silently."""
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_namespaces(*namespaces: str, probe: str = MOUNT_PROBE) -> None:
    """Return when this machine can run shell ``probe`` inside :func:`unshare`'s
    ``namespaces`` (default: a tmpfs mounted in a private mount namespace, as the full-disk
    and read-only tests make their disks); otherwise :func:`missing` with the reason."""
    namespaces = namespaces or ("--mount",)
    if shutil.which("unshare") is None:
        missing("no `unshare` command here")
    try:
        done = subprocess.run(
            [*unshare(*namespaces), "sh", "-c", probe], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        missing(f"`unshare {' '.join(namespaces)}` failed: {exc}")
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        missing(
            f"cannot make private namespaces ({' '.join(namespaces)}): run as root, or allow "
            f"unprivileged user namespaces (sysctl user.max_user_namespaces): {reason[0]}"
        )


HUB_COMMIT = "a" * 40  # the revision hub_cache lays a download out at


def hub_cache(root: Path, repo: str, folder: Path) -> Path:
    """Lay ``folder`` out in ``root`` as huggingface_hub's cache holds a download of
    ``repo`` at ``main`` (revision :data:`HUB_COMMIT`); return ``root``."""
    entry = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / HUB_COMMIT)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(HUB_COMMIT)
    return root
