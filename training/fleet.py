"""Onboarding many tasks at once (``mtreg onboard A B C``, ``mtreg onboard --all``): one
after another in this process, or one Ray task per task on a Ray cluster (``--engine ray``).

Every task takes the same path, :func:`onboard_one` (prepare, search, choose, write and
register: :func:`mtreg.training.onboard.onboard`); on Ray it runs in a worker
(:func:`onboard_task`) that opens the same registry (:class:`Place`) and sets torch's
threads to the CPUs Ray gave it. Running them side by side relies on what onboarding
already does, not on anything new:

- registration is a write transaction of the registry, whose lock (SQLite's ``BEGIN
  IMMEDIATE``, PostgreSQL's advisory lock) serialises the workers' registrations and
  bundle rebuilds;
- each finished training run is saved under the home's ``onboarding/<task>/<version>/``
  (:mod:`mtreg.training.stages`) and, with a remote store, in the bucket
  (:mod:`mtreg.training.checkpoints`), so a task that Ray runs again after its worker died
  (``max_retries``), on any node, takes the runs it had finished and trains only the rest;
- a task's failure is caught where it runs and comes back as its :class:`Outcome`, one
  line; the other tasks go on.

Ray is the optional extra ``mtreg[ray]``, imported here only when ``engine="ray"``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtreg.core.cluster import connect
from mtreg.core.extras import require
from mtreg.core.spec import validate_name
from mtreg.errors import MtregError, NotFound
from mtreg.registry.api import Registry
from mtreg.training.onboard import OnboardReport, onboard
from mtreg.training.progress import Progress, prefixed

if TYPE_CHECKING:
    from mtreg.training.settings import Settings

ENGINES = ("local", "ray")
# Ray runs a task again this many times when its worker process dies (a node lost, a
# worker killed); each retry resumes after the runs the task had finished.
RETRIES = 3


@dataclass(frozen=True)
class Place:
    """Where a worker finds the registry this process uses: its database URL, home,
    plugin paths and object store, all absolute (a worker's working folder is Ray's)."""

    url: str
    home: str
    plugins_dirs: tuple[str, ...]
    store: str

    @classmethod
    def of(cls, registry: Registry) -> Place:
        """Return the place of ``registry``."""
        home = registry.home.root.resolve()
        url = registry.url
        if url == registry.home.sqlite_url:  # a relative home gives a relative SQLite path
            url = f"sqlite:///{home / registry.home.database_file.name}"
        objects = registry.objects
        store = objects.location if objects.remote is not None else str(objects.root.resolve())
        dirs = tuple(str(Path(p).resolve()) for p in registry.plugins_dirs)
        return cls(url, str(home), dirs, store)

    def open(self) -> Registry:
        """Return a new Registry on this place (it must exist: nothing is created)."""
        return Registry(self.url, self.home, self.plugins_dirs, create=False, store=self.store)


@dataclass
class Outcome:
    """One task's onboarding: its report, or the one-line error that stopped it."""

    task: str
    report: OnboardReport | None = None
    error: str | None = None
    seconds: float = 0.0
    threads: int = 0  # torch's intra-op threads where it ran

    @property
    def ok(self) -> bool:
        """True when the task was onboarded."""
        return self.error is None

    def line(self) -> str:
        """Return the one line that reports this outcome."""
        if self.report is None:
            return f"{self.task}: failed: {self.error}"
        report, chosen = self.report, self.report.chosen
        change = "trained, not registered"
        if report.changes is not None and report.changes.tasks:
            change = str(report.changes.tasks[0].change)
        score = chosen.dev_metrics[report.metric]
        return (
            f"{self.task} {report.version}: {change}, chose {chosen.name} at depth "
            f"{chosen.fork_depth} ({report.metric} {score:.4f}) in {self.seconds:.1f}s"
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "task": self.task,
            "ok": self.ok,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "threads": self.threads,
            "report": self.report.to_dict() if self.report is not None else None,
        }


@dataclass
class Pending:
    """What ``mtreg onboard --all`` onboards, and what it leaves out for want of a trunk."""

    tasks: list[str]
    no_trunk: list[str]


def pending_tasks(registry: Registry) -> Pending:
    """Return the tasks ``mtreg onboard --all`` onboards: every task a plugin offers with a
    dataset loader and a registered trunk whose current version is not registered yet,
    sorted by name; and, apart, those that would be but for their trunk."""
    trunks = {t.name for t in registry.trunks()}
    pending = Pending([], [])
    for name, loaded in sorted(registry.discover().tasks.items()):
        if loaded.spec.load_dataset is None:
            continue  # nothing to train on: registered from its plugin's weights, if any
        try:
            known = {v.version for v in registry.versions(name)}
        except NotFound:
            known = set()
        if loaded.spec.version in known:
            continue
        (pending.tasks if loaded.spec.trunk in trunks else pending.no_trunk).append(name)
    return pending


