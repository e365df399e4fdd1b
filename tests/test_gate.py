"""The quality gate of reduced-precision backends (#21): every backend scored on each task's
real dev split against torch fp32, the fastest eligible one chosen by default, an explicit
--backend honoured (with a warning when ineligible), and an edited gate refused.

One registry per module (a tiny random trunk, a classification task on one text and a
regression task on pairs, both with a dataset loader) and one gate computed on it: the
gate costs an ONNX export, three quantisations and ~15 s of timing."""

from __future__ import annotations

import dataclasses
import json
import logging
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from factories import Checkpoints, make_branch_file
from harness import Step

import mtreg
from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.artifacts.gate_file import BACKEND_FILES, GATE_FILE, PROBE_SIZES, read_gate
from mtreg.artifacts.home import Home
from mtreg.core.spec import HeadSpec
from mtreg.errors import Damaged, MtregError
from mtreg.registry.api import Registry
from mtreg.runtime.backends import choose, gate_folder
from mtreg.runtime.bundle import LoadedBundle
from mtreg.runtime.gate import TaskData

SENT = HeadSpec("classification", ("negative", "positive"))
SIM = HeadSpec("regression")
PLUGIN = textwrap.dedent(
    """
    import random

    import mtreg

    WORDS = ["good", "bad", "the", "film", "was", "slow", "fun", "it", "awful", "fine"]


    def sent(split):
        rng = random.Random(split)
        for i in range({{"train": 64, "dev": 48}}[split]):
            label = ["negative", "positive"][i % 2]
            yield {{"text": " ".join(rng.sample(WORDS, 4)), "label": label}}


    def sim(split):
        rng = random.Random(split + "sim")
        for _ in range({{"train": 64, "dev": 48}}[split]):
            a, b = " ".join(rng.sample(WORDS, 3)), " ".join(rng.sample(WORDS, 3))
            yield {{"text": a, "text_pair": b, "label": rng.uniform(0, 5)}}


    def fine(split):
        # Gold values spread over 1e-3 only: an output off by 1e-5 no longer agrees.
        rng = random.Random(split + "fine")
        for _ in range({{"train": 64, "dev": 48}}[split]):
            yield {{"text": " ".join(rng.sample(WORDS, 4)), "label": rng.uniform(0, 1e-3)}}


    @mtreg.hookimpl
    def register_tasks(register):
        register(mtreg.TaskSpec(name="sent", version="1.0.0", trunk="tiny", weights={sent!r},
            head=mtreg.HeadSpec("classification", ("negative", "positive")),
            load_dataset=sent, metrics=("accuracy",), max_length=32))
        register(mtreg.TaskSpec(name="sim", version="1.0.0", trunk="tiny", weights={sim!r},
            head=mtreg.HeadSpec("regression"), inputs=("text", "text_pair"),
            load_dataset=sim, metrics=("pearson",), max_length=32))
        register(mtreg.TaskSpec(name="fine", version="1.0.0", trunk="tiny", weights={fine!r},
            head=mtreg.HeadSpec("regression"), load_dataset=fine, metrics=("pearson",),
            max_length=32))
    """
)


@dataclasses.dataclass(frozen=True)
class World:
    root: Path
    registry: Registry
    bundle_id: str
    gate: Any
    shown: Any
    env: dict[str, str]


TASKS = ["sent", "sim", "fine"]


