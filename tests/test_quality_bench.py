"""The quality benchmark's pieces on tiny data: fixed-seed subsampling and the benchmark
plugin, the metric table and its noise verdicts, the figure, a whole (tiny) resumable run
scored through ``load_bundle``, and ``mtreg report`` from a registry."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import Checkpoints

from mtreg.cli import reporting as rp
from mtreg.cli.main import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import benchtasks
import quality
import quality_report
import quality_serving
import quality_units
import scores

PNG = b"\x89PNG\r\n\x1a\n"
POS, NEG = ["good", "great", "love", "fun"], ["bad", "awful", "hate", "boring"]
FILLER = ["the", "movie", "film", "book", "it", "this", "was", "is"]


def write_sst2(data: Path, train: int = 96, dev: int = 32) -> Path:
    """Write a toy SST-2 in the shared data's layout (a sentiment word among fillers)."""
    rng = random.Random(0)
    folder = data / "glue" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("dev", dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            words = rng.sample(FILLER, 3)
            words.insert(rng.randrange(4), rng.choice(POS if i % 2 else NEG))
            lines.append(f"{' '.join(words)}\t{i % 2}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return data


@pytest.fixture
def tiny(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoints: Checkpoints
) -> dict[str, Path]:
    """Tiny data and trunk; environment changes undone after the test."""
    data = write_sst2(tmp_path / "data")
    ckpt = checkpoints.copy(tmp_path / "ckpt", num_layers=3)
    monkeypatch.setenv("MTREG_DATA_DIR", str(data))
    monkeypatch.setenv("MTREG_LOAD_PLUGINS", benchtasks.PLUGIN_NAME)
    monkeypatch.setattr(benchtasks, "DATA_DIR", data)
    monkeypatch.setattr(benchtasks, "minilm_folder", lambda: ckpt)
    return {"data": data, "ckpt": ckpt, "root": tmp_path}


def test_subsample_is_fixed_ordered_and_seeded() -> None:
    rows = list(range(100))
    a = benchtasks.subsample(rows, 10, "sst2-0-train")
    assert a == benchtasks.subsample(rows, 10, "sst2-0-train") == sorted(a) and len(set(a)) == 10
    assert a != benchtasks.subsample(rows, 10, "sst2-1-train")
    assert benchtasks.subsample(rows, None, "x") == rows == benchtasks.subsample(rows, 500, "x")


def test_plugin_registers_subsampled_tasks_under_builtin_names(tiny: dict[str, Path]) -> None:
    config = {"sst2": {"sizes": {"train": 40}, "seed": 0, "max_length": 12}}
    with benchtasks.open_registry(tiny["root"] / "home", config, tiny["ckpt"]) as registry:
        spec = registry.discover().task("sst2").spec
        train, dev = list(spec.load_dataset("train")), list(spec.load_dataset("dev"))
        assert len(train) == 40 and len(dev) == 32 and spec.max_length == 12
        assert train == list(spec.load_dataset("train"))  # the same rows every time
        assert registry.trunk("minilm").config["num_hidden_layers"] == 3
    path = benchtasks.write_plugin(tiny["root"] / "home" / "plugins", config)
    assert path.read_text() == benchtasks.plugin_source(config)


def _row(task: str, served: list[float], full: list[float], k: int = 3, layers: int = 1):
    return rp.TaskQuality(task, "accuracy", "dev", k, layers, 3, served, served, full, 1.0)


def test_metric_table_ratios_layers_and_noise() -> None:
    rows = [_row("a", [0.9], [0.9]), _row("b", [0.8, 0.82], [0.9, 0.9], k=4, layers=2)]
    rows[0].noise, rows[1].noise = 0.01, 0.01
    overall = rp.summary([*rows, _row("c", [0.5], [])], 6)
    assert rows[0].ratio == pytest.approx(1.0) and rows[1].ratio == pytest.approx(0.81 / 0.9)
    assert rows[0].within_noise is True and rows[1].within_noise is False
    assert overall["mean_ratio"] == pytest.approx((1.0 + 0.81 / 0.9) / 2)
    assert overall["tasks_with_reference"] == 2 and overall["tasks"] == 3
    assert overall["bundle_layers"] == 4 + 1 + 2 + 1 and overall["full_layers"] == 18
    text = rp.markdown(rows, overall)
    assert "| a | accuracy (dev) | 90.0 |" in text and "within noise (SE 1.0)" in text
    assert "81.0 ± 1.4 (2)" in text and "outside noise" in text and "**8**" in text
    assert rp.TaskQuality.from_dict(rows[1].to_dict()) == rows[1]


@pytest.mark.slow
def test_figure_renders_a_png(tmp_path: Path) -> None:
    rows = [_row("a", [0.9], [0.91]), _row("b", [0.7], [0.75], k=4, layers=2)]
    path = rp.figure(rows, rp.summary(rows, 6), tmp_path / "f" / "q.png", "title")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    # Other bundles of the same tasks are drawn beside it in the all-tasks panel.
    deeper = [_row("a", [0.9], [0.93], k=2, layers=1), _row("b", [0.7], [0.7], k=2, layers=1)]
    other = rp.figure(
        rows, rp.summary(rows, 6), tmp_path / "o.png", "title", [("deeper", rp.summary(deeper, 6))]
    )
    again = rp.figure(rows, rp.summary(rows, 6), tmp_path / "again.png", "title")
    assert again.read_bytes() == path.read_bytes()  # deterministic: the point made the change
    assert other.read_bytes()[:8] == PNG and other.read_bytes() != path.read_bytes()


def test_paired_bootstrap_is_zero_for_equal_predictions_and_positive_otherwise() -> None:
    refs = [i % 2 for i in range(50)]
    assert scores.paired_bootstrap_se("accuracy", refs, refs, refs, n=20) == 0
    other = [1 - r if i % 5 == 0 else r for i, r in enumerate(refs)]
    assert scores.paired_bootstrap_se("accuracy", refs, other, refs, n=20) > 0


@pytest.mark.parametrize(
    "references, expected",
    [
        ([1, 0, 1], [1, 1, 1]),  # single label: the most frequent one
        ([1.0, 3.0], [2.0, 2.0]),  # regression: the mean
        ([["O", "B-x"], ["O"]], [["O", "O"], ["O"]]),  # tagging: the most frequent tag
        ([[1, 2], [0], [1, 2]], [[1, 2], [1, 2], [1, 2]]),  # multilabel: the commonest set
    ],
)
def test_majority_is_the_constant_predictor(references: list, expected: list) -> None:
    assert scores.majority(references) == expected


@pytest.mark.parametrize("wrong, learned", [(2, True), (20, False)])
def test_floor_row_sets_full_and_served_against_the_majority(
    tmp_path: Path, wrong: int, learned: bool
) -> None:
    references = [i % 2 for i in range(40)]  # majority: 50%
    full = [1 - r if i < wrong else r for i, r in enumerate(references)]
    split = {"metrics": {"accuracy": 1 - wrong / 40}, "predictions": full}
    quality_units.write_json(
        tmp_path / "sst2" / "seed0" / "full-lr2e-05.json",
        {"lr": 2e-5, "dev_metrics": split["metrics"], "dev": {**split, "references": references}},
    )
    bundle = {"tasks": {"sst2": {"dev": {"metrics": {"accuracy": 0.8}}}}}
    quality_units.write_json(tmp_path / "bundle-seed0.json", bundle)
    row = quality_report.floor_row(tmp_path, "sst2")
    assert row is not None and row["majority"] == 0.5 and row["served"] == 0.8
    assert row["learned"] is learned and row["se"] > 0
    gain = (0.8 - 0.5) / (row["full"] - 0.5) if learned else None  # 20 wrong: full = 50%
    assert row["gain_kept"] == (pytest.approx(gain) if learned else None)
    text = "".join(quality_report.floor_markdown({"floor": {"sst2": row}, "overall": {}}))
    assert ("not above" in text) is not learned


def test_report_marks_missing_units(tmp_path: Path) -> None:
    report = quality_report.build_report(tmp_path / "units", ["sst2", "rte"], [0, 1])
    assert "sst2 seed 0 full fine-tuning" in report["missing"]
    assert "rte seed 1 onboard" in report["missing"] and "serving cost" in report["missing"]
    assert "## Missing" in quality_report.report_markdown(report)
    # Variants run only when asked: one never started is not missing.
    assert not [m for m in report["missing"] if "strict" in m or "deep" in m]


@pytest.mark.slow
def test_a_tiny_run_scores_the_bundle_and_resumes(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quality_units, "TASKS", {"sst2": {"sizes": {"train": 64}}})
    monkeypatch.setattr(quality_units, "SMALL", ("sst2",))
    monkeypatch.setattr(quality_units, "LRS", (1e-3, 3e-3))
    monkeypatch.setattr(quality_units, "EPOCHS", 3)
    monkeypatch.setattr(quality_units, "TEACHER_LAYERS", (2,))
    deep = quality_units.Variant("deep", "Deeper", "L 1..2.", {"teacher_layers": (1, 2)}, False)
    loose = quality_units.Variant("loose", "Looser", "0.5.", {"tolerance": 0.5}, True, "-deep")
    monkeypatch.setattr(quality_units, "VARIANTS", (quality_units.VARIANTS[0], deep, loose))
    monkeypatch.setattr(quality_serving, "TIMING_SENTENCES", 16)
    monkeypatch.setattr(quality_serving, "peak_rss", lambda kind, path: 1.0)
    monkeypatch.setattr(benchtasks, "open_registry", _tiny_registry(tiny["ckpt"]))
    units, out = tiny["root"] / "units", tiny["root"] / "out"

    def go() -> None:
        bench = quality.Bench(tiny["root"] / "work", units, ["sst2"])
        try:
            quality.run(
                bench,
                (0, 1),
                lambda: quality_report.write_report(units, out, ["sst2"], (0, 1)),
                quality_units.VARIANTS,
            )
        finally:
            bench.close()

    go()
    report = json.loads((out / "quality.json").read_text())
    assert report["missing"] == []
    hours = report["compute_hours"]
    assert hours["total"] == pytest.approx(sum(v for k, v in hours.items() if k != "total"))
    assert min(hours.values()) > 0 and report["settings"]["precision"] == "bf16"
    (row,) = report["rows"]
    assert row["fork_depth"] == 1 and row["teacher_layers"] == 2 and len(row["served"]) == 2
    assert len(row["full"]) == 2 and row["ratio"] is not None and row["noise"] is not None
    assert report["serving"]["bundle_layers"] == 1 + row["branch_layers"]
    assert report["serving"]["full_layers"] == 3
    assert (
        report["baseline"]["sst2"]["split"] == "dev"
        and len(report["baseline"]["sst2"]["full"]) == 2
    )
    every = report["every_metric"]["sst2"]
    assert every == {
        "split": "dev",
        "metrics": {"accuracy": {k: row[k] for k in ("full", "served")}},
    }
    floor = report["floor"]["sst2"]
    assert floor["majority"] == 0.5 and floor["full"] == row["full"][0]  # balanced toy dev
    assert floor["served"] == row["served"][0]
    text = (out / "quality.md").read_text()
    assert "## Above a constant predictor? (seed 0)" in text and "## Every metric" in text
    assert "## A stricter student choice (tolerance 1.0), seeds 0, 1 for the small tasks" in text
    bundle = json.loads((units / "bundle-seed0.json").read_text())
    onboard = json.loads((units / "sst2" / "seed0" / "onboard.json").read_text())
    strict = json.loads((units / "sst2" / "seed0" / "onboard-strict.json").read_text())
    assert strict["tolerance"] == 1.0 and strict["teacher"]["key"] == onboard["teacher"]["key"]
    assert all(r["resumed"] for r in strict["runs"] if r["stage"] == "teacher")
    good = (
        strict["chosen"]["dev_metrics"]["accuracy"] >= strict["teacher"]["dev_metrics"]["accuracy"]
    )
    assert good or strict["chosen"]["key"] == strict["teacher"]["key"]
    deep = json.loads((units / "sst2" / "seed0" / "onboard-deep.json").read_text())
    teachers = {r["layers"]: r["resumed"] for r in deep["runs"] if r["stage"] == "teacher"}
    assert teachers == {1: False, 2: True}  # only the new L trained; seed 0's resumed
    assert "## Deeper" in text and report["variants"]["deep"]["overall"]["tasks"] == 1
    # Each variant's bundle has its serving cost measured beside its quality.
    deep_serving = report["variants"]["deep"]["serving"]
    assert deep_serving["bundle_layers"] == deep["chosen"]["fork_depth"] + deep["chosen"]["layers"]
    assert text.count("Its serving cost, measured:") == 3
    loose = json.loads((units / "sst2" / "seed0" / "onboard-loose.json").read_text())
    assert loose["teacher"]["key"] == deep["teacher"]["key"]  # the deep variant's teacher
    assert all(r["resumed"] for r in loose["runs"] if r["stage"] == "teacher")
    assert loose["chosen"]["layers"] <= deep["chosen"]["layers"]  # looser: never larger
    (strict_row,) = report["variants"]["strict"]["rows"]
    assert strict_row["branch_layers"] == strict["chosen"]["layers"] and strict_row["served"]
    chosen = onboard["chosen"]["dev_metrics"]["accuracy"]
    # Served through load_bundle (fp32 trunk) vs recorded at training (fp16 cache): close.
    assert bundle["tasks"]["sst2"]["dev"]["metrics"]["accuracy"] == pytest.approx(chosen, abs=0.07)
    assert (out / "quality.png").read_bytes()[:8] == PNG and "## Serving cost" in (
        out / "quality.md"
    ).read_text()
    seed1 = json.loads((units / "sst2" / "seed1" / "onboard.json").read_text())
    assert seed1["settings"]["teacher_lrs"] == [onboard["teacher"]["lr"]]
    assert sorted(p.name for p in (units / "sst2" / "seed1").iterdir()) == [
        f"full-lr{json.loads(_best(units))['lr']:g}.json",
        "onboard-deep.json",
        "onboard-loose.json",
        "onboard-strict.json",
        "onboard.json",
    ]
    # A variant's extra seeds keep the teacher its seed 0 chose (deep-loose: deep's), and
    # deep-loose trains nothing: deep's seed 1 saved runs are linked in, task by task.
    deep1 = json.loads((units / "sst2" / "seed1" / "onboard-deep.json").read_text())
    loose1 = json.loads((units / "sst2" / "seed1" / "onboard-loose.json").read_text())
    assert deep1["settings"]["teacher_layers"] == [deep["teacher"]["layers"]]
    assert deep1["settings"]["teacher_lrs"] == [deep["teacher"]["lr"]]
    assert loose1["teacher"]["key"] == deep1["teacher"]["key"] and loose1["tolerance"] == 0.5
    assert all(r["resumed"] for r in loose1["runs"])
    assert report["variants"]["loose"]["seeds"] == [0, 1]
    assert len(report["variants"]["loose"]["rows"][0]["served"]) == 2
    # A rerun trains nothing; a deleted unit is the only one redone.
    calls: list[str] = []
    import finetune

    from mtreg.training import onboard as ob

    real_finetune = finetune.finetune
    monkeypatch.setattr(
        finetune, "finetune", lambda *a, **k: calls.append("ft") or real_finetune(*a, **k)
    )
    monkeypatch.setattr(ob, "onboard", lambda *a, **k: calls.append("onboard"))
    go()
    assert calls == []
    (units / "sst2" / "seed0" / "full-lr0.001.json").unlink()
    go()
    assert calls == ["ft"]
    # A grid change makes the onboarding stale; its registered version holds the old
    # search's weights, so the benchmark stops with what to remove, and trains nothing.
    monkeypatch.setattr(quality_units, "LRS", (1e-3, 3e-3, 9e-3))
    bench = quality.Bench(tiny["root"] / "work", units, ["sst2"])
    try:
        with pytest.raises(RuntimeError, match=r"other settings; remove .*registry\.db"):
            bench.onboard("sst2", 0)
    finally:
        bench.close()
    assert calls == ["ft"] and (units / "sst2" / "seed0" / "onboard.json").is_file()


def test_an_onboard_unit_from_another_search_is_stale(tmp_path: Path) -> None:
    bench = quality.Bench(tmp_path / "work", tmp_path / "units", ["sst2"])
    settings = bench.settings(0)
    unit = {
        "settings": {
            "teacher_layers": list(quality_units.TEACHER_LAYERS),
            "teacher_lrs": list(quality_units.LRS),
            "student_lrs": list(quality_units.STUDENT_LRS),
        },
        "tolerance": 0.99,
    }
    assert quality_units.searched_as(unit, settings)
    assert not quality_units.searched_as(unit, bench.settings(0, tolerance=0.98))
    assert not quality_units.searched_as(
        unit, bench.settings(0, teacher_lrs=quality_units.LRS[:-1])
    )
    assert not quality_units.searched_as(unit, bench.settings(0, teacher_layers=(2, 3, 4)))


def test_link_missing_adds_only_finished_files_the_target_lacks(tmp_path: Path) -> None:
    source, target = tmp_path / "base", tmp_path / "variant"
    (source / "task" / "1.0.0").mkdir(parents=True)
    (source / "task" / "1.0.0" / "teacher.safetensors").write_text("base")
    (source / "task" / "1.0.0" / ".incoming-x").write_text("half")  # still being written
    (source / "task" / "1.0.0" / "student.json").write_text("base")
    (target / "task" / "1.0.0").mkdir(parents=True)
    (target / "task" / "1.0.0" / "student.json").write_text("own")
    quality_units.link_missing(source, target)
    quality_units.link_missing(tmp_path / "absent", target)
    folder = target / "task" / "1.0.0"
    assert sorted(p.name for p in folder.iterdir()) == ["student.json", "teacher.safetensors"]
    assert (folder / "student.json").read_text() == "own"
    assert (folder / "teacher.safetensors").samefile(
        source / "task" / "1.0.0" / "teacher.safetensors"
    )


def _best(units: Path) -> str:
    best = quality_units.best_full(units, "sst2", 0)
    assert best is not None
    return json.dumps(best)


def _tiny_registry(ckpt: Path):
    real = benchtasks.open_registry

    def open_registry(home: Path, config: dict, trunk_folder=None, trunk: str = "minilm"):
        return real(home, config, ckpt, trunk)

    return open_registry


def test_mtreg_report_from_the_registry(tiny: dict[str, Path]) -> None:
    from mtreg.training.onboard import onboard
    from mtreg.training.settings import Settings

    config = {"sst2": {"sizes": {"train": 64}, "seed": 0}}
    home = tiny["root"] / "home"
    settings = Settings(teacher_layers=(2,), teacher_lrs=(3e-3,), epochs=2, patience=None)
    with benchtasks.open_registry(home, config, tiny["ckpt"]) as registry:
        onboard(registry, "sst2", settings)
        accuracy = registry.versions("sst2")[0].metrics["accuracy"]
    baseline = tiny["root"] / "baseline.json"
    baseline.write_text(
        json.dumps({"baseline": {"sst2": {"metric": "accuracy", "split": "dev", "full": [0.8]}}})
    )
    base = ["--db", f"sqlite:///{home / 'registry.db'}", "--home", str(home)]
    base += ["--plugins-dir", str(home / "plugins")]
    out = tiny["root"] / "report"
    args = [*base, "report", "--tasks", "sst2", "--baseline", str(baseline), "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "| sst2 | accuracy (dev) | 80.0 |" in result.output
    assert f"{100 * accuracy / 0.8:.1f}%" in result.output
    assert (out / "report.png").read_bytes()[:8] == PNG
    data = json.loads((out / "report.json").read_text())
    assert data["rows"][0]["ratio"] == pytest.approx(accuracy / 0.8)
    assert data["overall"]["full_layers"] == 3
    missing = CliRunner().invoke(cli, [*base, "report", "--tasks", "nope"])
    assert missing.exit_code == 1
    bad = tiny["root"] / "bad.json"
    bad.write_text("[1]")
    broken = CliRunner().invoke(cli, [*base, "report", "--baseline", str(bad)])
    assert broken.exit_code == 1 and "cannot read full fine-tuning references" in broken.output
