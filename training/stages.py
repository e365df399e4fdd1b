"""The two training stages of onboarding: teacher search and distillation.

The method (docs/architecture.md, "The method"): a teacher of L layers fine-tunes the
trunk's top L layers (copied, the trunk itself never changes) plus a pooler and a fresh
head, forking at k = N - L; a student of l < L layers at the same k starts from the
teacher's bottom l layers and head and learns from hard labels plus the teacher's softened
logits.

Both train on the cached activations of :mod:`mtreg.training.job`, and students read the
teacher's cached logits. Every finished run is saved under
``MTREG_HOME/onboarding/<task>/<version>/`` (JSON + safetensors), so a killed onboarding
resumes at the run it reached.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mtreg.artifacts.fingerprint import tensor_group_hash
from mtreg.artifacts.tensor_file import write_safetensors
from mtreg.core.disk import disk_errors, write_atomically
from mtreg.errors import MtregError
from mtreg.nn.layers import Branch
from mtreg.training import checkpoints
from mtreg.training.cache import cache_key
from mtreg.training.job import Job, hidden_states
from mtreg.training.loop import Diverged, Split, fit, nonfinite_weight, predict_logits
from mtreg.training.progress import prefixed
from mtreg.training.settings import Settings, default_teacher_layers, epoch_cap

# Students are searched at l = 1..min(MAX_STUDENT_LAYERS, L-1) unless Settings say otherwise.
MAX_STUDENT_LAYERS = 3


# -- results ------------------------------------------------------------------------------


def run_name(stage: str, layers: int, lr: float, depth: int) -> str:
    """Return the label of a run (its saved files' name), e.g. ``teacher-L3-lr0.0002`` or
    ``student-k3-l1-lr0.0005``: L counts a teacher's layers (its fork depth is N − L), l a
    student's, and k is a student's fork depth (one search may train students at several)."""
    if stage == "teacher":
        return f"teacher-L{layers}-lr{lr:g}"
    return f"{stage}-k{depth}-l{layers}-lr{lr:g}"


@dataclass
class Run:
    """One trained candidate: a teacher (L layers) or a student (l layers)."""

    stage: str  # "teacher" or "student"
    layers: int
    fork_depth: int
    lr: float
    epochs: int
    best_epoch: int
    dev_metrics: dict[str, float]
    seconds: float
    key: str
    epochs_run: int = 0  # fewer than ``epochs`` when it stopped early
    resumed: bool = False

    @property
    def name(self) -> str:
        """A file-name-safe label, e.g. ``teacher-L3-lr0.0002``."""
        return run_name(self.stage, self.layers, self.lr, self.fork_depth)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


@dataclass
class StageResult:
    """The runs of one stage (teacher search or distillation) and the best of them."""

    runs: list[Run]
    best: Run
    settings: dict[str, Any]
    # "<run name>: <why>" of each candidate whose training diverged (nothing of it kept)
    diverged: list[str] = field(default_factory=list)


# -- branches -----------------------------------------------------------------------------


def teacher_branch(job: Job, layers: int, seed: int) -> Branch:
    """Return a fresh teacher of ``layers`` layers: copies of the trunk's top layers
    N-L..N-1, the trunk's pooler (a fresh one if it has none) and a fresh head.

    Raises:
        MtregError: ``layers`` outside 1..N.
    """
    n = job.config.num_hidden_layers
    if not 1 <= layers <= n:
        raise MtregError(f"teacher layers must be in 1..{n} for trunk {job.trunk.name!r}")
    torch.manual_seed(seed)  # the fresh head (and pooler) are seeded
    branch = Branch(job.config, layers, job.spec.head, job.settings.dropout, n - layers)
    for j, layer in enumerate(branch.layers):
        layer.load_state_dict(job.trunk_layer(n - layers + j), strict=True)  # copies
    branch.take_from_trunk(job.component(job.trunk.objects["embeddings"]), job.trunk_pooler())
    return branch


def student_branch(job: Job, teacher: Branch, layers: int) -> Branch:
    """Return a student of ``layers`` layers initialised from the teacher's bottom
    ``layers`` branch layers and everything else it holds (pooler, head, final norm; copies).

    Raises:
        MtregError: ``layers`` not below the teacher's.
    """
    if not 1 <= layers < len(teacher.layers):
        raise MtregError(
            f"a student needs 1..{len(teacher.layers) - 1} layers (its teacher has "
            f"{len(teacher.layers)})"
        )
    student = Branch(job.config, layers, job.spec.head, job.settings.dropout, teacher.fork_depth)
    kept = {f"layers.{j}." for j in range(layers)}
    state = teacher.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("layers.") or k[:9] in kept}
    student.load_state_dict(state, strict=True)
    return student


def _state_hash(branch: Branch) -> str:
    return tensor_group_hash(branch.state_dict())


# -- saved runs ---------------------------------------------------------------------------


def _saved_run_paths(job: Job, run_name: str) -> tuple[Path, Path]:
    return job.stage_dir / f"{run_name}.json", job.stage_dir / f"{run_name}.safetensors"


def save_run(job: Job, run: Run, branch: Branch) -> None:
    """Save a finished run: weights first, then the JSON that marks it complete.

    Raises:
        StorageError: the disk is full or read-only (nothing half-written is left).
    """
    meta_path, weights_path = _saved_run_paths(job, run.name)
    state = {k: v.detach().cpu().contiguous() for k, v in branch.state_dict().items()}
    payload = json.dumps({**run.to_dict(), "resumed": False}, indent=2, sort_keys=True)
    with disk_errors(job.stage_dir):
        write_safetensors(weights_path, state)
        write_atomically(meta_path, payload.encode())
    checkpoints.push(job, run.key, meta_path, weights_path)  # for other machines (#18)


def load_run(job: Job, run_name: str, key: str, layers: int) -> tuple[Run, Branch] | None:
    """Return a saved run and its branch if one exists for exactly ``key`` and its weights
    are finite numbers."""
    meta_path, weights_path = _saved_run_paths(job, run_name)
    checkpoints.pull(job, key, meta_path, weights_path)  # saved on another machine (#18)
    try:
        data = json.loads(meta_path.read_text())
        if data.get("key") != key:
            return None
        state = load_file(weights_path)
        depth = int(data["fork_depth"])  # ModernBERT's layers differ by their index
        branch = Branch(job.config, layers, job.spec.head, job.settings.dropout, depth)
        branch.load_state_dict(state, strict=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
        return None  # absent, stale or damaged: train again
    if nonfinite_weight(branch) is not None:
        return None  # not a run to keep (an older mtreg saved diverged runs): train again
    fields = {k: data[k] for k in Run.__dataclass_fields__ if k in data}
    return replace(Run(**fields), resumed=True), branch.eval()


def _write_marker(job: Job, name: str, payload: Mapping[str, Any]) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True)
    with disk_errors(job.stage_dir):
        write_atomically(job.stage_dir / f"{name}.json", text.encode())


def _read_marker(job: Job, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((job.stage_dir / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


# -- the two stages -----------------------------------------------------------------------


def _best(runs: list[Run], metric: str) -> Run | None:
    """Return the best run (None for none): higher score wins; on a tie the smaller
    branch, then the lower learning rate, then the earlier run."""
    return max(runs, key=lambda r: (r.dev_metrics[metric], -r.layers, -r.lr), default=None)


def _train_run(
    job: Job,
    stage: str,
    layers: int,
    depth: int,
    lr: float,
    epochs: int,
    key: str,
    make_branch: Callable[[], Branch],
    train: Split,
    dev: Split,
    diverged: list[str],
) -> Run | None:
    """Train one candidate, or take its saved run when one matches ``key``; a run is saved
    only once it has finished with finite weights. A run that diverges (see
    :func:`mtreg.training.loop.train_loop`) is said, added to ``diverged`` as "<name>:
    <why>" and nothing of it is saved: returns None, and the search goes on without it.
    Returns the run (its branch is saved).

    Raises:
        MtregError: the run could not train (named with the task and run).
    """
    name = run_name(stage, layers, lr, depth)
    found = load_run(job, name, key, layers)
    if found is not None:
        job.say(f"{name}: done before, resumed from its saved run")
        return found[0]

    try:
        result = fit(
            make_branch(),
            job.spec.head,
            train,
            dev,
            job.metrics,
            job.recipe(lr, epochs),
            device=job.device,
            progress=prefixed(job.progress, name),
        )
    except Diverged as exc:
        diverged.append(f"{name}: {exc}")
        job.say(f"{name} diverged, the search goes on without it: {exc}")
        return None
    except MtregError as exc:
        raise MtregError(f"task {job.spec.name!r}, run {name}: {exc}") from None
    run = Run(
        stage=stage,
        layers=layers,
        fork_depth=depth,
        lr=lr,
        epochs=epochs,
        best_epoch=result.best_epoch,
        dev_metrics=result.dev_metrics,
        seconds=result.seconds,
        key=key,
        epochs_run=len(result.history),
    )
    save_run(job, run, result.branch)
    return run


def teacher_sizes(job: Job) -> tuple[int, ...]:
    """Return the teacher sizes L to search (the settings', else
    :func:`~mtreg.training.settings.default_teacher_layers`): their fork depths N − L are
    the teachers' here and an outside teacher's students' (:mod:`mtreg.training.teacher`).

    Raises:
        MtregError: an L above N.
    """
    n = job.config.num_hidden_layers
    sizes = job.settings.teacher_layers or default_teacher_layers(n)
    if max(sizes) > n:
        raise MtregError(f"teacher layers must be in 1..{n} for trunk {job.trunk.name!r}")
    return tuple(sizes)


def train_teachers(job: Job) -> StageResult:
    """Train a teacher for every L and learning rate of the search; keep the best on dev.

    Each finished run is saved; a rerun with the same data, trunk and recipe takes it from
    there. A run that diverges is recorded and the search goes on. Writes ``teacher.json``
    naming the best one.

    Returns:
        Every finished run, the best, the settings used and the diverged runs.

    Raises:
        MtregError: an L outside 1..N, or every run diverged (nothing is written).
    """
    s, n = job.settings, job.config.num_hidden_layers
    candidates = teacher_sizes(job)
    epochs = epoch_cap(s, "teacher")
    depths = sorted({n - layers for layers in candidates})
    train_hidden = hidden_states(job, "train", depths)  # one trunk pass for all depths
    dev_hidden = hidden_states(job, "dev", depths)
    runs: list[Run] = []
    diverged: list[str] = []
    for layers in sorted(candidates):
        k = n - layers
        train = Split(train_hidden[k], job.train.labels)
        dev = Split(dev_hidden[k], job.dev.labels)
        for lr in s.teacher_lrs:
            key = cache_key(
                data=job.data_key, stage="teacher", layers=layers, recipe=job.recipe(lr, epochs)
            )
            make = partial(teacher_branch, job, layers, s.seed)
            run = _train_run(job, "teacher", layers, k, lr, epochs, key, make, train, dev, diverged)
            runs += [run] if run is not None else []
    best = _best(runs, job.metrics[0])
    if best is None:  # one line: the first run's reason
        every = f"all {len(diverged)} teacher runs diverged; " if len(diverged) > 1 else ""
        raise MtregError(f"task {job.spec.name!r}, {every}run {diverged[0]}")
    used = {"teacher_layers": list(candidates), "teacher_lrs": list(s.teacher_lrs)}
    used |= {"epochs": epochs, "batch_size": s.batch_size, "seed": s.seed, "patience": s.patience}
    used["diverged_teachers"] = diverged
    _write_marker(job, "teacher", {"data_key": job.data_key, "run": best.to_dict(), **used})
    return StageResult(runs, best, used, diverged)


def chosen_teacher(job: Job) -> tuple[Run, Branch]:
    """Return the best teacher recorded by :func:`train_teachers` for this job's data.

    Raises:
        MtregError: no teacher trained yet, or trained on other data, trunk or length.
    """
    marker = _read_marker(job, "teacher")
    name = f"`mtreg train {job.spec.name}`"
    if marker is None:
        raise MtregError(f"task {job.spec.name!r} has no teacher yet: run {name} first")
    if marker.get("data_key") != job.data_key:
        raise MtregError(
            f"task {job.spec.name!r}: its teacher was trained on other data, trunk or max "
            f"length: run {name} again"
        )
    run = Run(**{k: marker["run"][k] for k in Run.__dataclass_fields__ if k in marker["run"]})
    found = load_run(job, run.name, run.key, run.layers)
    if found is None:
        raise MtregError(f"task {job.spec.name!r}: its saved teacher run is gone: run {name}")
    return found


@torch.no_grad()
def teacher_logits(job: Job, teacher: Branch, run: Run, hidden: list[torch.Tensor]) -> list:
    """Return the frozen teacher's logits per training example (cached on disk)."""
    key = cache_key(kind="teacher-logits", teacher=run.key, weights=_state_hash(teacher))
    cached = job.cache.get(key)
    if cached is not None and len(cached) == len(hidden):
        return cached
    logits = predict_logits(teacher, Split(hidden, job.train.labels), device=job.device)
    job.cache.put(key, logits)
    return logits


def threshold(reference: float, tolerance: float) -> float:
    """Return the lowest acceptable score: ``tolerance`` × reference for positive scores;
    for negative ones (neg_mse) the same relative slack below the reference."""
    return reference - (1 - tolerance) * abs(reference)


def distill(job: Job) -> StageResult:
    """Distil the chosen teacher into students of each l and learning rate of the search
    (see :func:`student_search`) at its fork depth, each initialised from the teacher's
    bottom l layers.

    Raises:
        MtregError: no usable teacher (see :func:`chosen_teacher`), or an l not below L.
    """
    teacher_run, teacher = chosen_teacher(job)
    big, k = teacher_run.layers, teacher_run.fork_depth
    if job.settings.student_layers and max(job.settings.student_layers) >= big:
        raise MtregError(f"student layers must be below the teacher's {big} (1..{big - 1})")
    train_hidden = hidden_states(job, "train", [k])[k]
    logits = teacher_logits(job, teacher, teacher_run, train_hidden)
    return student_search(
        job, teacher_run, logits, {k: big - 1}, lambda _k, size: student_branch(job, teacher, size)
    )


def student_sizes(settings: Settings, most: int) -> tuple[int, ...]:
    """Return the student sizes l to search where a student can have up to ``most`` layers:
    the settings', else 1..min(:data:`MAX_STUDENT_LAYERS`, ``most``).

    Raises:
        MtregError: a size of the settings above ``most``.
    """
    if settings.student_layers and max(settings.student_layers) > most:
        raise MtregError(f"student layers must be in 1..{most} (the most above any fork here)")
    return settings.student_layers or tuple(range(1, min(MAX_STUDENT_LAYERS, most) + 1))


def student_search(
    job: Job,
    teacher_run: Run,
    logits: list[torch.Tensor],
    depths: Mapping[int, int],
    make_student: Callable[[int, int], Branch],
) -> StageResult:
    """Train students on the training split's teacher ``logits`` at each fork depth k of
    ``depths`` (k → the most layers a student there can have), of each l (1..
    :data:`MAX_STUDENT_LAYERS` unless the settings say) and learning rate: smallest l
    first, every depth at that l, stopping after the first l where a run reaches the
    settings' tolerance of the teacher's dev score. The smallest good-enough branch is the
    one kept (:func:`mtreg.training.onboard.choose`), so larger students would be trained
    for nothing. ``make_student(k, l)`` returns a fresh student. A student that diverges
    is recorded and the search goes on; if every one does, the teacher is kept.

    Raises:
        MtregError: a student size of the settings that no depth has room for
            (:func:`student_sizes`).
    """
    s, metric = job.settings, job.metrics[0]
    candidates = student_sizes(s, max(depths.values()))
    epochs = epoch_cap(s, "student")
    train_hidden = hidden_states(job, "train", list(depths))  # one trunk pass for all
    dev_hidden = hidden_states(job, "dev", list(depths))
    enough = threshold(teacher_run.dev_metrics[metric], s.tolerance)
    runs: list[Run] = []
    diverged: list[str] = []
    for layers in sorted(candidates):
        for k in sorted(d for d, most in depths.items() if layers <= most):
            train = Split(train_hidden[k], job.train.labels, logits)
            dev = Split(dev_hidden[k], job.dev.labels)
            for lr in s.student_lrs:
                key = cache_key(
                    data=job.data_key,
                    stage="student",
                    teacher=teacher_run.key,
                    fork_depth=k,
                    layers=layers,
                    recipe=job.recipe(lr, epochs),
                )
                make = partial(make_student, k, layers)
                run = _train_run(
                    job, "student", layers, k, lr, epochs, key, make, train, dev, diverged
                )
                runs += [run] if run is not None else []
        if any(r.layers == layers and r.dev_metrics[metric] >= enough for r in runs):
            if layers < max(candidates):
                job.say(f"l={layers} is good enough: larger students not trained")
            break
    used = {"student_layers": list(candidates), "student_lrs": list(s.student_lrs)}
    used |= {"student_depths": sorted(depths), "student_epochs": epochs}
    used |= {"teacher": teacher_run.to_dict(), "diverged_students": diverged}
    return StageResult(runs, _best(runs, metric) or teacher_run, used, diverged)