def _task_data(registry: Registry) -> dict[str, TaskData]:
    data = {}
    for name in TASKS:
        spec = registry.discover().task(name).spec
        dev = list(spec.load_dataset("dev"))
        data[name] = TaskData(spec.metrics, dev, list(spec.load_dataset("train"))[:16])
    return data


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints, pool) -> World:
    root = tmp_path_factory.mktemp("gate")
    trunk = checkpoints.copy(root / "ckpt", num_layers=3, seed=0)
    checkpoint = read_checkpoint(trunk)
    weights = {
        "sent": make_branch_file(root / "s.safetensors", checkpoint, "sent", "1.0.0", 2, 1, SENT),
        "sim": make_branch_file(root / "r.safetensors", checkpoint, "sim", "1.0.0", 1, 1, SIM, 3),
        "fine": make_branch_file(root / "f.safetensors", checkpoint, "fine", "1.0.0", 2, 1, SIM, 5),
    }
    (root / "plugins").mkdir()
    (root / "plugins" / "gated.py").write_text(
        PLUGIN.format(**{k: str(v) for k, v in weights.items()})
    )
    url = f"sqlite:///{root / 'registry.db'}"
    registry = Registry(url, root / "home", [root / "plugins"])
    registry.add_trunk("tiny", trunk)
    registry.register(TASKS)
    record = registry.bundle("latest")
    env = {
        "MTREG_HOME": str(root / "home"),
        "MTREG_DATABASE_URL": url,
        "MTREG_PLUGINS_PATH": str(root / "plugins"),
    }
    # The gate is computed once, by the command users run.
    shown = pool.jobs([[Step(env, ("bundle", "gate", "latest"))]], timeout=900)[0][0]
    assert shown.code == 0, shown.stderr
    gate = read_gate(gate_folder(record.id, registry.home))
    yield World(root, registry, record.id, gate, shown, env)
    registry.close()


INPUTS = ["the film was fun", ("good film", "awful film"), "it was slow and bad"]
# How far each backend's logits may stray from torch fp32's on the tiny random model.
BOUND = {"torch": 0, "onnx-fp32": 1e-4, "torch-bf16": 0.05}


@pytest.mark.parametrize("backend", list(BACKEND_FILES))
def test_every_backend_is_scored_on_each_dev_split(world: World, backend: str) -> None:
    entry = world.gate.backends[backend]
    assert entry.reason is None, entry.reason
    assert set(entry.tasks) == set(TASKS)
    assert set(entry.seconds) == set(PROBE_SIZES) and min(entry.seconds.values()) > 0
    for task, score in entry.tasks.items():
        assert score.metric_name == {"sent": "accuracy"}.get(task, "pearson")
        assert 0 <= score.agreement <= 1
        assert score.reference == world.gate.backends["torch"].tasks[task].metric
        assert score.eligible == (score.agreement >= 0.99 and score.drop <= 0.005)
    if backend == "torch":
        assert all(s.agreement == 1 and s.drop == 0 and s.eligible for s in entry.tasks.values())
    # Its outputs, loaded by name, are close to fp32's (int8 within what quantisation moves).
    loaded = mtreg.load_bundle("latest", backend=backend, registry=world.registry)
    reference = mtreg.load_bundle("latest", backend="torch", registry=world.registry)
    for task in ("sent", "sim"):
        inputs = [i for i in INPUTS if isinstance(i, tuple) == (task == "sim")]
        got = loaded.logits(inputs, [task])[task][0]
        want = reference.logits(inputs, [task])[task][0]
        assert (got - want).abs().max() <= BOUND.get(backend, 0.5)


def test_a_task_finer_than_the_noise_makes_reduced_precision_ineligible(world: World) -> None:
    for name in ("torch-bf16", "onnx-int8", "onnx-int8-static"):
        assert world.gate.backends[name].tasks["fine"].agreement < 0.99
        assert not world.gate.backends[name].eligible(TASKS)
    # float32 rounding in another order stays far inside the slack.
    assert world.gate.backends["onnx-fp32"].tasks["fine"].agreement == 1


def test_gate_file_round_trips_and_is_listed_in_onnx_json(world: World) -> None:
    folder = gate_folder(world.bundle_id, world.registry.home)
    written = world.root / "again"
    written.mkdir(exist_ok=True)
    assert read_gate(world.gate.write(written).parent) == world.gate
    listed = json.loads((folder / "onnx.json").read_text())["files"]
    assert GATE_FILE in listed and set(filter(None, BACKEND_FILES.values())) <= set(listed)


def test_cli_prints_the_gate_table(world: World) -> None:
    lines = world.shown.stdout.splitlines()
    assert lines[0].split()[:7] == [
        "BACKEND",
        "TASK",
        "AGREEMENT",
        "METRIC",
        "FP32",
        "DROP",
        "ELIGIBLE",
    ]
    assert len([line for line in lines if line.startswith("onnx-int8 ")]) == len(TASKS)
    assert lines[-1].startswith("tolerance: agreement >= 99.00%, metric drop <= 0.0050")
    assert "default backend: " in lines[-1]