def onboard_one(
    registry: Registry,
    task: str,
    settings: Settings,
    *,
    data_dir: str | Path | None = None,
    promote: bool = False,
    progress: Progress | None = None,
) -> Outcome:
    """Onboard ``task`` (:func:`~mtreg.training.onboard.onboard`); return its Outcome.

    Never raises for the task's own failure: it becomes the Outcome's one-line error, so
    that one task cannot end the others.
    """
    started = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        report = onboard(
            registry,
            task,
            settings,
            data_dir=data_dir,
            promote=promote,
            progress=prefixed(progress, f"{task}:"),
        )
    except MtregError as exc:
        return Outcome(task, error=_one_line(str(exc)), seconds=_since(started), threads=threads)
    except Exception as exc:  # plugin code and a bug alike: one task, not the whole fleet
        error = f"{type(exc).__name__}: {_one_line(str(exc))}"
        return Outcome(task, error=error, seconds=_since(started), threads=threads)
    return Outcome(task, report=report, seconds=_since(started), threads=threads)


def onboard_many(
    registry: Registry,
    tasks: Sequence[str],
    settings: Settings,
    *,
    engine: str = "local",
    address: str | None = None,
    cpus_per_task: float = 1,
    data_dir: str | Path | None = None,
    promote: bool = False,
    progress: Progress | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Onboard each of ``tasks``: one after another here (``engine="local"``), or as Ray
    tasks of ``cpus_per_task`` CPUs each on the cluster at ``address`` (``engine="ray"``;
    None: ``$RAY_ADDRESS``, else a Ray started on this machine for the command).

    Returns:
        Every task's Outcome, in the order they finished (``on_outcome`` hears each then).

    Raises:
        MtregError: no tasks, a bad task name or engine, ``cpus_per_task`` not positive;
            Ray not installed; the cluster cannot be reached. A task's own failure is its
            Outcome, never raised.
    """
    names = [validate_name(name) for name in dict.fromkeys(tasks)]
    if not names:
        raise MtregError("no tasks to onboard: name them, or pass --all (`mtreg plugins`)")
    if engine not in ENGINES:
        raise MtregError(f"unknown engine {engine!r}: use {' or '.join(ENGINES)}")
    if not cpus_per_task > 0:
        raise MtregError(f"--cpus-per-task must be positive, got {cpus_per_task}")
    settings.check()
    hear = on_outcome or (lambda outcome: None)
    if engine == "ray":
        where = Path(data_dir).resolve() if data_dir is not None else None
        place = Place.of(registry)
        return _on_ray(place, names, settings, where, promote, address, cpus_per_task, hear)
    outcomes = []
    for name in names:
        outcome = onboard_one(
            registry, name, settings, data_dir=data_dir, promote=promote, progress=progress
        )
        hear(outcome)
        outcomes.append(outcome)
    return outcomes


# -- on Ray -------------------------------------------------------------------------------


def onboard_task(
    place: Place, task: str, settings: Settings, data_dir: Path | None, promote: bool
) -> Outcome:
    """A Ray worker's part: torch's threads set to the CPUs Ray assigned this task, the
    registry at ``place`` opened, then :func:`onboard_one`. Returns its Outcome."""
    ray = require("ray")
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    with place.open() as registry:
        return onboard_one(
            registry, task, settings, data_dir=data_dir, promote=promote, progress=_stderr
        )


def _on_ray(
    place: Place,
    names: list[str],
    settings: Settings,
    data_dir: Path | None,
    promote: bool,
    address: str | None,
    cpus: float,
    hear: Callable[[Outcome], None],
) -> list[Outcome]:
    ray = require("ray")
    # Ray prints its workers' lines and the raylet's notices on this process's stdout,
    # which carries results (--json): they go to stderr, beside the progress.
    with contextlib.redirect_stdout(sys.stderr):
        started = connect(ray, address)
        try:
            remote = ray.remote(onboard_task).options(num_cpus=cpus, max_retries=RETRIES)
            pending = {remote.remote(place, n, settings, data_dir, promote): n for n in names}
            return _collect(ray, pending, hear)
        finally:
            if started:
                ray.shutdown()


def _collect(ray: Any, pending: dict[Any, str], hear: Callable[[Outcome], None]) -> list[Outcome]:
    """Return the Outcome of each Ray task in ``pending`` (object ref -> task), in the
    order they finish, telling ``hear`` of each as it comes."""
    outcomes = []
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(ref)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the worker died more than RETRIES times
            error = f"its Ray worker failed {RETRIES + 1} times: {_one_line(str(exc))}"
            outcome = Outcome(name, error=error)
        hear(outcome)
        outcomes.append(outcome)
    return outcomes


def _stderr(line: str) -> None:
    """A worker's progress: lines on stderr, which Ray forwards to the command's."""
    print(line, file=sys.stderr, flush=True)


def _since(started: float) -> float:
    return time.perf_counter() - started


def _one_line(text: str) -> str:
    return " ".join(text.split())
