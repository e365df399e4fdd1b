"""Every command and example of README.md runs as written (issue 19, family 8).

The fenced blocks are read from the README itself, so a changed example is tested as changed
and a new block fails :func:`test_every_block_has_a_plan` until it is given one. They run
offline against a tiny registry: where a block needs the packaged MiniLM or the GLUE data,
the tiny random checkpoint and a few lines of GLUE-format data stand in (:data:`SETUP`).
What is not run, and why, is in :data:`PLAN` and :data:`SKIPPED`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from factories import Checkpoints
from harness import SQLITE_ONLY, registry_state

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)

# Each fenced block, by language and first line: what the tests do with it.
PLAN = {
    ("bash", "scripts/dev demo"): "skipped: it installs .venv (pip, network) and runs the demo "
    "on the packaged MiniLM, and the whole suite; CI runs both (.ci/run)",
    ("bash", "export MTREG_HOME"): "run: test_walkthrough_runs_as_written",
    ("bash", "curl"): "run: test_walkthrough_runs_as_written, against `mtreg serve`",
    ("bash", "# The Serving section's prediction, through the Open Inference Protocol"): "run: "
    "test_walkthrough_runs_as_written, against the same `mtreg serve`",
    ("python", "# With Triton's client"): "run: test_walkthrough_runs_as_written, against the "
    "same `mtreg serve`",
    ("python", "import mtreg"): "run: test_python_examples_run_as_written",
    ("bash", "# Releasing a task"): "run: tests/test_releases.py, "
    "test_readme_release_commands_run_as_written",
    ("bash", "# With a release under way"): "run: tests/test_releases.py, "
    "test_readme_release_commands_run_as_written, against `mtreg serve`",
    ("bash", "# Team setup"): "run: tests/test_remote_store.py, "
    "test_the_readme_team_setup_runs_as_written, on a moto S3 server",
    ("bash", "# Onboarding many tasks at once"): "skipped: it starts Ray clusters; "
    "tests/test_ray_onboard.py runs `onboard --all --engine ray` in a private network namespace",
    ("bash", "# Replicas on Ray Serve"): "skipped: it starts Ray clusters; "
    "tests/test_ray_serve.py runs `serve --engine ray` in a private network namespace",
    ("python", "# my_plugins/sentiment.py"): "run: the plugin of the Python API example",
    ("toml", "[project.entry-points.mtreg]"): "run: test_entry_point_table_is_mtregs_group",
    ("", "cli/"): "not code: the source layout",
}

# Walkthrough lines that need what is not here, replaced (a line starting with the key).
SETUP = {
    # The packaged MiniLM takes minutes to train: the tiny random BERT stands in as `minilm`.
    "MINILM=": "MINILM={trunk}",
    # The GLUE data is not shipped: a few separable lines in GLUE's own formats.
    "export MTREG_DATA_DIR=": "export MTREG_DATA_DIR={data}",
}
# Walkthrough commands not run, and why.
SKIPPED = {
    "pip install -e ./reviews": "would install into the shared .venv; "
    "test_scaffold.py installs the scaffolded package (pip --target) and onboards it",
    "pip install -U my-sentiment-plugin": "an example package name, not on any index",
    "mtreg serve": "runs until stopped; the Serving section's curl block is run against it",
}


def _blocks() -> list[tuple[str, str]]:
    """Return every fenced block of the README as (language, text)."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(README.read_text())]


def _block(language: str, first: str) -> str:
    (text,) = [t for lang, t in _blocks() if lang == language and t.startswith(first)]
    return text


def test_every_block_has_a_plan() -> None:
    matched = [
        [key for key in PLAN if key[0] == lang and text.startswith(key[1])]
        for lang, text in _blocks()
    ]
    assert all(len(keys) == 1 for keys in matched), f"blocks without one PLAN entry: {matched}"
    assert sorted(k for keys in matched for k in keys) == sorted(PLAN)


def test_dry_run_claim_is_true() -> None:
    """The commands the README says take ``--dry-run`` do."""
    from click.testing import CliRunner

    from mtreg.cli.main import cli

    (claim,) = re.findall(r"^(.*) take `--dry-run`", README.read_text(), re.MULTILINE)
    commands = re.findall(r"`([a-z]+)`", claim)
    assert commands == ["register", "sync", "rollback", "remove", "gc"]
    for command in commands:
        assert "--dry-run" in CliRunner().invoke(cli, [command, "--help"]).output, command


def test_entry_point_table_is_mtregs_group() -> None:
    table = tomllib.loads(_block("toml", "[project.entry-points.mtreg]"))
    group = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert set(table["project"]["entry-points"]) <= set(group)


def _glue_data(folder: Path) -> Path:
    """Write tiny, separable SST-2 and CoLA splits in GLUE's formats under ``folder``."""
    good, bad = ["good great fun", "a fine film"], ["bad awful mess", "a boring slow film"]
    for split, count in (("train", 24), ("dev", 8)):
        rows = [(good[i % 2] if i % 2 else bad[i % 2], i % 2) for i in range(count)]
        sst2 = folder / "glue" / "SST-2" / f"{split}.tsv"
        sst2.parent.mkdir(parents=True, exist_ok=True)
        sst2.write_text(
            "sentence\tlabel\n" + "".join(f"{t} {i}\t{y}\n" for i, (t, y) in enumerate(rows))
        )
        cola = folder / "glue" / "CoLA" / f"{split}.tsv"
        cola.parent.mkdir(parents=True, exist_ok=True)
        cola.write_text("".join(f"src\t{y}\t\t{t} {i}\n" for i, (t, y) in enumerate(rows)))
    return folder


