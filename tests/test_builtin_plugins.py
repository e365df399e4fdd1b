"""The built-in GLUE and intent plugins: specs, readers on the real shared data, and the
quirks, missing files and missing splits on small files written here.

The real data is ``$MTREG_DATA_DIR`` or ``../shared/data`` next to the repository; tests that
need it are skipped, with the reason, when it is absent.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections import Counter
from pathlib import Path

import pytest
from helpers import missing

from mtreg.core.env import DATA_DIR_ENV, using_data_dir
from mtreg.errors import MtregError
from mtreg.plugins import glue, intent, readers, sources
from mtreg.plugins.loader import discover
from mtreg.plugins.readers import MissingSplit
from mtreg.training.metrics import METRICS

REPO_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALL_TASKS = {spec.name: spec for spec in [*glue.tasks(), *intent.tasks()]}


def _shared_data() -> Path | None:
    configured = os.environ.get(DATA_DIR_ENV)
    for candidate in (Path(configured) if configured else None, REPO_DATA):
        if candidate is not None and (candidate / "glue" / "CoLA" / "train.tsv").is_file():
            return candidate
    return None


SHARED = _shared_data()


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point MTREG_DATA_DIR at the real shared data, or skip (fail under CI) with where
    it was looked for."""
    if SHARED is None:
        missing(f"shared data not found ({DATA_DIR_ENV} unset and {REPO_DATA} absent)")
    monkeypatch.setenv(DATA_DIR_ENV, str(SHARED))
    return SHARED


def load(task: str, split: str) -> list[dict]:
    return list(ALL_TASKS[task].load_dataset(split))


def labels(task: str, split: str) -> Counter:
    return Counter(example["label"] for example in load(task, split))


# -- specs -----------------------------------------------------------------------------


def test_the_eleven_tasks_and_their_specs() -> None:
    glue_names = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
    intent_names = ["clinc150", "snips-intent", "snips-slots"]
    assert sorted(ALL_TASKS) == sorted(glue_names + intent_names)
    firsts = {name: spec.metrics[0] for name, spec in ALL_TASKS.items()}
    assert firsts == {
        **dict.fromkeys(["sst2", "qqp", "mnli", "qnli", "rte", "clinc150"], "accuracy"),
        **{"snips-intent": "accuracy", "cola": "mcc", "mrpc": "f1", "stsb": "pearson"},
        "snips-slots": "span_f1",
    }
    for spec in ALL_TASKS.values():
        assert set(spec.metrics) <= set(METRICS), spec.name
        assert (spec.trunk, spec.weights, spec.version) == ("minilm", None, "1.0.0")
    assert ALL_TASKS["stsb"].head.kind == "regression"
    assert ALL_TASKS["snips-slots"].head.kind == "tagging"
    assert "spearman" in ALL_TASKS["stsb"].metrics and "f1" in ALL_TASKS["qqp"].metrics


def test_label_lists_are_fixed_with_the_positive_class_second() -> None:
    assert ALL_TASKS["cola"].head.labels == ("unacceptable", "acceptable")
    assert ALL_TASKS["mrpc"].head.labels[1] == "equivalent"
    assert ALL_TASKS["qqp"].head.labels[1] == "duplicate"
    assert ALL_TASKS["mnli"].head.labels == ("entailment", "neutral", "contradiction")
    clinc = ALL_TASKS["clinc150"].head.labels
    assert len(clinc) == 151 and "oos" in clinc
    slots = ALL_TASKS["snips-slots"].head.labels
    assert len(slots) == 72 and slots[0] == "O"


def test_plugins_load_through_the_plugin_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    # Loaded from their files only: installed as entry points too, they would clash here.
    monkeypatch.setattr(sources, "entry_point_sources", list)
    found = discover([glue.__file__, intent.__file__])
    assert [p.error for p in found.plugins] == [None, None]
    assert set(ALL_TASKS) <= set(found.tasks)


def test_installed_as_entry_points_of_mtreg() -> None:
    dist = importlib.metadata.distribution("mtreg")
    found = {ep.name: ep.value for ep in dist.entry_points if ep.group == "mtreg"}
    if not found:
        missing("this mtreg install predates its entry points: `pip install -e .` again")
    assert found == {"glue": "mtreg.plugins.glue", "intent": "mtreg.plugins.intent"}


# -- the real data (row counts and label counts from the data README) -----------------

