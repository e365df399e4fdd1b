"""The paper's comparison on this trunk: quality and serving cost of mtreg's merged
bundle against one fully fine-tuned MiniLM-L6 per task.

For every task of :data:`TASKS` (CoLA, SST-2, MRPC, STS-B, RTE, QQP, CLINC150, SNIPS intent
and slots), on the same fixed-seed subsample (bench/benchtasks.py) and the same max length:

1. **full fine-tuning** of the whole model (:mod:`finetune`: embeddings, 6 layers,
   pooler, head, uncached) at every learning rate of :data:`LRS`;
2. **mtreg onboard** (:func:`mtreg.training.onboard.onboard`, the code of ``mtreg onboard``):
   teachers L in :data:`TEACHER_LAYERS` at the *same* learning rates, then students
   l = 1..min(3, L-1) with onboarding's default student rate, the smallest branch within 99%
   of the best teacher, registered into a bundle;
3. the merged bundle of all tasks loaded with ``mtreg.load_bundle`` and scored on dev (and on
   test for the intent sets, which select on dev and report test): the served numbers.

Tuning budget, the same for both methods: learning rate over :data:`LRS` (2e-5..6e-4), up to
:data:`EPOCHS` epochs with early stopping after :data:`PATIENCE` epochs without a better dev
score, best epoch on dev (the first metric), a tie goes to the lower rate. Batch 32, dropout
0.1. Seeds: seed 0 searches; small tasks (:data:`SMALL`) are repeated with seeds 1 and 2 at
the configuration seed 0 chose for each method (full: its lr; onboard: its teacher L and lr,
students searched again), and reported as mean ± std.

Its pieces: the settings and the cached units in bench/quality_units.py (``qu``), scores
and their noise in bench/scores.py, the serving cost in bench/quality_serving.py, the report
in bench/quality_report.py; the units, the run order and the command line here.

Views that keep the ratios honest: every task set against the best constant predictor
(majority label; a ratio between two models that barely clear it says little), and
:data:`VARIANTS` of the onboarding, each with a bundle of its own: a strict tolerance (what
the last percent of quality costs in layers), a looser one (0.98), deeper teachers (L up to
4), and those teachers with the looser tolerance.

Subsampling and lengths (:data:`TASKS`, documented in the results): training sets are
fixed-seed subsamples, sized for the issue's budget of about 3 hours on 2 CPU cores; dev/test
are complete except where capped. Both methods train in mixed precision (:data:`PRECISION`)
with the fused AdamW kernel: on this machine's AMX CPU that made SST-2's full fine-tuning
search 2.7× faster (2,016 → 739 s) and the whole run 2.5× on the 3-rate grid (3.0
process-hours against the 7.5 of an earlier fp32 run with the per-tensor optimizer, which
took 3.8 hours as two processes, over the budget). The report gives the training time of
each phase in process-hours (3.7 on the 4-rate grid).
Max lengths are the built-in plugins' (chosen from each task's length distribution) except
RTE, cut from 256 to 128 tokens (12% of its pairs lose their tail) for cost. Dynamic padding
throughout; teachers and students train on cached fp16 activations.

Serving cost: layers per request (bundle: trunk to the deepest fork plus every branch; N
full models: 6 each), throughput of the bundle against N full models on the same 256
SST-2 dev sentences (tokenised once, batch 32, interleaved repeats, median), parameters,
and the peak RSS of a fresh process holding each. The full models for timing have the full
fine-tuned architecture with the trunk's weights (timing does not depend on the values).

Resumable: every unit (task × seed × method, the bundle evaluation, the serving measurement)
is cached as JSON under bench/results/quality/; a rerun skips what exists and onboarding
resumes at its last finished run (saved runs in the work folder). The report
(bench/results/quality.{json,md,png}) is rewritten after every unit from whatever exists,
marking what is missing.

    nohup python bench/quality.py run > bench/results/quality/run.log 2>&1 &
    # on 2 cores: two one-thread processes over disjoint tasks of about equal cost (two
    # threads of one process mostly wait on each other when anything else runs), then the
    # serving cost measured alone
    export OMP_NUM_THREADS=1
    nohup python bench/quality.py run --tasks stsb rte cola mrpc snips-intent &
    nohup python bench/quality.py run --tasks sst2 qqp clinc150 snips-slots &
    python bench/quality.py serving         # after both: serving cost, nothing else running
    python bench/quality.py run --variants loose deep deep-loose    # variants, after the run
    python bench/quality.py serving --variants loose deep deep-loose   # their serving cost
    python bench/quality.py score           # score the bundles as they stand, then report
    python bench/quality.py report          # rewrite the report from the cached results
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import benchtasks
import quality_units as qu
from quality_report import write_report
from quality_serving import measure_serving
from quality_units import (
    Variant,
    best_full,
    cached,
    link_missing,
    log,
    plugin_config,
    read_json,
    searched_as,
    unit_path,
    write_json,
)
from scores import score_bundle, scored

# -- the units -----------------------------------------------------------------------------


class Bench:
    """Registries (one per seed) and the settings of one benchmark run."""

    def __init__(self, work: Path, units: Path, tasks: Sequence[str]) -> None:
        self.work, self.units, self.tasks = work, units, list(tasks)
        self._registries: dict[str, Any] = {}
        self._bases = {v.suffix: v.base for v in qu.VARIANTS}

    def registry(self, seed: int, variant: str = "") -> Any:
        """Return the registry of ``seed`` (its own home, so each seed has its bundle), or of
        a variant of its onboarding (:data:`VARIANTS`), a home of its own."""
        name = f"seed{seed}{variant}"
        if name not in self._registries:
            home = self.work / name
            self._registries[name] = benchtasks.open_registry(home, plugin_config())
        return self._registries[name]

    def link_base(self, task: str, seed: int, variant: str) -> None:
        """Link into the variant's home the task's saved onboarding runs and the cached
        activations its base has and the home lacks, so only what differs trains. Per task,
        just before it onboards: a process onboarding other tasks may still be writing
        them."""
        from mtreg.artifacts.home import Home

        base, home = (
            Home(self.work / f"seed{seed}{self._bases[variant]}"),
            Home(self.work / f"seed{seed}{variant}"),
        )
        link_missing(base.onboarding(task), home.onboarding(task))
        link_missing(base.cache, home.cache)

    def close(self) -> None:
        """Close every registry."""
        for registry in self._registries.values():
            registry.close()

    def settings(self, seed: int, **overrides: Any) -> Any:
        """Return the onboarding Settings of this benchmark for ``seed``."""
        from mtreg.training.settings import Settings, with_overrides

        base = Settings(
            teacher_layers=qu.TEACHER_LAYERS,
            teacher_lrs=qu.LRS,
            student_lrs=qu.STUDENT_LRS,
            epochs=qu.EPOCHS,
            patience=qu.PATIENCE,
            seed=seed,
            device="cpu",
            precision=qu.PRECISION,
        )
        return with_overrides(base, overrides)

    def full(self, task: str, seed: int, lr: float) -> dict[str, Any]:
        """Full fine-tuning of ``task`` at ``lr`` (cached unit): dev and test scores with
        predictions, history and seconds."""

        def compute() -> dict[str, Any]:
            import finetune as ft

            from mtreg.training.data import encode
            from mtreg.training.job import load_split, prepare

            log(f"{task} seed {seed}: full fine-tuning lr {lr:g}")
            job = prepare(self.registry(seed), task, self.settings(seed))
            result = ft.finetune(job, lr, progress=lambda line: log(f"  {task} full {line}"))
            pad = ft.pad_id(job)
            head, metrics = job.spec.head, job.metrics
            out = {"task": task, "seed": seed, **result.to_dict()}
            out["dev"] = scored(
                head, metrics, ft.predict_live(result.model, job.dev, pad), job.dev.labels
            )
            if task in qu.TEST_TASKS:
                test = encode(
                    job.tokenizer,
                    load_split(job.spec, "test"),
                    job.spec.inputs,
                    head,
                    job.max_length,
                )
                out["test"] = scored(
                    head, metrics, ft.predict_live(result.model, test, pad), test.labels
                )
            out["train_size"], out["dev_size"] = len(job.train), len(job.dev)
            return out

        return cached(unit_path(self.units, task, seed, f"full-lr{lr:g}"), compute)

    def onboard(self, task: str, seed: int, variant: str = "", **overrides: Any) -> dict[str, Any]:
        """``mtreg onboard`` of ``task`` with ``seed`` into the seed's (or variant's) registry
        (cached unit)."""
        path = unit_path(self.units, task, seed, f"onboard{variant}")
        registry = self.registry(seed, variant)
        settings = self.settings(seed, **overrides)
        found = read_json(path)
        registered = {t.name for t in registry.tasks() if t.active_version}
        if found is not None and not searched_as(found, settings):
            if task in registered:  # its version holds the old search's weights
                raise RuntimeError(
                    f"{task} seed {seed}{variant}: onboarded under other settings; remove "
                    f"{registry.home.database_file}* (saved runs stay)"
                    " to register it afresh"
                )
            found = None
        if found is not None and task in registered:
            return found
        from mtreg.training.onboard import onboard

        if variant:
            self.link_base(task, seed, variant)

        log(f"{task} seed {seed}{variant}: mtreg onboard")
        started = time.perf_counter()
        report = onboard(
            registry,
            task,
            settings,
            progress=lambda line: log(f"  {task} {line}"),
        )
        data = {**report.to_dict(), "seed": seed, "wall_s": time.perf_counter() - started}
        write_json(path, data)
        return data

    def rerun(
        self, task: str, seed: int, variant: str = "", base: str = "", **overrides: Any
    ) -> dict[str, Any]:
        """Onboard ``task`` again at the teacher seed 0's onboarding ``base`` chose (its L and
        lr only, whatever ``overrides`` say; saved runs resume where the home has them),
        students searched again (cached unit).

        Raises:
            RuntimeError: seed 0 of the task has not been onboarded (as ``base``).
        """
        searched = read_json(unit_path(self.units, task, 0, f"onboard{base}"))
        if searched is None:
            raise RuntimeError(f"{task}: seed 0 has not been onboarded{base} yet")
        teacher = searched["teacher"]
        pinned = {"teacher_layers": (teacher["layers"],), "teacher_lrs": (teacher["lr"],)}
        return self.onboard(task, seed, variant, **{**overrides, **pinned})

    def bundle(self, seed: int, variant: str = "") -> dict[str, Any] | None:
        """Score every task of the seed's (or variant's) latest bundle through
        ``mtreg.load_bundle`` (cached per bundle id); None when there is no bundle yet."""
        import mtreg
        from mtreg.training.job import load_split

        registry = self.registry(seed, variant)
        try:
            record = registry.bundle("latest")
        except mtreg.MtregError:
            return None
        path = self.units / f"bundle-seed{seed}{variant}.json"
        found = read_json(path)
        if found is not None and found.get("bundle_id") == record.id:
            return found
        members = ", ".join(sorted(record.members))
        log(f"seed {seed}{variant}: scoring bundle {record.id[:12]} ({members})")
        bundle = mtreg.load_bundle(registry.bundle_path("latest"))
        discovery = registry.discover()
        tasks: dict[str, Any] = {}
        for task in bundle.tasks:
            spec = discovery.task(task).spec
            splits = ("dev", "test") if task in qu.TEST_TASKS else ("dev",)
            tasks[task] = {
                split: score_bundle(bundle, task, load_split(spec, split), spec.metrics)
                for split in splits
            }
            tasks[task]["fork_depth"] = bundle.info[task].fork_depth
            tasks[task]["num_layers"] = bundle.info[task].num_layers
        data = {"bundle_id": record.id, "seed": seed, "tasks": tasks}
        write_json(path, data)
        return data

    def serving(self, variant: str = "") -> dict[str, Any] | None:
        """Serving cost of seed 0's (or a variant's) bundle against one full model per task
        (cached per bundle id); None without a bundle."""
        import mtreg

        registry = self.registry(0, variant)
        try:
            record = registry.bundle("latest")
        except mtreg.MtregError:
            return None
        path = self.units / f"serving{variant}.json"
        found = read_json(path)
        if found is not None and found.get("bundle_id") == record.id:
            return found
        log(f"serving cost of bundle {record.id[:12]}")
        data = {"bundle_id": record.id, **measure_serving(registry.bundle_path("latest"))}
        write_json(path, data)
        return data


# -- the plan ------------------------------------------------------------------------------


def run(
    bench: Bench,
    seeds: Sequence[int],
    write: Callable[[], None],
    variants: Sequence[Variant] = (),
) -> None:
    """Run every missing unit in priority order, rewriting the report after each: seed 0 of
    every task (full search, onboard) and its bundle, the extra seeds of the small tasks and
    their bundles, the serving cost (when ``bench`` covers every task: a run split over
    processes measures it afterwards, alone, with ``serving``), then each of ``variants``
    the same way (seed 0, then the extra seeds at the teacher its seed 0 chose) with
    bundles of its own. A failing unit is logged and skipped."""

    extra = [s for s in seeds if s != 0]

    def attempt(what: str, fn: Callable[[], Any]) -> Any:
        try:
            value = fn()
        except Exception:
            log(f"FAILED {what}:\n{traceback.format_exc()}")
            value = None
        try:
            write()
        except Exception:  # a report bug must not stop the training run
            log(f"FAILED writing the report:\n{traceback.format_exc()}")
        return value

    for task in bench.tasks:
        for lr in qu.LRS:
            attempt(f"{task} full lr {lr:g}", lambda task=task, lr=lr: bench.full(task, 0, lr))
        attempt(f"{task} onboard", lambda task=task: bench.onboard(task, 0))
    attempt("bundle seed 0", lambda: bench.bundle(0))
    for seed in extra:
        for task in (t for t in bench.tasks if t in qu.SMALL):
            chosen = best_full(bench.units, task, 0)
            if chosen is None or read_json(unit_path(bench.units, task, 0, "onboard")) is None:
                log(f"{task} seed {seed}: skipped, seed 0 is not complete")
                continue
            attempt(
                f"{task} seed {seed} full",
                lambda t=task, s=seed, lr=chosen["lr"]: bench.full(t, s, lr),
            )
            attempt(f"{task} seed {seed} onboard", lambda t=task, s=seed: bench.rerun(t, s))
        attempt(f"bundle seed {seed}", lambda seed=seed: bench.bundle(seed))
    if set(bench.tasks) == set(qu.TASKS):
        attempt("serving", bench.serving)
    for variant in variants:
        for task in bench.tasks:
            attempt(
                f"{task} onboard{variant.suffix}",
                lambda t=task, v=variant: (
                    bench.rerun(t, 0, v.suffix, v.base, **v.overrides)
                    if v.pin_teacher
                    else bench.onboard(t, 0, v.suffix, **v.overrides)
                ),
            )
        attempt(f"bundle seed 0{variant.suffix}", lambda v=variant: bench.bundle(0, v.suffix))
        if set(bench.tasks) == set(qu.TASKS):
            attempt(f"serving{variant.suffix}", lambda v=variant: bench.serving(v.suffix))
        # The extra seeds keep the teacher seed 0 of the variant (or of its base) chose.
        pinned_by = variant.base if variant.pin_teacher else variant.suffix
        for seed in extra:
            for task in (t for t in bench.tasks if t in qu.SMALL):
                attempt(
                    f"{task} seed {seed} onboard{variant.suffix}",
                    lambda t=task, s=seed, v=variant, by=pinned_by: bench.rerun(
                        t, s, v.suffix, by, **v.overrides
                    ),
                )
            attempt(
                f"bundle seed {seed}{variant.suffix}",
                lambda s=seed, v=variant: bench.bundle(s, v.suffix),
            )


def main(argv: list[str] | None = None) -> None:
    """``run`` (resume the benchmark) or ``report`` (rewrite the report only)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "score", "serving", "report"])
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(qu.TASKS),
        choices=list(qu.TASKS),
        help="run (or score) these tasks only; the report always covers every task",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(qu.SEEDS),
        help="run (or score) these seeds only; the report always covers every seed",
    )
    parser.add_argument("--work", type=Path, default=qu.WORK, help=f"default: {qu.WORK}")
    parser.add_argument("--units", type=Path, default=qu.UNITS)
    parser.add_argument("--out", type=Path, default=qu.RESULTS)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[],
        choices=[v.name for v in qu.VARIANTS],
        help="also run these variants of the onboarding (seed 0, then extra seeds), afterwards",
    )
    args = parser.parse_args(argv)

    def write() -> None:  # over every task and seed: --tasks and --seeds choose what runs
        write_report(args.units, args.out, qu.TASKS, qu.SEEDS)

    if args.command in ("score", "serving", "report"):
        if args.command != "report":
            bench = Bench(args.work, args.units, args.tasks)
            try:
                if args.command == "score":  # the bundles as they stand, while a run goes on
                    for seed in args.seeds:
                        bench.bundle(seed)
                else:  # measured again, alone: nothing else may run meanwhile
                    for suffix in ["", *(f"-{name}" for name in args.variants)]:
                        (args.units / f"serving{suffix}.json").unlink(missing_ok=True)
                        bench.serving(suffix)
            finally:
                bench.close()
        write()
        print((args.out / "quality.md").read_text())
        return
    log(f"quality run: tasks {args.tasks}, seeds {args.seeds}, work {args.work}, pid {os.getpid()}")
    bench = Bench(args.work, args.units, args.tasks)
    try:
        chosen = [v for v in qu.VARIANTS if v.name in args.variants]
        run(bench, args.seeds, write, chosen)
    finally:
        bench.close()
    write()
    log("done")


if __name__ == "__main__":
    main()