@pytest.mark.parametrize("tasks", [TASKS, ["sent"], ["sim"], ["fine"]])
def test_the_fastest_eligible_backend_is_the_default(
    world: World, caplog: pytest.LogCaptureFixture, tasks: list[str]
) -> None:
    with caplog.at_level(logging.INFO, logger="mtreg.runtime"):
        loaded = mtreg.load_bundle("latest", tasks=tasks, registry=world.registry)
    assert loaded.choice is not None and loaded.choice.line() in caplog.messages
    for size in PROBE_SIZES:
        name = loaded.choice.backends[size]
        assert name == "torch" or world.gate.backends[name].eligible(tasks)
        fastest = min(
            (n for n, b in world.gate.backends.items() if n == "torch" or b.eligible(tasks)),
            key=lambda n: world.gate.backends[n].seconds[size],
        )
        assert name == fastest
        if len(set(loaded.choice.backends.values())) > 1:
            assert loaded.model.backend_for(size) == name
        base = world.gate.backends["torch"].seconds[size]
        assert loaded.choice.speedup[size] == base / world.gate.backends[name].seconds[size]
    one_text = [t for t in tasks if t != "sim"]
    if one_text:
        assert set(loaded.predict(["the film was fun"], one_text)[0]) == set(one_text)


@pytest.mark.parametrize("backend", [n for n in BACKEND_FILES if n != "torch"])
def test_an_ineligible_backend_is_never_chosen(world: World, backend: str) -> None:
    entry = world.gate.backends[backend]
    worse = dataclasses.replace(entry.tasks["sent"], eligible=False)
    ineligible = dataclasses.replace(entry, tasks={**entry.tasks, "sent": worse})
    gate = dataclasses.replace(world.gate, backends={**world.gate.backends, backend: ineligible})
    assert backend not in choose(gate, ["sent"], tuple(BACKEND_FILES)).values()
    assert backend not in choose(gate, ["sent", "sim"], tuple(BACKEND_FILES)).values()


def test_an_explicit_ineligible_backend_runs_with_a_warning(world: World) -> None:
    loaded = mtreg.load_bundle("latest", backend="torch-bf16", registry=world.registry)
    assert loaded.choice is not None and set(loaded.choice.backends.values()) == {"torch-bf16"}
    assert "not within the quality gate" in loaded.choice.line()


def test_no_gate_serves_fp32_with_a_hint(world: World, tmp_path: Path) -> None:
    path = world.registry.bundle_dir(world.registry.bundle("latest"))
    home = Home(tmp_path / "empty-home")
    loaded = LoadedBundle(path, expected_id=world.bundle_id, backend="fastest", home=home)
    assert loaded.choice is not None and set(loaded.choice.backends.values()) == {"torch"}
    assert "mtreg bundle gate" in loaded.choice.line()
    with pytest.raises(MtregError, match="mtreg bundle gate"):
        LoadedBundle(path, expected_id=world.bundle_id, backend="onnx-int8", home=home)


@pytest.mark.parametrize("target", [GATE_FILE, "model.int8-pc.onnx"])
def test_an_edited_gate_is_refused_by_load_and_verify(world: World, target: str) -> None:
    file = gate_folder(world.bundle_id, world.registry.home) / target
    original = file.read_bytes()
    edited = original.replace(b'"eligible": false', b'"eligible": true ')
    file.write_bytes(edited if edited != original else original + b" ")
    try:
        with pytest.raises(Damaged, match=target.replace(".", r"\.")):
            mtreg.load_bundle("latest", registry=world.registry)
        report = world.registry.verify()
        assert [f.kind for f in report.damaged] == ["onnx"]
        assert target in report.damaged[0].problem
    finally:
        file.write_bytes(original)
    assert mtreg.load_bundle("latest", registry=world.registry).choice is not None