ROWS = [
    ("cola", "train", 8551),
    ("cola", "dev", 1043),
    ("sst2", "train", 67349),
    ("sst2", "dev", 872),
    ("mrpc", "train", 3668),
    ("mrpc", "dev", 408),
    ("stsb", "train", 5749),
    ("stsb", "dev", 1500),
    ("rte", "train", 2490),
    ("rte", "dev", 277),
    ("qnli", "dev", 5463),
    ("mnli", "dev", 9815),
    ("clinc150", "train", 15100),
    ("clinc150", "dev", 3100),
    ("clinc150", "test", 5500),
    ("snips-intent", "train", 13084),
    ("snips-intent", "dev", 700),
    ("snips-slots", "test", 700),
]


@pytest.mark.parametrize(("task", "split", "rows"), ROWS)
def test_row_counts(shared: Path, task: str, split: str, rows: int) -> None:
    examples = load(task, split)
    assert len(examples) == rows
    spec = ALL_TASKS[task]
    assert all(set(example) == {*spec.inputs, "label"} for example in examples)


def test_label_counts(shared: Path) -> None:
    assert labels("cola", "train") == {"acceptable": 6023, "unacceptable": 2528}
    assert labels("cola", "dev") == {"acceptable": 721, "unacceptable": 322}
    assert labels("sst2", "dev") == {"positive": 444, "negative": 428}
    assert labels("mrpc", "train") == {"equivalent": 2474, "not_equivalent": 1194}
    assert labels("rte", "dev") == {"entailment": 146, "not_entailment": 131}
    assert labels("qnli", "dev") == {"entailment": 2702, "not_entailment": 2761}
    assert labels("mnli", "dev") == {"entailment": 3479, "neutral": 3123, "contradiction": 3213}
    # The README counts 14749 `0`: the 5-field line (a `0`) has no label column to count.
    qqp = labels("qqp", "train") + labels("qqp", "dev")
    assert qqp == {"not_duplicate": 14750, "duplicate": 8747}
    clinc = labels("clinc150", "test")
    assert len(clinc) == 151 and clinc["oos"] == 1000
    assert set(clinc) == set(ALL_TASKS["clinc150"].head.labels)
    assert set(labels("snips-intent", "train")) == set(ALL_TASKS["snips-intent"].head.labels)


def test_quirks_of_the_real_files(shared: Path) -> None:
    # CoLA: no header, so the first line is an example.
    assert load("cola", "train")[0]["sentence"].startswith("Our friends won't buy this")
    # MRPC: the BOM does not leak into the header or the first example.
    first = load("mrpc", "train")[0]
    assert first["sentence1"].startswith("Amrozi") and first["label"] == "equivalent"
    # STS-B and QNLI: unbalanced quotes stay inside their field (row counts above match too).
    scores = [e["label"] for split in ("train", "dev") for e in load("stsb", split)]
    assert all(isinstance(s, float) and 0.0 <= s <= 5.0 for s in scores)
    assert min(scores) == 0.0 and max(scores) == 5.0
    assert any(e["sentence1"].count('"') % 2 for e in load("stsb", "dev"))
    qnli = load("qnli", "dev")
    assert qnli[658]["sentence"].startswith('" This term describes cells')
    # MNLI: the reduced columns map onto premise / hypothesis.
    assert load("mnli", "dev")[0]["premise"] == "The new rights are nice enough"
    # QQP: the 5-field line is split before its label.
    qqp = load("qqp", "train") + load("qqp", "dev")
    repaired = [e for e in qqp if e["question2"].endswith("exam jlpt5?")]
    assert [e["label"] for e in repaired] == ["not_duplicate"]


def test_qqp_dev_is_a_fixed_disjoint_tenth_of_train(shared: Path) -> None:
    train, dev = load("qqp", "train"), load("qqp", "dev")
    assert len(train) + len(dev) == 23497
    assert 0.08 < len(dev) / 23497 < 0.12
    assert load("qqp", "dev") == dev  # deterministic
    path = shared / "glue" / "QQP" / "train.tsv"
    rows = list(readers.read_tsv(path, header=glue.QQP_HEADER, repair=glue._repair_qqp))
    held = {f[0] for _, f in rows if readers.in_holdout(f[0], glue.QQP_DEV_SEED, 10)}
    assert len(held) == len(dev)
    whole = Counter((f[3], f[4]) for _, f in rows)
    parts = Counter((e["question1"], e["question2"]) for e in train + dev)
    assert parts == whole  # every line on exactly one side


def test_snips_slots_one_tag_per_word(shared: Path) -> None:
    known = set(ALL_TASKS["snips-slots"].head.labels)
    seen: set[str] = set()
    for split in ("train", "dev", "test"):
        for example in load("snips-slots", split):
            assert len(example["label"]) == len(example["text"].split())
            seen.update(example["label"])
    assert seen == known  # the packaged list is exactly the data's tag set


