"""Home and database faults, through the real ``mtreg`` command, on SQLite and PostgreSQL: a
damaged SQLite file or ``alembic_version`` table, a malformed database URL, a mistyped or
impossible ``--home``, a read-only home and a full disk. Each ends in exit code 1 and one line
saying what to do (listing a read-only registry works), and changes nothing.

The read-only home and the full disk are real: a read-only bind mount and a small tmpfs, made
in a private mount namespace (``helpers.unshare``: root, or a user namespace) that vanishes
with the command.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from factories import Checkpoints, make_branch_file
from harness import CliPool, Databases, Result
from helpers import require_namespaces, snapshot, task_spec, unshare, write_plugin

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.artifacts.home import Home
from mtreg.core.spec import HeadSpec
from mtreg.registry import db
from mtreg.registry.api import Registry
from mtreg.registry.store import Store

# Every test runs real mtreg commands in their own processes.
pytestmark = pytest.mark.slow

HEAD = ("classification", ("neg", "pos"))


@dataclass
class World:
    """A registry with trunk ``tiny`` and task ``sentiment`` 1.0.0 served; plugin ``probe``
    offers a second task. On SQLite the database is the home's own ``registry.db``."""

    tmp: Path
    home: Path
    url: str
    trunk_dir: Path
    other_trunk: Path  # another checkpoint: adding it writes objects the store lacks
    databases: Databases

    def env(self, **overrides: str | Path) -> dict[str, str]:
        """The environment of an mtreg command on this registry."""
        base = {
            k: v for k, v in os.environ.items() if k not in ("MTREG_FAULT", "MTREG_LOAD_PLUGINS")
        }
        base |= {
            "MTREG_HOME": str(self.home),
            "MTREG_DATABASE_URL": self.url,
            "MTREG_PLUGINS_PATH": f"{self.tmp / 'plugins-base'}{os.pathsep}{self.tmp / 'probe'}",
        }
        return {**base, **{k: str(v) for k, v in overrides.items()}}