def test_predict_prints_the_default_and_honours_backend(world: World, pool) -> None:
    default = pool.run(
        world.env, "predict", "--bundle", "latest", "the film was fun", "--tasks", "sent"
    )
    assert default.code == 0, default.stderr
    expected = choose(world.gate, ["sent"], tuple(BACKEND_FILES))
    line = default.stderr.strip().splitlines()[-1]
    assert line.startswith("backend: ") and all(name in line for name in expected.values())
    forced = pool.run(
        world.env,
        "predict",
        "--bundle",
        "latest",
        "fun",
        "--tasks",
        "sent",
        "--backend",
        "torch-bf16",
    )
    assert forced.code == 0, forced.stderr
    assert "backend: torch-bf16 at every batch size" in forced.stderr
    assert json.loads(forced.stdout)["predictions"]["sent"]["label"] in ("negative", "positive")
    wrong = pool.run(world.env, "predict", "--bundle", "latest", "fun", "--backend", "int4")
    assert wrong.code == 2 and len(wrong.stderr.strip().splitlines()) == 1


def test_gate_refuses_a_task_without_dev_data_in_one_line(
    tmp_path: Path, checkpoints: Checkpoints, pool
) -> None:
    trunk = checkpoints.copy(tmp_path / "ckpt", num_layers=3, seed=0)
    weights = make_branch_file(
        tmp_path / "s.safetensors", read_checkpoint(trunk), "plain", "1.0.0", 2, 1, SENT
    )
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "plain.py").write_text(
        "import mtreg\n\n\n@mtreg.hookimpl\ndef register_tasks(register):\n"
        f"    register(mtreg.TaskSpec(name='plain', version='1.0.0', trunk='tiny', "
        f"weights={str(weights)!r}, head=mtreg.HeadSpec('classification', "
        "('negative', 'positive'))))\n"
    )
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with Registry(url, tmp_path / "home", [tmp_path / "plugins"]) as registry:
        registry.add_trunk("tiny", trunk)
        registry.register(["plain"])
    env = {
        "MTREG_HOME": str(tmp_path / "home"),
        "MTREG_DATABASE_URL": url,
        "MTREG_PLUGINS_PATH": str(tmp_path / "plugins"),
    }
    refused = pool.run(env, "bundle", "gate")
    assert refused.code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "task 'plain' has no dataset loader" in refused.stderr
    assert not (tmp_path / "home" / "cache" / "onnx").exists()
    missing = pool.run(env, "bundle", "gate", "nosuch")
    assert missing.code == 1 and "nosuch" in missing.stderr


def test_tasks_sharing_dev_inputs_are_scored_in_one_pass_as_if_alone(world: World) -> None:
    from mtreg.runtime.gate import _dev_outputs
    from mtreg.runtime.quantize import calibration_feeds

    loaded = LoadedBundle(
        world.registry.bundle_dir(world.registry.bundle("latest")),
        expected_id=world.bundle_id,
    )
    data = _task_data(world.registry)
    # "fine" reads the same texts as "sent" (with its own regression labels).
    texts = [
        {**f, "text": s["text"]} for s, f in zip(data["sent"].dev, data["fine"].dev, strict=True)
    ]
    shared = {"sent": data["sent"], "fine": dataclasses.replace(data["fine"], dev=texts)}
    together = _dev_outputs(loaded, loaded.model, {**shared, "sim": data["sim"]})
    for task, task_data in shared.items():
        (alone,) = _dev_outputs(loaded, loaded.model, {task: task_data}).values()
        assert len(together[task][0]) == len(task_data.dev)
        for a, b in zip(alone[0], together[task][0], strict=True):
            assert (a - b).abs().max() <= 1e-5
    # Calibration feeds an input two tasks reading it the same way hold once.
    examples = data["sent"].calibration
    one = calibration_feeds(loaded, {"sent": examples})
    both = calibration_feeds(loaded, {"sent": examples, "fine": examples})
    assert len(both) == len(one) and all(
        (a["input_ids"] == b["input_ids"]).all() for a, b in zip(one, both, strict=True)
    )


def test_timing_stops_at_one_call_for_a_backend_clearly_slower_than_fp32() -> None:
    import torch

    from mtreg.runtime.gate import _seconds

    calls: list[int] = []

    def model(input_ids, attention_mask, token_type_ids=None, tasks=None):
        calls.append(len(tasks))
        time.sleep(0.02)  # a call's cost: fp32 is timed for at least half a second
        return {}

    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4)}
    _seconds(model, batch, ["sent"], reference=1e-12)
    assert len(calls) == 2  # the warm-up and one timed call
    calls.clear()
    _seconds(model, batch, ["sent"], reference=None)
    assert len(calls) >= 4  # fp32 itself: the warm-up and at least three timed calls
