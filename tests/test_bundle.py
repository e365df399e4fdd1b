"""Bundles as users load them: outputs, subset loading, damage detection, predict, export
(dir, ONNX, transformers) and the guarantees of rebuilds (deeper forks, upgrades)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from factories import Checkpoints
from helpers import publish_tasks

import mtreg
from mtreg.artifacts.branch_file import read_branch
from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.errors import InvalidWeights, MtregError, NotFound
from mtreg.nn.layers import Branch
from mtreg.nn.network import Standalone, Trunk
from mtreg.registry.api import Registry
from mtreg.runtime.bundle import load_bundle
from mtreg.runtime.export import export_dir, export_hf, export_onnx
from mtreg.runtime.inference import Row

# (task, head, fork depth, branch layers, inputs): forks at 0, 2 and 4 (the last layer).
TASKS = [
    ("sentiment", ("classification", ("neg", "pos")), 2, 1, ("text",)),
    ("topics", ("multilabel", ("a", "b", "c")), 0, 2, ("text",)),
    ("score", ("regression", ()), 4, 0, ("text",)),
    ("slots", ("tagging", ("O", "B-x", "I-x")), 2, 2, ("text",)),
    ("paraphrase", ("classification", ("no", "yes")), 4, 1, ("text_a", "text_b")),
]
TEXTS = ["the movie was great", "i want a refund for my order now", "what"]


class Setup:
    def __init__(self, tmp: Path, checkpoints: Checkpoints, model_type: str = "bert") -> None:
        self.tmp = tmp
        self.folder = checkpoints.copy(tmp / "trunk", num_layers=4, model_type=model_type)
        self.checkpoint = read_checkpoint(self.folder)
        self.registry = Registry(url=f"sqlite:///{tmp / 'r.db'}", home=tmp / "home")
        self.registry.plugins_dirs = (tmp / "plugins",)
        self.registry.add_trunk("tiny", self.folder)
        self.files: dict[str, Path] = {}

    def publish(self, tasks=TASKS, version: str = "1.0.0", seed: int = 0) -> None:
        versions = {task[0]: version for task in tasks}
        self.files.update(publish_tasks(self.tmp, self.checkpoint, tasks, versions, seed))
        self.registry.discover(refresh=True)

    def standalone(self, task: str) -> Standalone:
        """The task alone, built from the original trunk folder and weight file."""
        meta, tensors = read_branch(self.files[task], self.checkpoint.config)
        trunk = Trunk.from_tensors(
            self.checkpoint.config,
            self.checkpoint.embeddings,
            self.checkpoint.layers[: meta.fork_depth],
        )
        branch = Branch(self.checkpoint.config, meta.num_layers, meta.head)
        branch.load_state_dict(tensors)
        return Standalone(trunk, meta.fork_depth, branch).eval()


@pytest.fixture
def setup(tmp_path: Path, checkpoints: Checkpoints):
    s = Setup(tmp_path, checkpoints)
    s.publish()
    s.registry.register(all=True)
    yield s
    s.registry.close()


def _inputs(bundle, task: str) -> dict:
    info = bundle.info[task]
    items = [(t, t) for t in TEXTS] if len(info.inputs) == 2 else TEXTS
    return bundle.encode(items, info)["batch"]


def test_bundle_outputs_equal_each_task_alone(setup: Setup) -> None:
    bundle = load_bundle(setup.registry.bundle_path("latest"))
    assert bundle.tasks == sorted(t[0] for t in TASKS)
    assert bundle.layers_read == 4
    for task in bundle.tasks:
        batch = _inputs(bundle, task)
        args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        with torch.no_grad():
            merged = bundle.model(*args, tasks=[task])[task]
            alone = setup.standalone(task)(*args)
        assert (merged - alone).abs().max() <= 1e-5, task


def test_a_subset_reads_only_the_layers_it_needs(setup: Setup, tmp_path: Path) -> None:
    copy = shutil.copytree(setup.registry.bundle_path("latest"), tmp_path / "copy")
    for index in (2, 3):  # above the deepest fork of the two tasks asked for
        (copy / f"trunk/layer_{index:02d}.safetensors").unlink()
    bundle = load_bundle(copy, tasks=["topics", "slots"])
    assert bundle.layers_read == 2
    assert set(bundle.model.branches) == {"topics", "slots"}
    with pytest.raises(InvalidWeights, match="layer_02"):
        load_bundle(copy, tasks=["sentiment", "score"])


def test_damaged_or_unsafe_bundles_are_refused(setup: Setup, tmp_path: Path) -> None:
    copy = shutil.copytree(setup.registry.bundle_path("latest"), tmp_path / "copy")
    branch = copy / "branches/sentiment.safetensors"
    branch.chmod(0o644)
    branch.write_bytes(branch.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(InvalidWeights, match="does not match the manifest"):
        load_bundle(copy, tasks=["sentiment"])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MtregError, match="unsafe path"):
        load_bundle(copy)
    with pytest.raises(NotFound, match="holds no manifest"):
        load_bundle(tmp_path)
    with pytest.raises(NotFound, match="it holds"):
        load_bundle(setup.registry.bundle_path("latest"), tasks=["nosuch"])


def test_predict_gives_labels_scores_values_and_spans(setup: Setup) -> None:
    bundle = load_bundle("latest", registry=setup.registry, tasks=["sentiment", "score", "slots"])
    results = bundle.predict(TEXTS, with_logits=True)
    assert len(results) == 3
    first = results[0]
    assert first["sentiment"]["label"] in ("neg", "pos")
    assert 0.5 <= first["sentiment"]["score"] <= 1
    assert isinstance(first["score"]["value"], float)
    assert all(span["label"] == "x" for span in first["slots"]["spans"])
    assert len(first["slots"]["logits"]) == len(bundle.tokenizer(TEXTS[0])["input_ids"])
    pair = load_bundle("latest", registry=setup.registry, tasks=["paraphrase"])
    assert pair.predict([("a movie", "a film")])[0]["paraphrase"]["label"] in ("no", "yes")
    with pytest.raises(MtregError, match="a pair of texts"):
        pair.predict(["only one text"])
    with pytest.raises(MtregError, match="list of inputs"):
        bundle.predict("not a list")


def test_batches_do_not_change_answers(setup: Setup) -> None:
    bundle = load_bundle(setup.registry.bundle_path("latest"), tasks=["sentiment", "topics"])
    together = bundle.predict(TEXTS, batch_size=3)
    alone = [bundle.predict([text])[0] for text in TEXTS]
    for a, b in zip(together, alone, strict=True):
        assert a["sentiment"]["label"] == b["sentiment"]["label"]
        assert a["sentiment"]["score"] == pytest.approx(b["sentiment"]["score"], abs=1e-5)


def _close(a: object, b: object, tol: float = 1e-5) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == pytest.approx(b, abs=tol)
    return a == b


def test_rows_asking_for_different_tasks_get_what_predict_gives_each(setup: Setup) -> None:
    bundle = load_bundle(setup.registry.bundle_path("latest"))
    rows = [
        Row(TEXTS[0], ("sentiment",)),
        Row(TEXTS[1], ("slots", "topics"), logits=True),
        Row((TEXTS[0], TEXTS[2]), ("paraphrase",), logits=True),
        Row(TEXTS[2], ("score", "sentiment", "slots", "topics"), logits=True),
        Row({"text": TEXTS[1]}, ("score",)),
    ]
    answers, timings = bundle.run(rows), {}
    assert bundle.run(rows, timings) == answers
    assert set(timings) == {task for row in rows for task in row.tasks}
    for row, answer in zip(rows, answers, strict=True):
        assert list(answer) == sorted(row.tasks)
        expected = bundle.predict([row.item], tasks=row.tasks, with_logits=row.logits)[0]
        assert _close(answer, expected), row
    logits, encoded = bundle.logits(TEXTS, ["slots"])["slots"]
    assert logits.shape[:2] == encoded["batch"]["input_ids"].shape


def test_a_branch_runs_only_on_the_rows_that_ask_for_it(setup: Setup) -> None:
    bundle = load_bundle(setup.registry.bundle_path("latest"))
    batch = _inputs(bundle, "sentiment")
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    model = bundle.model
    with torch.no_grad():
        every = model(*args, tasks=["sentiment", "slots"])
        some = model(*args, tasks=["sentiment", "slots"], rows={"sentiment": [0, 2]})
    assert torch.equal(some["slots"], every["slots"])  # no rows given: every row
    assert torch.equal(some["sentiment"][1], torch.zeros_like(some["sentiment"][1]))
    assert torch.allclose(some["sentiment"][[0, 2]], every["sentiment"][[0, 2]], atol=1e-6)


def test_export_dir_holds_only_the_chosen_tasks(setup: Setup, tmp_path: Path) -> None:
    source = setup.registry.bundle_path("latest")
    out = export_dir(source, tmp_path / "small", tasks=["topics", "sentiment"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == ["sentiment", "topics"]
    assert manifest["trunk"]["depth"] == 2
    assert sorted(p.name for p in (out / "trunk").iterdir()) == [
        "embeddings.safetensors",
        "layer_00.safetensors",
        "layer_01.safetensors",
    ]
    small, full = load_bundle(out), load_bundle(source, tasks=["topics", "sentiment"])
    assert small.predict(TEXTS) == full.predict(TEXTS)
    with pytest.raises(MtregError, match="already exists"):
        export_dir(source, out)


@pytest.mark.slow
def test_onnx_export_matches_torch(setup: Setup, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime

    source = setup.registry.bundle_path("latest")
    report = export_onnx(source, tmp_path / "onnx", quantize="int8")
    assert report["max_abs_diff"] <= 1e-4
    assert 0 <= report["int8_argmax_agreement"] <= 1
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx/model.onnx"))
    assert [o.name for o in session.get_outputs()] == sorted(t[0] for t in TASKS)
    bundle = load_bundle(source)
    # Another batch size and length than the export's probe: the axes are dynamic.
    batch = bundle.tokenizer(["great", "a very long and slow and boring movie"], padding=True)
    feeds = {k: torch.tensor(v) for k, v in batch.items()}
    outputs = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        expected = bundle.model(
            feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"]
        )
    for name, value in zip(sorted(expected), outputs, strict=True):
        assert (torch.from_numpy(value) - expected[name]).abs().max() <= 1e-4, name
    # The same folder serves through the onnx backend with the same answers.
    single = [t[0] for t in TASKS if t[0] != "paraphrase"]
    served = mtreg.load_bundle(tmp_path / "onnx", tasks=single, backend="onnx")
    timings: dict[str, float] = {}  # one graph call: its branches cannot be timed apart
    assert served.run([Row(TEXTS[0], tuple(single))], timings) and timings == {}
    for a, b in zip(served.predict(TEXTS), bundle.predict(TEXTS, tasks=single), strict=True):
        assert a["sentiment"]["label"] == b["sentiment"]["label"]
        assert a["score"]["value"] == pytest.approx(b["score"]["value"], abs=1e-4)
        assert a["slots"]["spans"] == b["slots"]["spans"]
    auto = mtreg.load_bundle(tmp_path / "onnx", tasks=single, backend="auto")
    assert set(auto.model.choice.values()) <= {"torch", "onnx"}
    for a, b in zip(auto.predict(TEXTS), bundle.predict(TEXTS, tasks=single), strict=True):
        assert a["sentiment"]["label"] == b["sentiment"]["label"]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("task", ["sentiment", "topics", "score", "slots"])
def test_hf_export_loads_in_transformers_with_the_same_logits(
    tmp_path: Path, checkpoints: Checkpoints, model_type: str, task: str
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    s = Setup(tmp_path, checkpoints, model_type)
    s.publish([t for t in TASKS if t[0] == task])
    s.registry.register([task])
    out = export_hf(s.registry.bundle_path("latest"), tmp_path / "hf", task)
    auto = (
        AutoModelForTokenClassification if task == "slots" else AutoModelForSequenceClassification
    )
    model = auto.from_pretrained(out).eval()
    bundle = load_bundle(s.registry.bundle_path("latest"))
    batch = bundle.encode(TEXTS, bundle.info[task])["batch"]
    with torch.no_grad():
        ours = bundle.model(
            batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        )
        theirs = model(**batch).logits
    mask = batch["attention_mask"].bool()
    if task == "slots":
        ours, theirs = ours[task][mask], theirs[mask]
    else:
        ours = ours[task]
    assert (ours - theirs).abs().max() <= 1e-5
    s.registry.close()


def test_a_deeper_fork_brings_the_trunks_own_layers(
    tmp_path: Path, checkpoints: Checkpoints
) -> None:
    """Regression test for the reference code's bug: the newly needed trunk layers were
    left random when a deeper branch arrived."""
    s = Setup(tmp_path, checkpoints)
    s.publish([TASKS[1]])  # forks at 0: the bundle has no trunk layers
    s.registry.register(all=True)
    assert not (s.registry.bundle_path("latest") / "trunk/layer_00.safetensors").exists()
    s.publish([TASKS[1], TASKS[2]], version="1.0.0")  # score forks at 4
    s.registry.register(["score"])
    bundle = load_bundle(s.registry.bundle_path("latest"))
    for index, layer in enumerate(bundle.model.trunk.layers):
        for name, value in layer.state_dict().items():
            assert torch.equal(value, s.checkpoint.layers[index][name].float()), (index, name)
    s.registry.close()


def test_upgrading_one_task_leaves_the_others_outputs_identical(setup: Setup) -> None:
    single = [t[0] for t in TASKS if t[0] != "paraphrase"]

    def predict() -> list[dict]:
        bundle = load_bundle(setup.registry.bundle_path("latest"), tasks=single)
        return bundle.predict(TEXTS, with_logits=True)

    before = predict()
    setup.publish([TASKS[0]], version="1.1.0", seed=7)
    setup.registry.register(["sentiment"])
    after = predict()
    for old, new in zip(before, after, strict=True):
        assert old["sentiment"] != new["sentiment"]
        for task in ("topics", "score", "slots"):
            assert old[task] == new[task]