@pytest.fixture(scope="module")
def world(
    databases: Databases, checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("home-world")
    home = tmp / "home"
    url = Home(home).sqlite_url if databases.kind == "sqlite" else databases.new()
    trunk_dir = checkpoints.copy(tmp / "trunk", num_layers=3, seed=0)
    other_trunk = checkpoints.copy(tmp / "other-trunk", num_layers=3, seed=1)
    checkpoint = read_checkpoint(trunk_dir)
    for name, folder in (("sentiment", "plugins-base"), ("probe", "probe")):
        weights = make_branch_file(
            tmp / "weights" / f"{name}.safetensors",
            checkpoint,
            name,
            "1.0.0",
            2,
            1,
            HeadSpec(*HEAD),
        )
        write_plugin(tmp / folder, name, [task_spec(name, weights, head=HEAD)])
    with Registry(url=url, home=home, plugins_dirs=[tmp / "plugins-base"]) as registry:
        registry.add_trunk("tiny", trunk_dir)
        registry.register(["sentiment"], promote=True)
    yield World(tmp, home, url, trunk_dir, other_trunk, databases)


def _one_line_error(result: Result, message: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.code == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message.lower() in lines[0].lower(), lines[0]


def _hashes(root: Path) -> dict[str, str]:
    """The sha256 of every file under ``root`` (a SQLite file's own bytes included)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- a damaged database ----------------------------------------------------------------------

ALEMBIC_DAMAGE = [
    ("row-missing", "DELETE FROM alembic_version", "no mtreg migration history"),
    ("table-dropped", "DROP TABLE alembic_version", "no mtreg migration history"),
    (
        "garbage-revision",
        "UPDATE alembic_version SET version_num = 'garbage!!'",
        "revision 'garbage!!' is unknown here",
    ),
    ("two-rows", "INSERT INTO alembic_version VALUES ('0000')", "damaged alembic_version table"),
]


@pytest.mark.parametrize(
    ("sql", "message"), [c[1:] for c in ALEMBIC_DAMAGE], ids=[c[0] for c in ALEMBIC_DAMAGE]
)
def test_a_damaged_alembic_version_is_a_one_line_error(
    pool: CliPool, world: World, sql: str, message: str
) -> None:
    url, home = world.databases.new(), world.tmp / "scratch-home"
    Store(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)
    engine.dispose()
    before = snapshot(url, home)
    for argv in (["list"], ["trunk", "add", "other", str(world.trunk_dir)]):
        result = pool.run(world.env(MTREG_DATABASE_URL=url, MTREG_HOME=home), *argv)
        _one_line_error(result, message)
        assert "restore" in result.stderr or "upgrade mtreg" in result.stderr
    assert snapshot(url, home) == before


def _random_bytes(path: Path) -> None:
    path.write_bytes(hashlib.sha256(b"x").digest() * 200)


def _text(path: Path) -> None:
    path.write_text("these are my notes, not a database\n")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:4096])  # the header and one page of many


def _zeroed_tables(path: Path) -> None:
    data = path.read_bytes()
    # The header and the schema page intact, the size right, every table's pages zeroed.
    path.write_bytes(data[:4096] + bytes(len(data) - 4096))


@pytest.mark.parametrize("damage", [_random_bytes, _text, _truncated, _zeroed_tables])
def test_a_damaged_sqlite_file_is_a_one_line_error(
    pool: CliPool, tmp_path: Path, damage: Any
) -> None:
    home = Home(tmp_path / "home")
    Store(home.sqlite_url).close()
    damage(home.database_file)
    before = _hashes(home.root)
    env = {**os.environ, "MTREG_HOME": str(home.root)}
    env.pop("MTREG_DATABASE_URL", None)
    for argv in (["list"], ["bundle", "list"], ["init"]):
        result = pool.run(env, *argv)
        _one_line_error(result, "is damaged or not an mtreg registry")
        assert "restore it from a backup" in result.stderr
    assert _hashes(home.root) == before


# -- a malformed URL, a mistyped or impossible home ------------------------------------------

BAD_URLS = [
    (
        "port-not-a-number",
        "postgresql+psycopg://u:secret@host:notaport/db",
        "cannot use database URL",
    ),
    ("unknown-dialect", "nosuchdb://u@host/db", "cannot use database URL"),
    ("missing-driver", "mysql://u:secret@host/db", "No module named"),
    ("postgres-driver-missing", "postgresql+asyncpg://u:secret@host/db", "mtreg[postgres]"),
]


@pytest.mark.parametrize(
    ("url", "message"), [c[1:] for c in BAD_URLS], ids=[c[0] for c in BAD_URLS]
)
def test_a_malformed_database_url_is_a_one_line_error(
    pool: CliPool, tmp_path: Path, url: str, message: str
) -> None:
    env = {**os.environ, "MTREG_HOME": str(tmp_path / "home"), "MTREG_DATABASE_URL": url}
    result = pool.run(env, "list")
    _one_line_error(result, message)
    assert "secret" not in result.stderr and "--db" in result.stderr
    assert not (tmp_path / "home").exists()


def test_a_sqlite_url_in_a_missing_folder_is_refused_not_created(
    pool: CliPool, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'typo' / 'registry.db'}"
    env = {**os.environ, "MTREG_HOME": str(tmp_path / "home"), "MTREG_DATABASE_URL": url}
    result = pool.run(env, "list")
    _one_line_error(result, f"no registry at {url} (no folder {tmp_path / 'typo'})")
    assert "run `mtreg init`" in result.stderr and "--db" in result.stderr
    assert not (tmp_path / "typo").exists()
    assert pool.run(env, "init").code == 0 and pool.run(env, "list").code == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["list"],
        ["trunk", "add", "tiny", "{TRUNK}"],
        ["register", "probe"],
        ["bundle", "show", "latest"],
        ["export", "--out", "{TMP}/export"],
        ["db", "current"],
        ["db", "check"],
    ],
    ids=lambda argv: argv[0] + ("-" + argv[1] if argv[0] in ("trunk", "bundle", "db") else ""),
)
def test_a_mistyped_home_is_refused_not_created(
    pool: CliPool, world: World, tmp_path: Path, argv: list[str]
) -> None:
    typo = tmp_path / "hme"
    env = world.env(MTREG_HOME=typo)
    env.pop("MTREG_DATABASE_URL")
    args = [
        a.replace("{TRUNK}", str(world.trunk_dir)).replace("{TMP}", str(tmp_path)) for a in argv
    ]
    result = pool.run(env, *args)
    _one_line_error(result, f"no registry at {typo} (no registry.db): run `mtreg init`")
    assert "--home" in result.stderr
    assert not typo.exists() and not (tmp_path / "export").exists()


def test_init_creates_the_registry_that_other_commands_then_use(
    pool: CliPool, tmp_path: Path
) -> None:
    env = {**os.environ, "MTREG_HOME": str(tmp_path / "new")}
    env.pop("MTREG_DATABASE_URL", None)
    assert pool.run(env, "init").code == 0
    listed = pool.run(env, "list")
    assert listed.code == 0 and listed.stderr == "" and "no tasks registered" in listed.stdout


def test_a_home_under_a_regular_file_is_a_one_line_error(pool: CliPool, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    env = {**os.environ, "MTREG_HOME": str(tmp_path / "notes.txt" / "home")}
    env.pop("MTREG_DATABASE_URL", None)
    _one_line_error(pool.run(env, "list"), "no registry at")
    _one_line_error(pool.run(env, "init"), "Not a directory: a part of that path is a regular file")
    db_under_file = {
        **env,
        "MTREG_HOME": str(tmp_path / "home"),
        "MTREG_DATABASE_URL": f"sqlite:///{tmp_path / 'notes.txt' / 'r.db'}",
    }
    _one_line_error(pool.run(db_under_file, "list"), "no registry at")
    _one_line_error(pool.run(db_under_file, "init"), "a regular file is in the way")
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder\n"


def test_a_postgres_role_without_rights_is_a_one_line_error() -> None:
    # A role that may not create tables where the URL points (PostgreSQL's SQLSTATE 42501);
    # a CI role creates databases of its own, where it may, so the error is made by hand.
    denied = type("InsufficientPrivilege", (Exception,), {"sqlstate": "42501"})
    exc = sa.exc.ProgrammingError("CREATE TABLE alembic_version", {}, denied("permission denied"))
    assert db.is_fault(exc)
    message = str(db.failure("postgresql://u@h/d", exc, "unused"))
    assert message.startswith("database postgresql://u@h/d refuses this user (permission denied)")
    assert "grant it the rights" in message
    assert not db.is_fault(sa.exc.IntegrityError("INSERT", {}, Exception("duplicate key")))


# -- a read-only home and a full disk, in a private mount namespace ---------------------------


@pytest.fixture(scope="module")
def namespace() -> None:
    """Skip (with the reason; fail under CI) where the tests cannot make mounts of their own."""
    require_namespaces()


def in_namespace(
    env: dict[str, str], setup: str, commands: Sequence[Sequence[str]], out: Path, after: str = ""
) -> list[Result]:
    """Run shell ``setup``, then each mtreg command, then shell ``after``, in a private mount
    namespace whose mounts vanish with it. Returns how each command ended."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["set -e", setup, "set +e"]
    for i, argv in enumerate(commands):
        run = shlex.join([sys.executable, "-m", "mtreg", *argv])
        lines.append(f"{run} >{out}/{i}.out 2>{out}/{i}.err; echo $? >{out}/{i}.code")
    lines.append(after)
    done = subprocess.run(
        [*unshare("--mount"), "bash", "-c", "\n".join(lines)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return [
        Result(
            int((out / f"{i}.code").read_text()),
            (out / f"{i}.out").read_text(),
            (out / f"{i}.err").read_text(),
        )
        for i in range(len(commands))
    ]


def test_a_read_only_home_lists_and_refuses_writes_in_one_line(
    namespace: None, world: World, tmp_path: Path
) -> None:
    home = shlex.quote(str(world.home))
    setup = f"mount --bind {home} {home} && mount -o remount,bind,ro {home}"
    before, sqlite_before = snapshot(world.url, world.home), _hashes(world.home)
    listed, trunk, register = in_namespace(
        world.env(),
        setup,
        [["list"], ["trunk", "add", "other", str(world.other_trunk)], ["register", "probe"]],
        tmp_path / "out",
    )
    assert listed.code == 0, listed.stderr
    assert "sentiment" in listed.stdout and listed.stderr == ""
    for result in (trunk, register):
        _one_line_error(result, "read-only")
        assert "writable" in result.stderr
    assert snapshot(world.url, world.home) == before
    assert _hashes(world.home) == sqlite_before  # not even SQLite's own files


FILL = """python3 - "$MNT" {leave} <<'PY'
import os, sys
st = os.statvfs(sys.argv[1])
with open(os.path.join(sys.argv[1], "filler"), "wb") as handle:
    try:
        handle.write(bytes(max(st.f_bavail * st.f_frsize - int(sys.argv[2]), 0)))
    except OSError:
        pass
PY"""


@pytest.mark.parametrize(
    ("argv", "leave"),
    [
        # Room for the first objects, not for the rest: the ones stored are removed again.
        (["trunk", "add", "other", "{TRUNK}"], 64 * 1024),
        (["register", "probe"], 0),
        # Room for part of the copy: the half-written export folder is removed.
        (["export", "--out", "{MNT}/export"], 48 * 1024),
        # The weights are the first file written: safetensors' own writer raised a
        # SafetensorError here (a traceback), now write_safetensors' OSError.
        (["export", "--format", "hf", "--tasks", "sentiment", "--out", "{MNT}/hf"], 0),
    ],
    ids=["trunk-add", "register", "export", "export-hf"],
)
def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(
    namespace: None, world: World, tmp_path: Path, argv: list[str], leave: int
) -> None:
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    setup = "\n".join(
        [
            f"MNT={shlex.quote(str(mnt))}",
            'mount -t tmpfs -o size=4m tmpfs "$MNT"',
            f'cp -a {shlex.quote(str(world.home))} "$MNT/home"',
            FILL.format(leave=leave),
        ]
    )
    # What the tmpfs held afterwards is copied out before the namespace (and the tmpfs) ends.
    after = f'rm -f "$MNT/filler"; ls -A "$MNT" >{out}/listing; cp -a "$MNT/home" {out}/home'
    args = [a.replace("{TRUNK}", str(world.other_trunk)).replace("{MNT}", str(mnt)) for a in argv]
    before = snapshot(world.url, world.home)
    (result,) = in_namespace(world.env(MTREG_HOME=mnt / "home"), setup, [args], out, after)
    _one_line_error(result, "No space left on device: free space on that disk and retry")
    assert (out / "listing").read_text().split() == ["home"]  # no export, no leftovers
    assert snapshot(world.url, out / "home") == before


def test_a_sqlite_registry_on_a_full_disk_is_a_one_line_error(
    namespace: None, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    home, mnt, out = Home(tmp_path / "home"), tmp_path / "mnt", tmp_path / "out"
    Store(home.sqlite_url).close()
    mnt.mkdir()
    setup = "\n".join(
        [
            f"MNT={shlex.quote(str(mnt))}",
            'mount -t tmpfs -o size=1m tmpfs "$MNT"',
            f'cp -a {shlex.quote(str(home.root))} "$MNT/home"',
            FILL.format(leave=0),
        ]
    )
    after = f'cp "$MNT/home/registry.db" {out}/registry.db'
    env = {**os.environ, "MTREG_HOME": str(mnt / "home")}
    env.pop("MTREG_DATABASE_URL", None)
    trunk = checkpoints.copy(tmp_path / "trunk", num_layers=3, seed=0)
    commands = [["list"], ["trunk", "add", "tiny", str(trunk)]]
    for result in in_namespace(env, setup, commands, out, after):
        _one_line_error(result, "is on a full or failing disk")
        assert "free space on that disk and retry" in result.stderr
    assert _hashes(out)["registry.db"] == _hashes(home.root)["registry.db"]
