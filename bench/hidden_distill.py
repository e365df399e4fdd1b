"""One-layer students with a hidden-state loss, on the choosing tasks: a diagnosis for the
quality protocol's next round (issue #22), not a choice.

The protocol's bundle keeps 39% of the layers because a 1-layer student of the 3-layer
teacher falls short of the 0.99 tolerance on half the tasks; bench/students.py showed that
the students' rate does not close the gap. This asks whether the loss does: the same
1-layer students (same teacher, seed, rates, epochs and early stopping as
bench/students.py, whose runs are resumed, not retrained), once with the method's loss
(hard + soft) and once with the mean squared error between the student's top hidden state
and the teacher's added (``Split.teacher_states``), every run scored on dev.

    python bench/hidden_distill.py --run [--seeds 0 1]   # after bench/students.py's units
    python bench/hidden_distill.py --report

A unit is a task and seed; it starts only once bench/students.py has finished that task
and seed (its teacher and plain students are taken from there). Units are kept under
bench/results/hidden_distill/TASK/; the report is bench/results/hidden_distill.{md,json}.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import protocol  # noqa: E402  (bench/ is not a package)
import protocol_choice  # noqa: E402
import students  # noqa: E402

ROOT = HERE / "results" / "hidden_distill"


class HiddenRunner(students.StudentRunner):
    """bench/students.py's runner; a unit trains 1-layer students with each loss."""

    def __call__(self, unit: protocol.Unit) -> dict[str, Any]:
        """Compute ``unit``: its teacher's 1-layer students at each rate and loss."""
        from mtreg.training import stages
        from mtreg.training.job import hidden_states, prepare
        from mtreg.training.loop import Split, fit, predict_states
        from mtreg.training.settings import epoch_cap

        protocol.log(f"{unit.task} {unit.name}: start")

        def say(line: str) -> None:
            protocol.log(f"  {unit.task} {line}")

        settings = replace(self.settings(unit), student_layers=(1,))
        job = prepare(self.registry(unit.seed), unit.task, settings, progress=say)
        stages.train_teachers(job)  # resumed from bench/students.py's saved run
        plain = stages.distill(job)  # likewise
        teacher_run, teacher = stages.chosen_teacher(job)
        k, metric = teacher_run.fork_depth, job.metrics[0]
        train_hidden = hidden_states(job, "train", [k])[k]
        dev = Split(hidden_states(job, "dev", [k])[k], job.dev.labels)
        logits = stages.teacher_logits(job, teacher, teacher_run, train_hidden)
        targets = predict_states(teacher, Split(train_hidden, job.train.labels))
        train = Split(train_hidden, job.train.labels, logits, targets)
        epochs = epoch_cap(job.settings, "student")
        runs = [
            _row("soft", r.lr, r.dev_metrics[metric], r.best_epoch, r.epochs_run, r.seconds)
            for r in plain.runs
        ]
        for lr in job.settings.student_lrs:
            result = fit(
                stages.student_branch(job, teacher, 1),
                job.spec.head,
                train,
                dev,
                job.metrics,
                job.recipe(lr, epochs),
                device=job.device,
                progress=lambda line, lr=lr: say(f"student-l1-states-lr{lr:g} {line}"),
            )
            ran = len(result.history)
            score = result.dev_metrics[metric]
            runs.append(_row("soft+states", lr, score, result.best_epoch, ran, result.seconds))
        return {
            "metric": metric,
            "precision": job.settings.precision,
            "train_size": len(job.train),
            "dev_size": len(job.dev),
            "teacher": teacher_run.dev_metrics[metric],
            "runs": runs,
        }


def _row(loss: str, lr: float, score: float, best: int, ran: int, seconds: float) -> dict:
    return {"loss": loss, "lr": lr, "score": score, "epochs": f"{best}/{ran}", "seconds": seconds}


def units(seeds: tuple[int, ...]) -> list[protocol.Unit]:
    """Return the units whose bench/students.py unit is finished: one per task and seed."""
    return [u for u in students.units(seeds) if protocol.read_unit(u.path(students.ROOT))]


def rows(root: Path = ROOT) -> list[dict[str, Any]]:
    """Return a row per finished unit and run: task, seed, teacher and student dev scores,
    loss, rate, epochs (best/run) and the student's share of its teacher."""
    out = []
    for unit in protocol_choice.load(root).values():
        for run in unit["runs"]:
            share = run["score"] / unit["teacher"] if unit["teacher"] else None
            out.append(
                {"task": unit["unit"]["task"], "seed": unit["unit"]["seed"]}
                | {"teacher": unit["teacher"], "share": share}
                | run
            )
    return out


def summary(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return per (loss, rate), then per loss for the best rate in each unit: the mean
    share of the teacher and how many units' students come within the tolerance (see
    ``students.summary``)."""
    return students.summary(found, "loss")


def report(root: Path = ROOT, out: Path = HERE / "results") -> str:
    """Write hidden_distill.{md,json} under ``out`` from the finished units; return the
    markdown."""
    found = rows(root)
    summed = summary(found)
    lines = ["# One-layer students with a hidden-state loss (bench/hidden_distill.py)", ""]
    lines += [
        f"Choosing tasks only. Teacher: {students.TEACHER_LAYERS} layers at "
        f"{students.TEACHER_LR:g} (fork depth 3 of MiniLM-L6); 1-layer students from its "
        "bottom layer, trained with hard + soft loss (the method's) or with the mean squared "
        "error to the teacher's top hidden state added; same seed, rates and epoch rule. "
        "Dev scores (x100). A diagnosis, not a choice.",
        "",
    ]
    lines += students.tables(found, summed, "loss", "loss", "---")
    return students.write_report(out / "hidden_distill", lines, {"summary": summed, "rows": found})


def main(argv: list[str] | None = None) -> None:
    """Parse the command line; run units and/or write the report."""

    def run(seeds: tuple[int, ...], until: float | None) -> None:
        found = units(seeds)
        if not found:
            protocol.log("no unit ready: run bench/students.py --run for these seeds first")
        protocol.run_units(found, HiddenRunner(students.WORK), ROOT, until)

    students.command(__doc__, run, report, argv)


if __name__ == "__main__":
    main()