# -- quirks, errors and missing data on small files written here -----------------------


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    return tmp_path


def test_small_quirky_files(data: Path) -> None:
    write(data, "glue/CoLA/dev.tsv", 'src\t1\t\tA fine "sentence.\r\nsrc\t0\t*\tbad one')
    write(
        data,
        "glue/MRPC/train.tsv",
        '\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\t" a\tb\n',
    )
    stsb_header = "\t".join(glue.STSB_HEADER)
    write(data, "glue/STS-B/dev.tsv", f'{stsb_header}\n0\tg\tf\ty\t0\tn\tn\t"open\tb\t3.5\n')
    qqp_header = "\t".join(glue.QQP_HEADER)
    write(data, "glue/QQP/train.tsv", f"{qqp_header}\n7\t1\t2\tq one?\tq two? 1\n")

    assert load("cola", "dev") == [
        {"sentence": 'A fine "sentence.', "label": "acceptable"},
        {"sentence": "bad one", "label": "unacceptable"},
    ]
    assert load("mrpc", "train") == [{"sentence1": '" a', "sentence2": "b", "label": "equivalent"}]
    assert load("stsb", "dev") == [{"sentence1": '"open', "sentence2": "b", "label": 3.5}]
    side = "dev" if readers.in_holdout("7", glue.QQP_DEV_SEED, 10) else "train"
    assert load("qqp", side) == [
        {"question1": "q one?", "question2": "q two?", "label": "duplicate"}
    ]


def test_unknown_labels_are_named(data: Path) -> None:
    write(data, "glue/CoLA/train.tsv", "src\t1\t\tok\nsrc\t2\t\tbad\n")
    with pytest.raises(MtregError, match=r"train\.tsv:2: unknown label '2'"):
        load("cola", "train")
    write(data, "intent/CLINC150/val.tsv", "text\tintent\nhi\tgreeting\nhm\tno_such_intent\n")
    with pytest.raises(MtregError, match="unknown label 'no_such_intent'"):
        load("clinc150", "dev")
    write(data, "intent/SNIPS/dev.tsv", "text\tintent\tslots\nplay it\tPlayMusic\tO B-nope\n")
    with pytest.raises(MtregError, match="unknown label 'B-nope'"):
        load("snips-slots", "dev")
    write(data, "intent/SNIPS/test.tsv", "text\tintent\tslots\nplay it\tPlayMusic\tO\n")
    with pytest.raises(MtregError, match="1 slot tags for 2 words"):
        load("snips-slots", "test")
    write(data, "glue/STS-B/train.tsv", "\t".join(glue.STSB_HEADER) + "\n" + "x\t" * 9 + "7.5\n")
    with pytest.raises(MtregError, match=r"score '7\.5' is not a number in 0\.\.5"):
        load("stsb", "train")


def test_wrong_field_count_and_header_are_named(data: Path) -> None:
    write(data, "glue/RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tentailment\n")
    with pytest.raises(MtregError, match=r"dev\.tsv:2: expected 4 tab-separated fields, found 3"):
        load("rte", "dev")
    write(data, "glue/SST-2/dev.tsv", "text\tlabel\nfine\t1\n")
    with pytest.raises(MtregError, match="expected the header"):
        load("sst2", "dev")


def test_missing_file_names_the_path_and_the_variable(data: Path) -> None:
    with pytest.raises(MtregError) as caught:
        load("rte", "train")
    message = str(caught.value)
    assert str(data / "glue" / "RTE" / "train.tsv") in message and DATA_DIR_ENV in message


def test_unset_or_missing_data_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(MtregError, match="--data-dir"):
        load("sst2", "train")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(MtregError, match="does not exist"):
        load("sst2", "train")
    with using_data_dir(tmp_path) as folder:
        assert folder == tmp_path.resolve()
        assert os.environ[DATA_DIR_ENV] == str(tmp_path.resolve())


@pytest.mark.parametrize(
    ("task", "split"),
    [("qnli", "train"), ("mnli", "train"), ("cola", "test"), ("qqp", "test")],
)
def test_missing_splits_say_so(data: Path, task: str, split: str) -> None:
    with pytest.raises(MissingSplit, match=f"task '{task}' has no {split} split"):
        load(task, split)


def test_unknown_split_is_refused(data: Path) -> None:
    with pytest.raises(MtregError, match="unknown split 'validation'"):
        load("snips-intent", "validation")