def _script(block: str, **values: str) -> str:
    """Return the walkthrough as a bash script: SETUP lines replaced, SKIPPED commands out."""
    lines = []
    for line in block.splitlines():
        command = re.sub(r"\s+# .*$", "", line).strip()
        if not command or command.startswith("#"):
            continue
        setup = [v for k, v in SETUP.items() if command.startswith(k)]
        if setup:
            lines.append(setup[0].format(**values))
            continue
        kept = [c for c in command.split(" && ") if not any(c.startswith(s) for s in SKIPPED)]
        if kept:
            lines.append(" && ".join(kept))
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(tmp_path: Path, db_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTREG_")}
    env["HOME"] = str(tmp_path / "user")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    if not db_url.startswith("sqlite"):
        # The README's `mtreg init` makes SQLite in the home; `--db`/this selects PostgreSQL.
        env["MTREG_DATABASE_URL"] = db_url
    return env


@SQLITE_ONLY
def test_walkthrough_runs_as_written(checkpoints: Checkpoints, db_url: str, tmp_path: Path) -> None:
    """Steps 1-8 in order, as one bash script (``set -e``: the first failure stops it),
    then the Serving section's curl against ``mtreg serve`` on that registry."""
    work, home = tmp_path / "work", tmp_path / "user" / "mtreg-home"
    work.mkdir()
    (tmp_path / "user").mkdir()
    # `mtreg predict --input texts.jsonl` reads a file the README does not show.
    (work / "texts.jsonl").write_text('"a gripping, funny film"\n{"text": "a dull one"}\n')
    trunk = checkpoints.copy(tmp_path / "minilm", num_layers=4)
    script = _script(
        _block("bash", "export MTREG_HOME"),
        trunk=str(trunk),
        data=str(_glue_data(tmp_path / "data")),
    )
    env = _env(tmp_path, db_url)
    done = subprocess.run(
        ["bash", "-euxo", "pipefail", "-c", script],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    url = db_url if not db_url.startswith("sqlite") else f"sqlite:///{home / 'registry.db'}"
    state = registry_state(url, str(home))
    assert state["versions"] == {"cola": ["1.0.0"], "sst2": ["1.0.0"]}
    assert state["active"]["sst2"] == "1.0.0"
    for out in ("bundle-small", "bundle-onnx", "sst2-hf"):
        assert (work / out).is_dir(), out

    port = _free_port()
    env["MTREG_HOME"] = str(home)
    server = subprocess.Popen(
        [sys.executable, "-m", "mtreg", "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        curl = _block("bash", "curl").replace("8080", str(port))
        answer = _poll(lambda: subprocess.run(["bash", "-c", curl], capture_output=True, text=True))
        assert [set(r) for r in answer["results"]] == [{"sst2"}], answer
        v2 = _block("bash", "# The Serving section's prediction").replace("8080", str(port))
        answer = json.loads(subprocess.run(["bash", "-c", v2], capture_output=True).stdout)
        assert answer["id"] == "1" and answer["model_name"] == "sst2", answer
        triton = _block("python", "# With Triton's client").replace("8080", str(port))
        done = subprocess.run([sys.executable, "-c", triton], capture_output=True, text=True)
        assert done.returncode == 0 and "sentence" in done.stdout, done.stderr[-2000:]
    finally:
        server.terminate()
        server.wait(30)


def _poll(run, seconds: float = 60) -> dict:
    """Return the JSON ``run`` prints once the server answers (it loads the bundle first)."""
    deadline = time.monotonic() + seconds
    while True:
        done = run()
        if done.returncode == 0 and done.stdout.strip():
            return json.loads(done.stdout)
        assert time.monotonic() < deadline, (done.returncode, done.stdout, done.stderr)
        time.sleep(0.5)


def test_python_examples_run_as_written(
    checkpoints: Checkpoints, db_url: str, tmp_path: Path
) -> None:
    """The Python API example, with the plugin example as ``./my_plugins/sentiment.py``.

    Its branch file is a random one for the tiny trunk (training is tested elsewhere), and
    ``/path/to/minilm`` is the tiny checkpoint."""
    from factories import make_branch_file

    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.core.spec import HeadSpec

    trunk = checkpoints.copy(tmp_path / "minilm", num_layers=3)
    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    (plugins / "sentiment.py").write_text(_block("python", "# my_plugins/sentiment.py"))
    make_branch_file(
        plugins / "sentiment.safetensors", read_checkpoint(trunk), "sentiment", "1.0.0", 2, 1,
        HeadSpec("classification", ("negative", "positive")), max_length=64,
    )  # fmt: skip
    code = _block("python", "import mtreg").replace("/path/to/minilm", str(trunk))
    code += "\nprint(json.dumps(bundle.predict(['great value', 'arrived broken'])))\n"
    env = _env(tmp_path, db_url)
    (tmp_path / "user").mkdir()
    env["MTREG_HOME"] = str(tmp_path / "user" / "mtreg-home")  # what load_bundle("serving") reads
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "sentiment 1.0.0"
    answers = json.loads(lines[-1])
    assert [a["sentiment"]["label"] in ("negative", "positive") for a in answers] == [True, True]
