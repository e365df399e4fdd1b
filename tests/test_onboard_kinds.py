"""``mtreg onboard`` end to end for the head kinds besides classification: multilabel (BCE,
micro F1), regression (MSE, Pearson/Spearman) and tagging (token labels on the first
sub-token, seqeval span F1).

Each task lives in a path plugin on a tiny random 3-layer BERT (tests/factories.py), with
labels that are a simple function of the words, so that the chosen branch must beat the
best constant prediction on dev. After onboarding through the CLI, the test reads the
branch file's metadata, loads the ``latest`` bundle, checks the served outputs' shapes for
the kind, and scores ``predict`` on the dev split against the metric the branch recorded.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from factories import Checkpoints

import mtreg
from mtreg.artifacts.branch_file import read_branch
from mtreg.artifacts.config import TrunkConfig
from mtreg.cli.main import cli
from mtreg.heads.tagging import tag_spans
from mtreg.registry.api import Registry
from mtreg.runtime.bundle import LoadedBundle
from mtreg.training import metrics

PLUGIN = textwrap.dedent(
    '''
    import random

    import mtreg

    FILLER = ["the", "a", "it", "this", "was", "is", "and", "i", "you", "that"]
    TOPICS = ["food", "price", "service"]
    POS = ["good", "great", "love", "excellent", "fun", "fine"]
    NEG = ["bad", "awful", "hate", "terrible", "boring", "slow"]
    ITEMS = ["movie", "film", "book", "films", "books"]  # plurals split: film ##s
    OPINIONS = ["good", "great", "bad", "awful", "loved", "boring"]  # loved: love ##d
    SIZES = {"train": 192, "dev": 48}
    SEEDS = {"train": 0, "dev": 1}


    def topics(split):
        """Multilabel: the topic words the text mentions, among fillers."""
        rng = random.Random(SEEDS[split])
        for i in range(SIZES[split]):
            present = [t for bit, t in enumerate(TOPICS) if (i + rng.randrange(8)) >> bit & 1]
            words = rng.sample(FILLER, 4) + present
            rng.shuffle(words)
            yield {"text": " ".join(words), "label": present}


    def rating(split):
        """Regression: the share of positive words among four sentiment words."""
        rng = random.Random(SEEDS[split])
        for i in range(SIZES[split]):
            positive = i % 5
            words = rng.sample(POS, positive) + rng.sample(NEG, 4 - positive)
            words += rng.sample(FILLER, 2)
            rng.shuffle(words)
            yield {"text": " ".join(words), "label": positive / 4}


    def opinions(split):
        """Tagging: items are B-ITEM; an opinion word is B-OPINION, or I-OPINION right
        after "very" (then B-OPINION)."""
        rng = random.Random(SEEDS[split])
        for _ in range(SIZES[split]):
            words, tags = [], []
            for slot in rng.sample(["filler", "filler", "item", "opinion", "very"], 4):
                if slot == "filler":
                    words.append(rng.choice(FILLER))
                    tags.append("O")
                elif slot == "item":
                    words.append(rng.choice(ITEMS))
                    tags.append("B-ITEM")
                elif slot == "opinion":
                    words.append(rng.choice(OPINIONS))
                    tags.append("B-OPINION")
                else:
                    words += ["very", rng.choice(OPINIONS)]
                    tags += ["B-OPINION", "I-OPINION"]
            yield {"text": " ".join(words), "label": tags}


    def task(name, head, loader, metrics):
        return mtreg.TaskSpec(
            name=name,
            version="1.0.0",
            head=head,
            load_dataset=loader,
            metrics=metrics,
            trunk="tiny",
            max_length=24,
        )


    @mtreg.hookimpl
    def register_tasks(register):
        multilabel = mtreg.HeadSpec("multilabel", TOPICS)
        tagging = mtreg.HeadSpec("tagging", ("O", "B-ITEM", "B-OPINION", "I-OPINION"))
        register(task("topics", multilabel, topics, ("micro_f1", "accuracy")))
        register(task("rating", mtreg.HeadSpec("regression"), rating, ("pearson", "spearman")))
        register(task("opinions", tagging, opinions, ("span_f1", "token_accuracy")))
    '''
)

FLAGS = ["--search", "2..2", "--lr", "3e-3", "--student-lr", "3e-3", "--epochs", "12"]
FLAGS += ["--batch-size", "16", "--patience", "0", "--device", "cpu", "--json"]


def kinds_registry(root: Path, checkpoints: Checkpoints) -> tuple[list[str], Registry]:
    """Write trunk ``tiny`` (3 random layers) and the plugin above; return the CLI's global
    options for that registry and the registry itself."""
    checkpoints.copy(root / "ckpt", num_layers=3, seed=0)
    (root / "plugins").mkdir()
    (root / "plugins" / "kinds.py").write_text(PLUGIN)
    url = f"sqlite:///{root / 'registry.db'}"
    registry = Registry(url, root / "home", [root / "plugins"])
    registry.add_trunk("tiny", root / "ckpt")
    options = ["--db", url, "--home", str(root / "home"), "--plugins-dir", str(root / "plugins")]
    return options, registry


# -- what "trivial" and "served" mean for each kind ----------------------------------------


@dataclass(frozen=True)
class Kind:
    """One head kind under test: its task, first metric, and a clear input with (part of)
    the result ``predict`` must give for it."""

    task: str
    kind: str
    metric: str
    text: str
    expected: dict[str, Any]


KINDS = [
    Kind(
        "topics",
        "multilabel",
        "micro_f1",
        "the food and price was it",
        {"labels": ["food", "price"]},
    ),
    # Four positive words of four: a rating of 1.
    Kind(
        "rating",
        "regression",
        "pearson",
        "good great love fun the it",
        {"value": pytest.approx(1.0, abs=0.25)},
    ),
    # "films" and "loved" are two sub-tokens each: film ##s, love ##d.
    Kind(
        "opinions",
        "tagging",
        "span_f1",
        "this films was very loved",
        {
            "spans": [
                {"label": "ITEM", "start": 1, "end": 2, "text": "films"},
                {"label": "OPINION", "start": 3, "end": 5, "text": "very loved"},
            ]
        },
    ),
]


def references(kind: str, labels: Sequence[str], examples: Sequence[dict]) -> list[Any]:
    """Return the examples' labels as the metrics module takes them (0/1 rows for
    multilabel)."""
    if kind == "multilabel":
        return [[int(name in ex["label"]) for name in labels] for ex in examples]
    return [ex["label"] for ex in examples]


def best_constant(kind: str, labels: Sequence[str], examples: Sequence[dict]) -> float:
    """Return the best score (by the task's first metric) of a prediction that ignores its
    input: the best fixed label subset (multilabel), any constant (regression: a correlation
    of 0), the most frequent tag for every word (tagging)."""
    wanted = references(kind, labels, examples)
    if kind == "multilabel":
        subsets = [[i >> j & 1 for j in range(len(labels))] for i in range(2 ** len(labels))]
        return max(metrics.micro_f1([s] * len(wanted), wanted) for s in subsets)
    if kind == "regression":
        return metrics.pearson([0.5] * len(wanted), wanted)
    tags = [tag for row in wanted for tag in row]
    majority = max(set(tags), key=tags.count)
    return metrics.span_f1([[majority] * len(row) for row in wanted], wanted)


def served_score(
    kind: str, labels: Sequence[str], examples: Sequence[dict], results: Sequence[dict]
) -> float:
    """Score ``predict`` results for ``examples`` by the task's first metric."""
    if kind == "multilabel":
        predicted = [[int(name in r["labels"]) for name in labels] for r in results]
        return metrics.micro_f1(predicted, references(kind, labels, examples))
    if kind == "regression":
        return metrics.pearson([r["value"] for r in results], references(kind, labels, examples))
    # Span F1 over (sentence, label, start, end): seqeval's rule, from the served spans.
    found, wanted = set(), set()
    for i, (result, ex) in enumerate(zip(results, examples, strict=True)):
        found |= {(i, s["label"], s["start"], s["end"]) for s in result["spans"]}
        spans = tag_spans(ex["text"].split(), ex["label"])
        wanted |= {(i, s["label"], s["start"], s["end"]) for s in spans}
    return 2 * len(found & wanted) / (len(found) + len(wanted))


def check_result(kind: str, labels: Sequence[str], text: str, result: dict[str, Any]) -> None:
    """Check one ``predict`` result's form: a probability per label and the labels above
    0.5 (multilabel), one float (regression), spans of the text's words (tagging)."""
    if kind == "multilabel":
        assert list(result["scores"]) == list(labels)
        assert all(0.0 <= p <= 1.0 for p in result["scores"].values())
        assert result["labels"] == [name for name, p in result["scores"].items() if p > 0.5]
    elif kind == "regression":
        assert set(result) == {"value"} and isinstance(result["value"], float)
    else:
        words = text.split()
        entities = {tag.partition("-")[2] for tag in labels if tag != "O"}
        for span in result["spans"]:
            assert span["label"] in entities and 0 <= span["start"] < span["end"] <= len(words)
            assert span["text"] == " ".join(words[span["start"] : span["end"]])


def check_logits_shape(kind: Kind, bundle: LoadedBundle, texts: list[str]) -> None:
    """The bundle's raw output for the task: [B, labels], [B, 1] or [B, tokens, tags]."""
    logits, encoded = bundle.logits(texts, [kind.task])[kind.task]
    width = bundle.info[kind.task].head.num_outputs
    if kind.kind == "tagging":
        assert logits.shape == (len(texts), encoded["batch"]["input_ids"].shape[1], width)
    else:
        assert logits.shape == (len(texts), width)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", KINDS, ids=[k.kind for k in KINDS])
@pytest.mark.slow
def test_onboard_trains_registers_and_serves_each_head_kind(
    tmp_path: Path, checkpoints: Checkpoints, kind: Kind
) -> None:
    options, registry = kinds_registry(tmp_path, checkpoints)
    with registry:
        spec = registry.discover().task(kind.task).spec
        labels, dev = spec.head.labels, list(spec.load_dataset("dev"))
        result = CliRunner().invoke(cli, [*options, "onboard", kind.task, *FLAGS])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert [r["stage"] for r in report["runs"]] == ["teacher", "student"]
        assert report["metric"] == kind.metric
        chosen = report["chosen"]
        score = chosen["dev_metrics"][kind.metric]

        # The chosen branch learnt the task: far above any input-blind prediction.
        baseline = best_constant(kind.kind, labels, dev)
        assert score > 0.9 and score > baseline + 0.2, (baseline, report["runs"])

        # The branch file records the head, the geometry and the dev scores.
        config = TrunkConfig(**registry.trunk("tiny").config)
        meta, tensors = read_branch(Path(report["weights"]), config)
        assert meta.head == spec.head and meta.fork_depth == 1
        assert meta.num_layers == chosen["layers"]
        assert meta.training["teacher_layers"] == 2
        student = chosen["layers"] if chosen["stage"] == "student" else None
        assert meta.training["student_layers"] == student
        assert meta.training["dev_metrics"] == chosen["dev_metrics"]
        assert set(meta.training["dev_metrics"]) == set(spec.metrics)
        assert meta.training["teacher_dev_metrics"] == report["teacher"]["dev_metrics"]
        assert ("pooler.dense.weight" in tensors) == (kind.kind != "tagging")

        # Served from the bundle: the kind's shapes, and dev scored as the branch recorded
        # (training read fp16 cached states, serving runs the trunk in fp32: close, not equal).
        assert registry.bundle("latest").members == {kind.task: "1.0.0"}
        bundle = mtreg.load_bundle(registry.bundle_path("latest"))
        assert bundle.info[kind.task].head == spec.head
        assert bundle.info[kind.task].fork_depth == 1
        check_logits_shape(kind, bundle, [ex["text"] for ex in dev[:5]])
        results = [row[kind.task] for row in bundle.predict([ex["text"] for ex in dev])]
        for ex, row in zip(dev, results, strict=True):
            check_result(kind.kind, labels, ex["text"], row)
        assert served_score(kind.kind, labels, dev, results) == pytest.approx(score, abs=0.03)

        # `mtreg predict --logits` on one clear input: the expected answer, raw outputs of
        # the kind's shape (tagging: one row per token, [CLS] and [SEP] included).
        argv = [*options, "predict", "--bundle", "latest", "--logits", kind.text]
        printed = CliRunner().invoke(cli, argv)
        assert printed.exit_code == 0, printed.output
        answer = json.loads(printed.stdout)["predictions"][kind.task]  # stderr: the backend
        raw = torch.tensor(answer.pop("logits"))
        assert answer == bundle.predict([kind.text])[0][kind.task]
        assert {key: answer[key] for key in kind.expected} == kind.expected
        width = spec.head.num_outputs
        tokens = len(bundle.tokenizer(kind.text)["input_ids"])
        assert raw.shape == ((tokens, width) if kind.kind == "tagging" else (width,))
