"""Bring your own teacher: `mtreg onboard TASK --teacher FOLDER` distils a team's
fine-tuned transformers classifier, built and fine-tuned here on the tiny toy trunk, and
refuses teachers that cannot teach the task in one line with the registry unchanged."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import Checkpoints
from harness import registry_state
from toy import FAST, PLUGIN

from mtreg.artifacts.hf_model import read_classifier
from mtreg.cli.main import cli
from mtreg.training.onboard import OnboardReport, onboard

LABELS = ("negative", "positive")


def _toy_data(tmp: Path, split: str) -> list[dict]:
    (tmp / "toyplug.py").write_text(PLUGIN)
    spec = importlib.util.spec_from_file_location("toyplug_for_teacher", tmp / "toyplug.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.toy(split))


def _classifier(folder: Path, out: Path, labels=LABELS, kind: str = "Sequence") -> Path:
    """A transformers classifier on the checkpoint in ``folder``, saved to ``out``."""
    import transformers

    cls = getattr(transformers, f"AutoModelFor{kind}Classification")
    torch.manual_seed(0)
    model = cls.from_pretrained(
        folder, id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)}
    )
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher(checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy trunk fully fine-tuned on the toy task (every layer and the embeddings)."""
    import transformers

    tmp = tmp_path_factory.mktemp("teacher")
    folder = _classifier(checkpoints.shared(3), tmp / "teacher")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    examples = _toy_data(tmp, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    torch.manual_seed(1)
    for _ in range(4):
        for start in range(0, len(examples), 16):
            rows = examples[start : start + 16]
            batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
            labels = torch.tensor([LABELS.index(r["label"]) for r in rows])
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval().save_pretrained(folder)
    return folder


def _dev_accuracy(folder: Path, tmp: Path) -> float:
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    dev = _toy_data(tmp, "dev")
    batch = tokenizer(
        [r["text"] for r in dev], padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        predicted = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        predicted = predicted.logits.argmax(-1)
    gold = torch.tensor([LABELS.index(r["label"]) for r in dev])
    return float((predicted == gold).float().mean())


def _searched_every_depth(report: OnboardReport, home: Path, depths: set[int]) -> None:
    """Assert that the student search tried its smallest students at every fork depth of
    ``depths`` (in its settings and in the runs it saved) and that the branch it chose
    follows the rule of onboarding from data: the smallest l within the tolerance of the
    teacher, the best of that l, no larger student trained; else the best student."""
    assert set(report.settings["student_depths"]) == depths
    smallest = min(r.layers for r in report.runs)
    assert {r.fork_depth for r in report.runs if r.layers == smallest} == depths
    saved = {p.stem for p in home.glob("onboarding/toy/1.0.0/student-*.json")}
    assert saved >= {f"student-k{k}-l{smallest}-lr0.003" for k in depths}
    score = {r.name: r.dev_metrics[report.metric] for r in report.runs}
    chosen = score[report.chosen.name]
    assert report.chosen.stage == "student"
    good = [r for r in report.runs if score[r.name] >= report.threshold]
    if not good:
        assert chosen == max(score.values())
        return
    least = min(r.layers for r in good)
    assert report.chosen.layers == least and chosen >= report.threshold
    assert chosen == max(score[r.name] for r in good if r.layers == least)
    assert max(r.layers for r in report.runs) == least  # the search stopped there


@pytest.mark.slow
def test_an_outside_teacher_is_distilled_into_a_branch(
    toy_registry, teacher: Path, tmp_path: Path
) -> None:
    registry = toy_registry(tmp_path)
    # Teacher sizes L 1 and 2 of the trunk's 3 layers: students fork at depths 2 and 1.
    settings = replace(FAST, teacher_layers=(1, 2))
    report = onboard(registry, "toy", settings, teacher=teacher)
    # Each depth's students are saved runs of their own: run again, every one resumes.
    again = onboard(registry, "toy", settings, teacher=teacher, register=False)
    assert [r.name for r in again.runs] == [r.name for r in report.runs]
    assert all(r.resumed for r in again.runs) and again.chosen.name == report.chosen.name
    # The teacher ran whole, on its own weights: its dev score is transformers' own.
    assert report.teacher.dev_metrics["accuracy"] == pytest.approx(_dev_accuracy(teacher, tmp_path))
    assert report.teacher.dev_metrics["accuracy"] >= 0.9
    assert [r.stage for r in report.runs] == ["student"] * len(report.runs)
    _searched_every_depth(report, tmp_path / "home", {1, 2})
    assert report.chosen.dev_metrics["accuracy"] >= 0.9 * report.teacher.dev_metrics["accuracy"]
    assert report.settings["teacher"]["source"] == str(teacher)
    assert registry.task("toy").active_version == "1.0.0"
    bundle = registry.bundle("latest")
    assert bundle.members == {"toy": "1.0.0"}
    registry.close()


def _another_tokenizer(checkpoints: Checkpoints, tmp: Path) -> Path:
    folder = _classifier(checkpoints.shared(3), tmp / "t")
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]  # two words swap ids: another vocabulary
    vocab["good"], vocab["bad"] = vocab["bad"], vocab["good"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def _pickle_only(checkpoints: Checkpoints, tmp: Path) -> Path:
    folder = _classifier(checkpoints.shared(3), tmp / "t")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    return folder


REFUSALS = [
    (
        "other trunk",
        lambda c, t: _classifier(c.shared(3, hidden=48, heads=4), t / "t"),
        "another trunk than 'tiny': the architecture config differs",
    ),
    ("other tokenizer", _another_tokenizer, "the tokenizer differs"),
    (
        "other labels",
        lambda c, t: _classifier(c.shared(3), t / "t", ("bad", "good")),
        "labels ['bad', 'good']",
    ),
    (
        "token classifier",
        lambda c, t: _classifier(c.shared(3), t / "t", kind="Token"),
        "is a tagging model",
    ),
    ("bare encoder", lambda c, t: c.copy(t / "t", 3), "not a fine-tuned"),
    ("pickle only", _pickle_only, "safetensors only"),
    ("no such folder", lambda c, t: t / "missing" / "dir", "no config.json"),
]


@pytest.mark.parametrize(
    ("make", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_a_teacher_that_cannot_teach_the_task_is_one_line(
    toy_registry, checkpoints: Checkpoints, tmp_path: Path, make, message: str
) -> None:
    toy_registry(tmp_path).close()
    _refused(tmp_path, make(checkpoints, tmp_path), [], message)


def test_students_larger_than_any_depth_allows_are_one_line(
    toy_registry, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    toy_registry(tmp_path).close()
    folder = _classifier(checkpoints.shared(3), tmp_path / "t")
    # Depths 2 and 1 of 3 layers: at most 2 student layers, above depth 1.
    flags = ["--search", "1..2", "--student-search", "3..3"]
    _refused(tmp_path, folder, flags, "student layers must be in 1..2")


def _refused(tmp_path: Path, folder: Path, flags: list[str], message: str) -> None:
    """Assert that onboarding the toy task with the teacher in ``folder`` fails in one line
    saying ``message``, the registry unchanged."""
    url, home = f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "home"
    before = registry_state(url, str(home))
    base = ["--db", url, "--home", str(home), "--plugins-dir", str(tmp_path / "plugins")]
    args = [*base, "onboard", "toy", "--teacher", str(folder), *flags]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    assert registry_state(url, str(home)) == before


def test_a_classifier_folder_reads_as_its_head(checkpoints: Checkpoints, tmp_path: Path) -> None:
    folder = _classifier(checkpoints.shared(3), tmp_path / "t", ("O", "B-x", "I-x"), "Token")
    classifier = read_classifier(folder)
    assert classifier.head.kind == "tagging" and classifier.head.labels == ("O", "B-x", "I-x")
    tensors = classifier.branch_tensors(1)
    assert sorted({k.split(".")[1] for k in tensors if k.startswith("layers.")}) == ["0", "1"]
    assert tensors["head.weight"].shape == (3, 32)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["distilbert", "deberta-v2", "modernbert"])
def test_teachers_of_other_families_run_as_transformers_runs_them(
    checkpoints: Checkpoints, tmp_path: Path, family: str
) -> None:
    from mtreg.registry.api import Registry

    folder = checkpoints.copy(tmp_path / "ckpt", 3, model_type=family)
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toyplug.py").write_text(PLUGIN)
    teacher = _classifier(folder, tmp_path / "teacher")  # a random head: parity, not skill
    with Registry(
        f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "home", [tmp_path / "plugins"]
    ) as reg:
        reg.add_trunk("tiny", folder)
        settings = replace(FAST, epochs=1, student_layers=(1,), teacher_layers=(1, 2))
        report = onboard(reg, "toy", settings, teacher=teacher)
        assert report.teacher.dev_metrics["accuracy"] == pytest.approx(
            _dev_accuracy(teacher, tmp_path)
        )
        # Students at depths 2 and 1 (ModernBERT's layers differ by their index there).
        _searched_every_depth(report, tmp_path / "home", {1, 2})
        assert report.chosen.layers == 1
        assert reg.bundle("latest").members == {"toy": "1.0.0"}
