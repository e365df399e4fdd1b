"""Bring your own teacher: a branch distilled from a team's fully fine-tuned model, against
that model and against onboarding the same task from its data.

For each task (default: SST-2 and CLINC150, fixed-seed subsamples of bench/benchtasks.py) on
the packaged MiniLM-L6, in one run:

1. the team's model: one full fine-tuning (:func:`finetune.finetune`, ``--full-lr``),
   saved as a standard transformers ``*ForSequenceClassification`` folder (safetensors,
   config, tokenizer) through mtreg's own HF writer;
2. ``mtreg onboard TASK --teacher FOLDER`` in a fresh home: the model is the teacher, only
   students are trained, by the student search at every fork depth N − L of the teacher
   sizes L (the default search's, or ``--teacher-layers``);
3. ``mtreg onboard TASK`` from data (teacher search over the same L, then distillation) in
   another fresh home.

Reported per task: each score on the split the task is reported on (dev; test for the
intent sets, whose choices are made on dev as always), the distilled branch as a share of
its teacher on that split (the goal: >= 99%), the branch's layers and fork depth k, the
depths its students were tried at, and the CPU and wall seconds of 2 against 3 (the full
fine-tuning in 1 is the team's own cost, shown for scale).

    python bench/teacher.py [--tasks sst2 clinc150] [--train 3000] [--dev N] [--epochs E]
                            [--teacher-layers L ...] [--threads T]

writes bench/results/teacher.json and bench/results/teacher.md. Resumable: each task's row
is kept under bench/results/teacher/TASK.json as soon as its three runs finish, and a rerun
with the same settings reuses it (``--fresh`` runs every task again), so a run cut short by
the end of a session goes on from the next task.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchtasks  # noqa: E402  (bench/ is not a package)
from onboarding import Clock, _say  # noqa: E402
from quality_units import TEST_TASKS  # noqa: E402
from scores import score_bundle, scored  # noqa: E402

RESULTS = HERE / "results"


def save_teacher(job: Any, model: Any, folder: Path) -> Path:
    """Write a fully fine-tuned :class:`Standalone` as a transformers classifier folder."""
    from mtreg import heads
    from mtreg.artifacts.hf_model import classifier_config, classifier_state_dict, write_config
    from mtreg.artifacts.tensor_file import write_safetensors

    folder.mkdir(parents=True)
    embeddings = {k.removeprefix("embeddings."): v for k, v in model.trunk.state_dict().items()}
    branch = {k: v for k, v in model.branch.state_dict().items() if not k.startswith("context.")}
    head = job.spec.head
    tensors = classifier_state_dict(job.config, embeddings, [], branch, head.per_token)
    write_safetensors(folder / "model.safetensors", tensors)
    kind = heads.get(head.kind)
    n = job.config.num_hidden_layers
    config = classifier_config(
        job.config, n, head, f"For{kind.hf_architecture}", kind.hf_problem_type
    )
    write_config(folder / "config.json", config)
    job.tokenizer.save_pretrained(str(folder))
    return folder


def test_scores(job: Any, model: Any, homes: list[Path], config: dict) -> dict[str, float]:
    """Score the teacher ``model`` and each home's served branch of ``job``'s task on the
    test split; return home name (and ``teacher``) -> metric."""
    import finetune

    import mtreg
    from mtreg.training.data import encode
    from mtreg.training.job import load_split

    spec, metric = job.spec, job.metrics[0]
    examples = load_split(spec, "test")
    test = encode(job.tokenizer, examples, spec.inputs, spec.head, job.max_length)
    logits = finetune.predict_live(model, test, finetune.pad_id(job))
    scores = {"teacher": scored(spec.head, job.metrics, logits, test.labels)["metrics"][metric]}
    for home in homes:
        with benchtasks.open_registry(home, config) as registry:
            bundle = mtreg.load_bundle(registry.bundle_path("latest"))
        served = score_bundle(bundle, spec.name, examples, job.metrics)
        scores[home.name] = served["metrics"][metric]
    return scores


def run_task(work: Path, config: dict, task: str, args: argparse.Namespace) -> dict[str, Any]:
    """The three runs of one task; return its row."""
    import finetune

    from mtreg.training.job import prepare
    from mtreg.training.onboard import onboard
    from mtreg.training.settings import Settings

    sizes = tuple(args.teacher_layers) if args.teacher_layers else None
    settings = Settings(epochs=args.epochs, teacher_layers=sizes)  # both onboardings
    with benchtasks.open_registry(work / f"{task}-full", config) as registry:
        job = prepare(registry, task, settings, progress=_say)
        with Clock() as full_clock:
            full = finetune.finetune(job, args.full_lr, args.epochs)
        folder = save_teacher(job, full.model.eval(), work / f"{task}-teacher")
    with benchtasks.open_registry(work / f"{task}-distil", config) as registry, Clock() as distil:
        taught = onboard(registry, task, settings, teacher=folder, progress=_say)
    with benchtasks.open_registry(work / f"{task}-data", config) as registry, Clock() as data:
        learnt = onboard(registry, task, settings, progress=_say)
    metric = taught.metric
    teacher_score = taught.teacher.dev_metrics[metric]
    row = {
        "task": task,
        "metric": metric,
        "split": "dev",
        "full_finetune": {**full_clock.to_dict(), "dev": full.dev_metrics[metric]},
        "teacher_dev_as_distilled": teacher_score,
        "distilled": {
            **distil.to_dict(),
            "dev": taught.chosen.dev_metrics[metric],
            "layers": taught.chosen.layers,
            "fork_depth": taught.chosen.fork_depth,
            "depths_tried": sorted({r.fork_depth for r in taught.runs}),
            "runs": len(taught.runs),
        },
        "from_data": {
            **data.to_dict(),
            "dev": learnt.chosen.dev_metrics[metric],
            "layers": learnt.chosen.layers,
            "fork_depth": learnt.chosen.fork_depth,
            "runs": len(learnt.runs),
        },
        "share_of_teacher": taught.chosen.dev_metrics[metric] / teacher_score,
        "cpu_ratio_vs_from_data": distil.cpu / max(data.cpu, 1e-9),
        "wall_ratio_vs_from_data": distil.wall / max(data.wall, 1e-9),
    }
    if task in TEST_TASKS:
        homes = [work / f"{task}-distil", work / f"{task}-data"]
        test = test_scores(job, full.model.eval(), homes, config)
        row["split"] = "test"
        row["full_finetune"]["test"] = test["teacher"]
        row["distilled"]["test"] = test[homes[0].name]
        row["from_data"]["test"] = test[homes[1].name]
        row["share_of_teacher"] = test[homes[0].name] / test["teacher"]
    return row


def markdown(result: dict[str, Any]) -> str:
    """Return the results as a Markdown table."""
    lines = [
        "| task | metric | split | teacher (full FT) | distilled branch | % of teacher | l, k "
        "| k tried | --teacher CPU s | from data CPU s | CPU ratio | from-data branch (l, k) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        d, f, split = row["distilled"], row["from_data"], row.get("split", "dev")
        lines.append(
            f"| {row['task']} | {row['metric']} | {split} | {row['full_finetune'][split]:.4f} "
            f"| {d[split]:.4f} | {row['share_of_teacher']:.1%} | {d['layers']}, "
            f"{d['fork_depth']} | {', '.join(map(str, d['depths_tried']))} "
            f"| {d['cpu_s']:.0f} | {f['cpu_s']:.0f} | {row['cpu_ratio_vs_from_data']:.2f}x "
            f"| {f[split]:.4f} ({f['layers']}, {f['fork_depth']}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table and write JSON and Markdown to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "clinc150"])
    parser.add_argument("--train", type=int, default=3000, help="training examples (subsample)")
    parser.add_argument("--dev", type=int, default=None, help="dev examples (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="default: onboard's auto")
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument(
        "--teacher-layers",
        type=int,
        nargs="+",
        help="teacher sizes L of both onboardings [default: the search's, 2 3 of MiniLM's 6]",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads [torch's]")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true", help="ignore the rows of earlier runs")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {"train": args.train, **({"dev": args.dev} if args.dev else {})}
    config = {task: {"sizes": sizes, "seed": 0} for task in args.tasks}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    # What a task's row depends on: an earlier row is reused only when these match.
    same = {k: settings[k] for k in ("train", "dev", "epochs", "full_lr", "teacher_layers")}
    same["threads"] = torch.get_num_threads()
    rows = []
    for task in args.tasks:
        unit = args.out / "teacher" / f"{task}.json"
        kept = json.loads(unit.read_text()) if unit.is_file() and not args.fresh else {}
        wanted = {**same, **({"reported_on": "test"} if task in TEST_TASKS else {})}
        if kept.get("settings") != wanted:
            with tempfile.TemporaryDirectory(prefix="mtreg-bench-teacher-") as work:
                kept = {"settings": wanted, "row": run_task(Path(work), config, task, args)}
            unit.parent.mkdir(parents=True, exist_ok=True)
            unit.write_text(json.dumps(kept, indent=1) + "\n")
        rows.append(kept["row"])
    result = {
        "rows": rows,
        "settings": settings,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
    }
    table = markdown(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "teacher.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "teacher.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
