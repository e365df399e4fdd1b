"""Onboarding a task: teacher search, distillation, choice of the smallest good branch,
registration. The library behind ``mtreg train``, ``mtreg distill`` and ``mtreg onboard``.

The method (DESIGN.md): a teacher of L layers fine-tunes the trunk's top L layers (copied,
the trunk itself never changes) plus a pooler and a fresh head, forking at k = N - L; a
student of l < L layers at the same k starts from the teacher's bottom l layers and head and
learns from hard labels plus the teacher's softened logits. Onboarding keeps the smallest
branch whose dev score is within ``tolerance`` of the best teacher's.

Cost (issue 5, section 2): the trunk below a fork is frozen and runs without dropout, so
its hidden states at every candidate depth are computed in one pass and cached on disk
(fp16, :mod:`mtreg.model.cache`); every teacher and student trains on those, and students
read the teacher's cached logits. Every run's result is checkpointed under
``MTREG_HOME/onboarding/<task>/<version>/`` (JSON + safetensors), so a killed onboarding
resumes at the run it reached. The trunk is read from the registry's object store, never
from the folder it was added from.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtreg.errors import MtregError
from mtreg.model.branch_file import BranchMeta, write_branch
from mtreg.model.cache import ActivationCache, cache_key
from mtreg.model.config import TrunkConfig
from mtreg.model.data import Encoded, collate, data_hash, encode, load_tokenizer
from mtreg.model.fingerprint import TrunkFingerprint, tensor_group_hash
from mtreg.model.layers import Branch
from mtreg.model.metrics import DEFAULT_METRICS, check_names
from mtreg.model.network import Trunk
from mtreg.model.progress import Progress, prefixed
from mtreg.model.train import Recipe, Split, fit, hard_loss, predict_logits, stack_labels
from mtreg.model.trunk import load_component

if TYPE_CHECKING:
    from mtreg.plugins.spec import TaskSpec
    from mtreg.registry.api import Changes, Registry
    from mtreg.registry.records import TrunkRecord

DATA_DIR_ENV = "MTREG_DATA_DIR"
FORMAT = "mtreg-onboarding/1"  # bump when a change makes old stage checkpoints stale
# Partial runs want a higher learning rate than full fine-tuning (issue 5: lr 2e-4 on the
# top 3 of 6 layers matched a full run at 1e-4), so both are tried for teachers. Students
# start from a trained teacher but their head meets a shallower state than it was trained
# on; a higher rate and twice the teacher's epochs let them catch up (they are cheap: l < L).
TEACHER_LRS = (1e-4, 2e-4)
STUDENT_LRS = (5e-4,)
MAX_STUDENT_LAYERS = 3
# Automatic epochs: enough for about MIN_STEPS optimizer steps, within MIN..MAX epochs.
# Small data sets (the demo's 48 sentences) get more passes; 10k examples get MIN_EPOCHS.
# Together with early stopping (PATIENCE epochs without a better dev score) this keeps the
# README demo (two tasks of 60-80 sentences on the 6-layer MiniLM) to a few CPU minutes.
MIN_STEPS, MIN_EPOCHS, MAX_EPOCHS = 20, 3, 10
PATIENCE = 3


# -- settings and results ----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What to search and how to train. Every field is reported with the results.

    ``None`` means "choose": teacher layers default to :func:`default_teacher_layers`,
    student layers to 1..min(3, L-1), epochs to :func:`auto_epochs` (students: twice the
    teachers'), max length to the task's own.
    """

    teacher_layers: tuple[int, ...] | None = None
    teacher_lrs: tuple[float, ...] = TEACHER_LRS
    student_layers: tuple[int, ...] | None = None
    student_lrs: tuple[float, ...] = STUDENT_LRS
    epochs: int | None = None
    student_epochs: int | None = None
    batch_size: int = 32
    max_length: int | None = None
    seed: int = 0
    dropout: float = 0.1
    patience: int | None = PATIENCE
    tolerance: float = 0.99
    device: str = "auto"

    def check(self) -> None:
        """Raise MtregError for a value no run could use."""
        for name in ("teacher_lrs", "student_lrs"):
            values = getattr(self, name)
            if not values or any(not (lr > 0 and math.isfinite(lr)) for lr in values):
                raise MtregError(f"{name.replace('_', ' ')} must be positive numbers")
        for name in ("teacher_layers", "student_layers"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise MtregError(f"{name.replace('_', ' ')} must be at least 1")
        for name in ("epochs", "student_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MtregError(f"{name.replace('_', ' ')} must be at least 1")
        if self.patience is not None and self.patience < 1:
            raise MtregError("patience must be at least 1 epoch")
        if self.batch_size < 1:
            raise MtregError("batch size must be at least 1")
        if not 0 < self.tolerance <= 1:
            raise MtregError(f"tolerance must be in (0, 1], got {self.tolerance}")
        if self.max_length is not None and not 2 <= self.max_length <= 8192:
            raise MtregError("max length must be in 2..8192")


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
        letter = "L" if self.stage == "teacher" else "l"
        return f"{self.stage}-{letter}{self.layers}-lr{self.lr:g}"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


@dataclass
class StageResult:
    """The runs of one stage (teacher search or distillation) and the best of them."""

    runs: list[Run]
    best: Run
    settings: dict[str, Any]


@dataclass
class OnboardReport:
    """What :func:`onboard` tried, what it chose and what it registered."""

    task: str
    version: str
    trunk: str
    metric: str
    tolerance: float
    threshold: float
    runs: list[Run]
    teacher: Run
    chosen: Run
    weights: Path
    budget: dict[str, Any]
    settings: dict[str, Any]
    changes: Changes | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "task": self.task,
            "version": self.version,
            "trunk": self.trunk,
            "metric": self.metric,
            "tolerance": self.tolerance,
            "threshold": self.threshold,
            "runs": [r.to_dict() for r in self.runs],
            "teacher": self.teacher.to_dict(),
            "chosen": self.chosen.to_dict(),
            "weights": str(self.weights),
            "budget": self.budget,
            "settings": self.settings,
            "changes": self.changes.to_dict() if self.changes is not None else None,
            "seconds": self.seconds,
        }


# -- small helpers -----------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, ...]:
    """Parse ``"LO..HI"`` (or a single ``"N"``) into the integers LO..HI inclusive.

    Raises:
        MtregError: not of that form, or LO > HI, or LO < 1.
    """
    lo, sep, hi = text.partition("..")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise MtregError(f"invalid range {text!r}: write LO..HI, e.g. 2..4") from None
    if low < 1 or low > high:
        raise MtregError(f"invalid range {text!r}: need 1 <= LO <= HI")
    return tuple(range(low, high + 1))


def resolve_device(name: str) -> str:
    """Return the torch device for ``auto``, ``cpu`` or ``cuda`` (auto picks CUDA if present).

    Raises:
        MtregError: an unknown name, or ``cuda`` on a machine without a CUDA device.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MtregError("--device cuda: this machine has no CUDA device; use cpu or auto")
        return name
    raise MtregError(f"unknown device {name!r}: use auto, cpu or cuda")


def default_teacher_layers(num_layers: int) -> tuple[int, ...]:
    """Return the default L search for an N-layer trunk: about N/3..N/2 (2..3 of 6, 4..6 of
    12; the paper searched 4..10 of 12, kept narrow here so onboarding stays cheap)."""
    low = max(1, round(num_layers / 3))
    high = max(low, num_layers // 2)
    return tuple(range(low, min(high, num_layers) + 1))


def auto_epochs(num_examples: int, batch_size: int) -> int:
    """Return epochs giving about :data:`MIN_STEPS` steps, within MIN_EPOCHS..MAX_EPOCHS."""
    steps = max(1, math.ceil(num_examples / batch_size))
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps)))


def threshold(reference: float, tolerance: float) -> float:
    """Return the lowest acceptable score: ``tolerance`` × reference for positive scores;
    for negative ones (neg_mse) the same relative slack below the reference."""
    return reference - (1 - tolerance) * abs(reference)


def default_weights_path(home: Path, task: str, version: str) -> Path:
    """Return ``MTREG_HOME/trained/<task>/<version>.safetensors``."""
    return Path(home) / "trained" / task / f"{version}.safetensors"


@contextlib.contextmanager
def data_dir_env(data_dir: str | Path | None) -> Iterator[None]:
    """Set ``MTREG_DATA_DIR`` (read by the built-in plugins' loaders) while loading data."""
    if data_dir is None:
        yield
        return
    previous = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(data_dir)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DATA_DIR_ENV, None)
        else:
            os.environ[DATA_DIR_ENV] = previous


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- preparing a job: task, data, trunk ----------------------------------------------------


@dataclass
class Job:
    """Everything one task's training needs, loaded once: spec, data, trunk, caches."""

    registry: Registry
    spec: TaskSpec
    trunk: TrunkRecord
    config: TrunkConfig
    fingerprint: TrunkFingerprint
    tokenizer: Any
    max_length: int
    metrics: tuple[str, ...]
    train: Encoded
    dev: Encoded
    data_hash: str
    device: str
    settings: Settings
    cache: ActivationCache
    stage_dir: Path
    progress: Progress | None = None
    _components: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def data_key(self) -> str:
        """What every result of this job depends on besides the recipe."""
        return cache_key(
            format=FORMAT,
            trunk=self.fingerprint.to_dict(),
            data=self.data_hash,
            max_length=self.max_length,
            head=self.spec.head.to_dict(),
            inputs=list(self.spec.inputs),
            metrics=list(self.metrics),
        )

    def say(self, message: str) -> None:
        """Report progress, if anyone listens."""
        if self.progress is not None:
            self.progress(message)

    def component(self, sha: str) -> dict[str, torch.Tensor]:
        """Return a trunk component's tensors from the object store (read once)."""
        if sha not in self._components:
            try:
                path = self.registry.objects.existing(sha)
            except MtregError as exc:
                raise MtregError(f"trunk {self.trunk.name!r}: {exc}") from None
            self._components[sha] = load_component(path)
        return self._components[sha]

    def trunk_layer(self, index: int) -> dict[str, torch.Tensor]:
        """Return trunk layer ``index``'s tensors (HF names relative to the layer)."""
        return self.component(self.trunk.objects["layers"][index])

    def trunk_pooler(self) -> dict[str, torch.Tensor] | None:
        """Return the trunk's pooler tensors, or None if the checkpoint had none."""
        sha = self.trunk.objects.get("pooler")
        return self.component(sha) if sha else None

    def trunk_module(self, depth: int) -> Trunk:
        """Return the frozen trunk up to ``depth`` (eval mode, no gradients)."""
        objects = self.trunk.objects
        module = Trunk.from_tensors(
            self.config,
            self.component(objects["embeddings"]),
            [self.trunk_layer(i) for i in range(depth)],
        )
        module.requires_grad_(False)
        return module.eval()


def _load_split(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    """Return the examples of ``split``. Raises MtregError for a failing or empty split."""
    assert spec.load_dataset is not None
    try:
        examples = [dict(example) for example in spec.load_dataset(split)]
    except MtregError as exc:
        raise MtregError(f"task {spec.name!r}: {exc}") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeError) as exc:
        raise MtregError(
            f"task {spec.name!r}: cannot load its {split} split: {type(exc).__name__}: {exc}"
        ) from None
    if not examples:
        raise MtregError(f"task {spec.name!r}: its {split} split is empty")
    return examples


def _encode(job_spec: TaskSpec, tokenizer: Any, examples: list, split: str, n: int) -> Encoded:
    try:
        return encode(tokenizer, examples, job_spec.inputs, job_spec.head, n)
    except MtregError as exc:
        raise MtregError(f"task {job_spec.name!r}, {split} split: {exc}") from None


def _materialise_tokenizer(registry: Registry, trunk: TrunkRecord) -> Path:
    """Return a folder holding the trunk's tokenizer files under their real names (hard
    links to the object store, kept under MTREG_HOME/cache/tokenizers for reuse)."""
    folder = registry.home / "cache" / "tokenizers" / trunk.fingerprint["tokenizer"][:32]
    if not (folder / ".complete").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name, sha in trunk.objects["tokenizer"].items():
            target = folder / name
            target.unlink(missing_ok=True)
            try:
                registry.objects.link_or_copy(sha, target)
            except MtregError as exc:
                raise MtregError(f"trunk {trunk.name!r}, tokenizer {name}: {exc}") from None
        (folder / ".complete").write_text("")
    return folder


def prepare(
    registry: Registry,
    task: str,
    settings: Settings | None = None,
    *,
    data_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> Job:
    """Load a task's spec, train and dev data, and its trunk from the registry.

    Returns:
        The :class:`Job` the training functions take.

    Raises:
        NotFound: no plugin offers ``task``, or its trunk is not registered.
        MtregError: the task has no dataset loader or names no trunk; a split fails to
            load, is empty, or holds a label the head does not know; a bad setting.
    """
    settings = settings or Settings()
    settings.check()
    spec = registry.discover().task(task).spec
    if spec.load_dataset is None:
        raise MtregError(
            f"task {task!r} has no dataset loader: its plugin must pass "
            "TaskSpec(load_dataset=...) to be trained"
        )
    if spec.trunk is None:
        raise MtregError(f"task {task!r} names no trunk: set TaskSpec(trunk=...) in its plugin")
    metrics = spec.metrics or DEFAULT_METRICS[spec.head.kind]
    check_names(metrics)
    trunk = registry.trunk(spec.trunk)
    with data_dir_env(data_dir):
        train, dev = _load_split(spec, "train"), _load_split(spec, "dev")
    tokenizer = load_tokenizer(_materialise_tokenizer(registry, trunk))
    max_length = settings.max_length or spec.max_length
    return Job(
        registry=registry,
        spec=spec,
        trunk=trunk,
        config=TrunkConfig(**trunk.config),
        fingerprint=TrunkFingerprint.from_dict(trunk.fingerprint),
        tokenizer=tokenizer,
        max_length=max_length,
        metrics=tuple(metrics),
        train=_encode(spec, tokenizer, train, "train", max_length),
        dev=_encode(spec, tokenizer, dev, "dev", max_length),
        data_hash=data_hash([*train, {"split": "dev"}, *dev]),
        device=resolve_device(settings.device),
        settings=settings,
        cache=ActivationCache(registry.home / "cache" / "activations"),
        stage_dir=registry.home / "onboarding" / spec.name / spec.version,
        progress=progress,
    )


# -- cached activations --------------------------------------------------------------------


def _hidden_key(job: Job, split: str, depth: int) -> str:
    encoded = job.train if split == "train" else job.dev
    return cache_key(
        kind="hidden",
        trunk=job.fingerprint.prefix(depth),
        max_length=job.max_length,
        tokens=cache_key(ids=encoded.input_ids, types=encoded.token_type_ids),
        dtype="float16",
    )


@torch.no_grad()
def compute_hidden(
    job: Job, encoded: Encoded, depths: Sequence[int], batch_size: int = 64
) -> dict[int, list[torch.Tensor]]:
    """Run the frozen trunk once over ``encoded`` and return, per depth, each example's
    hidden state [len, H] (padding removed, fp32 on the CPU)."""
    trunk = job.trunk_module(max(depths)).to(job.device)
    out: dict[int, list[torch.Tensor]] = {d: [None] * len(encoded) for d in depths}  # type: ignore[list-item]
    # Batching examples of similar length wastes less work on padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    pad = job.tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = {k: v.to(job.device) for k, v in collate(encoded, indices, pad).items()}
        states = trunk(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], depths)
        for row, i in enumerate(indices):
            n = len(encoded.input_ids[i])
            for d in depths:
                out[d][i] = states[d][row, :n].float().cpu()
    return out


def hidden_states(job: Job, split: str, depths: Sequence[int]) -> dict[int, list[torch.Tensor]]:
    """Return each example's trunk state at each of ``depths`` for ``split``, from the
    cache where present; the missing depths are computed in one trunk pass and cached (fp16).
    """
    depths = sorted(set(depths))
    found: dict[int, list[torch.Tensor]] = {}
    for d in depths:
        cached = job.cache.get(_hidden_key(job, split, d))
        if cached is not None:
            found[d] = cached
    missing = [d for d in depths if d not in found]
    if missing:
        started = time.perf_counter()
        computed = compute_hidden(job, job.train if split == "train" else job.dev, missing)
        for d, rows in computed.items():
            rows16 = [r.half() for r in rows]
            job.cache.put(_hidden_key(job, split, d), rows16)
            found[d] = rows16
        job.say(
            f"cached {split} activations at depth(s) {missing} "
            f"in {time.perf_counter() - started:.1f}s"
        )
    return found


def uncached_batch_loss(
    trunk: Trunk,
    branch: Branch,
    job: Job,
    encoded: Encoded,
    indices: Sequence[int],
    depth: int,
) -> torch.Tensor:
    """Return the hard loss of ``branch`` on a batch computed through the live trunk (no
    cache): the reference the cached path must match, and what a benchmark times."""
    pad = job.tokenizer.pad_token_id or 0
    batch = collate(encoded, indices, pad)
    with torch.no_grad():
        hidden = trunk(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], (depth,)
        )[depth]
    labels = stack_labels(job.spec.head, [encoded.labels[i] for i in indices], hidden.shape[1])
    return hard_loss(job.spec.head, branch(hidden, batch["attention_mask"]), labels)


# -- branches ------------------------------------------------------------------------------


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
    branch = Branch(job.config, layers, job.spec.head, job.settings.dropout)
    for j, layer in enumerate(branch.layers):
        layer.load_state_dict(job.trunk_layer(n - layers + j), strict=True)  # copies
    pooler = job.trunk_pooler()
    if branch.pooler is not None and pooler is not None:
        branch.pooler.load_state_dict(pooler, strict=True)
    return branch


def student_branch(job: Job, teacher: Branch, layers: int) -> Branch:
    """Return a student of ``layers`` layers initialised from the teacher's bottom
    ``layers`` branch layers, its pooler and its head (copies).

    Raises:
        MtregError: ``layers`` not below the teacher's.
    """
    if not 1 <= layers < len(teacher.layers):
        raise MtregError(
            f"a student needs 1..{len(teacher.layers) - 1} layers (its teacher has "
            f"{len(teacher.layers)})"
        )
    student = Branch(job.config, layers, job.spec.head, job.settings.dropout)
    for j, layer in enumerate(student.layers):
        layer.load_state_dict(teacher.layers[j].state_dict(), strict=True)
    if student.pooler is not None:
        student.pooler.load_state_dict(teacher.pooler.state_dict(), strict=True)
    student.head.load_state_dict(teacher.head.state_dict(), strict=True)
    return student


def _state_hash(branch: Branch) -> str:
    return tensor_group_hash(branch.state_dict())


# -- stage checkpoints -----------------------------------------------------------------------


def _checkpoint_paths(job: Job, run_name: str) -> tuple[Path, Path]:
    return job.stage_dir / f"{run_name}.json", job.stage_dir / f"{run_name}.safetensors"


def save_run(job: Job, run: Run, branch: Branch) -> None:
    """Checkpoint a finished run: weights first, then the JSON that marks it complete."""
    meta_path, weights_path = _checkpoint_paths(job, run.name)
    state = {k: v.detach().cpu().contiguous() for k, v in branch.state_dict().items()}
    _atomic_write(weights_path, lambda tmp: save_file(state, tmp))
    payload = json.dumps({**run.to_dict(), "resumed": False}, indent=2, sort_keys=True)
    _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(payload))


def load_run(job: Job, run_name: str, key: str, layers: int) -> tuple[Run, Branch] | None:
    """Return a checkpointed run and its branch if one exists for exactly ``key``."""
    meta_path, weights_path = _checkpoint_paths(job, run_name)
    try:
        data = json.loads(meta_path.read_text())
        if data.get("key") != key:
            return None
        state = load_file(weights_path)
        branch = Branch(job.config, layers, job.spec.head, job.settings.dropout)
        branch.load_state_dict(state, strict=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
        return None  # absent, stale or damaged: train again
    fields = {k: data[k] for k in Run.__dataclass_fields__ if k in data}
    return replace(Run(**fields), resumed=True), branch.eval()


def _write_marker(job: Job, name: str, payload: Mapping[str, Any]) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True)
    _atomic_write(job.stage_dir / f"{name}.json", lambda tmp: Path(tmp).write_text(text))


def _read_marker(job: Job, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((job.stage_dir / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


# -- the two stages ------------------------------------------------------------------------


def _recipe(job: Job, lr: float, epochs: int) -> Recipe:
    s = job.settings
    return Recipe(
        epochs=epochs,
        lr=lr,
        batch_size=s.batch_size,
        dropout=s.dropout,
        seed=s.seed,
        patience=s.patience,
    )


def _better(run: Run, other: Run | None, metric: str) -> bool:
    """Higher score wins; on a tie the smaller branch, then the lower learning rate."""
    if other is None:
        return True
    a, b = run.dev_metrics[metric], other.dev_metrics[metric]
    return (a, -run.layers, -run.lr) > (b, -other.layers, -other.lr)


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
) -> tuple[Run, Branch]:
    """Train one candidate, or take it from its checkpoint when one matches ``key``."""
    letter = "L" if stage == "teacher" else "l"
    name = f"{stage}-{letter}{layers}-lr{lr:g}"
    found = load_run(job, name, key, layers)
    if found is not None:
        job.say(f"{name}: done before, resumed from its checkpoint")
        return found

    result = fit(
        make_branch(),
        job.spec.head,
        train,
        dev,
        job.metrics,
        _recipe(job, lr, epochs),
        device=job.device,
        progress=prefixed(job.progress, name),
    )
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
    return run, result.branch


def train_teachers(job: Job) -> StageResult:
    """Train a teacher for every L and learning rate of the search; keep the best on dev.

    Each finished run is checkpointed; a rerun with the same data, trunk and recipe takes
    it from there. Writes ``teacher.json`` naming the best one.

    Returns:
        Every run, the best, and the settings used.

    Raises:
        MtregError: an L outside 1..N.
    """
    s, n = job.settings, job.config.num_hidden_layers
    candidates = s.teacher_layers or default_teacher_layers(n)
    if max(candidates) > n:
        raise MtregError(f"teacher layers must be in 1..{n} for trunk {job.trunk.name!r}")
    epochs = s.epochs or auto_epochs(len(job.train), s.batch_size)
    depths = sorted({n - layers for layers in candidates})
    train_hidden = hidden_states(job, "train", depths)  # one trunk pass for all depths
    dev_hidden = hidden_states(job, "dev", depths)
    runs: list[Run] = []
    best: Run | None = None
    for layers in sorted(candidates):
        k = n - layers
        train = Split(train_hidden[k], job.train.labels)
        dev = Split(dev_hidden[k], job.dev.labels)
        for lr in s.teacher_lrs:
            key = cache_key(
                data=job.data_key, stage="teacher", layers=layers, recipe=_recipe(job, lr, epochs)
            )
            run, _ = _train_run(
                job,
                "teacher",
                layers,
                k,
                lr,
                epochs,
                key,
                lambda layers=layers: teacher_branch(job, layers, s.seed),
                train,
                dev,
            )
            runs.append(run)
            if _better(run, best, job.metrics[0]):
                best = run
    assert best is not None
    used = {"teacher_layers": list(candidates), "teacher_lrs": list(s.teacher_lrs)}
    used |= {"epochs": epochs, "batch_size": s.batch_size, "seed": s.seed, "patience": s.patience}
    _write_marker(job, "teacher", {"data_key": job.data_key, "run": best.to_dict(), **used})
    return StageResult(runs, best, used)


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
        raise MtregError(f"task {job.spec.name!r}: its teacher checkpoint is gone: run {name}")
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


def distill(job: Job) -> StageResult:
    """Distil the chosen teacher into students of each l and learning rate of the search.

    Raises:
        MtregError: no usable teacher (see :func:`chosen_teacher`), or an l not below L.
    """
    s = job.settings
    teacher_run, teacher = chosen_teacher(job)
    big = teacher_run.layers
    candidates = s.student_layers or tuple(range(1, min(MAX_STUDENT_LAYERS, big - 1) + 1))
    if candidates and max(candidates) >= big:
        raise MtregError(f"student layers must be below the teacher's {big} (1..{big - 1})")
    k = teacher_run.fork_depth
    epochs = s.student_epochs or 2 * (s.epochs or auto_epochs(len(job.train), s.batch_size))
    train_hidden = hidden_states(job, "train", [k])[k]
    dev = Split(hidden_states(job, "dev", [k])[k], job.dev.labels)
    train = Split(
        train_hidden, job.train.labels, teacher_logits(job, teacher, teacher_run, train_hidden)
    )
    runs: list[Run] = []
    best: Run | None = None
    for layers in sorted(candidates):
        for lr in s.student_lrs:
            key = cache_key(
                data=job.data_key,
                stage="student",
                teacher=teacher_run.key,
                layers=layers,
                recipe=_recipe(job, lr, epochs),
            )
            run, _ = _train_run(
                job,
                "student",
                layers,
                k,
                lr,
                epochs,
                key,
                lambda layers=layers: student_branch(job, teacher, layers),
                train,
                dev,
            )
            runs.append(run)
            if _better(run, best, job.metrics[0]):
                best = run
    used = {"student_layers": list(candidates), "student_lrs": list(s.student_lrs)}
    used |= {"student_epochs": epochs, "teacher": teacher_run.to_dict()}
    return StageResult(runs, best or teacher_run, used)


# -- choosing, writing, registering -------------------------------------------------------


def choose(runs: Sequence[Run], teacher: Run, metric: str, tolerance: float) -> Run:
    """Return the smallest branch whose dev score reaches ``tolerance`` of the teacher's;
    among equally small ones, the best scoring. The teacher itself always qualifies."""
    floor = threshold(teacher.dev_metrics[metric], tolerance)
    good = [r for r in runs if r.dev_metrics[metric] >= floor] or [teacher]
    return min(good, key=lambda r: (r.layers, -r.dev_metrics[metric], r.stage != "student"))


def write_chosen(
    job: Job,
    run: Run,
    teacher: Run,
    path: Path,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``run``'s branch as the task's branch file at ``path``; return the path.

    Raises:
        MtregError: the run's checkpoint is gone, or ``path`` cannot be written.
    """
    found = load_run(job, run.name, run.key, run.layers)
    if found is None:
        raise MtregError(f"the checkpoint of {run.name} is gone: run the command again")
    _, branch = found
    meta = BranchMeta(
        task=job.spec.name,
        task_version=job.spec.version,
        fork_depth=run.fork_depth,
        num_layers=run.layers,
        head=job.spec.head,
        max_length=job.max_length,
        trunk_prefix=job.fingerprint.prefix(run.fork_depth),
        training={
            "dev_metrics": run.dev_metrics,
            "teacher_layers": teacher.layers,
            "student_layers": run.layers if run.stage == "student" else None,
            "teacher_dev_metrics": teacher.dev_metrics,
            "data_hash": job.data_hash,
            "recipe": {
                "stage": run.stage,
                "lr": run.lr,
                "epochs": run.epochs,
                "best_epoch": run.best_epoch,
                "batch_size": job.settings.batch_size,
                "seed": job.settings.seed,
                "dropout": job.settings.dropout,
                **(extra or {}),
            },
        },
    )
    try:
        return write_branch(path, branch.state_dict(), meta)
    except OSError as exc:
        raise MtregError(f"cannot write the branch file {path}: {exc}; pass --out") from None


def output_path(job: Job, out: str | Path | None) -> Path:
    """Return where a branch file goes: ``out``, else the plugin's weights path, else
    ``MTREG_HOME/trained/<task>/<version>.safetensors``."""
    if out is not None:
        return Path(out)
    if job.spec.weights is not None:
        return Path(job.spec.weights)
    return default_weights_path(job.registry.home, job.spec.name, job.spec.version)


def _settings(settings: Settings | None, overrides: Mapping[str, Any]) -> Settings:
    unknown = set(overrides) - set(Settings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown onboarding settings: {', '.join(sorted(unknown))}")
    return replace(settings or Settings(), **overrides)


def train_teacher(
    registry: Registry,
    task: str,
    settings: Settings | None = None,
    *,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> StageResult:
    """``mtreg train``: search teachers for ``task``; write the best as a branch file when
    ``out`` is given. Keyword ``overrides`` set :class:`Settings` fields.

    Raises:
        MtregError: see :func:`prepare` and :func:`train_teachers`.
    """
    job = prepare(
        registry, task, _settings(settings, overrides), data_dir=data_dir, progress=progress
    )
    result = train_teachers(job)
    if out is not None:
        write_chosen(job, result.best, result.best, Path(out))
    return result


def distill_task(
    registry: Registry,
    task: str,
    settings: Settings | None = None,
    *,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> tuple[StageResult, Run, Path]:
    """``mtreg distill``: distil the task's trained teacher and write the best student
    (by the tolerance rule against the teacher) as the task's branch file.

    Returns:
        The distillation runs, the run written, and the file's path.

    Raises:
        MtregError: see :func:`prepare` and :func:`distill`.
    """
    job = prepare(
        registry, task, _settings(settings, overrides), data_dir=data_dir, progress=progress
    )
    result = distill(job)
    teacher = chosen_teacher(job)[0]
    picked = choose(result.runs, teacher, job.metrics[0], job.settings.tolerance)
    return result, picked, write_chosen(job, picked, teacher, output_path(job, out))


def onboard(
    registry: Registry,
    task: str,
    settings: Settings | None = None,
    *,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    register: bool = True,
    promote: bool = False,
    progress: Progress | None = None,
    **overrides: Any,
) -> OnboardReport:
    """``mtreg onboard``: teacher search, distillation, choice of the smallest branch within
    ``tolerance`` of the best teacher, branch file, registration (which rebuilds the bundle).

    A killed onboarding run again resumes after its last finished training run.

    Returns:
        What was tried (every run, with its dev metrics and seconds), what was chosen, the
        explicit budget, and the registry's Changes (None with ``register=False``).

    Raises:
        MtregError: see :func:`prepare`; and whatever registration refuses.
    """
    started = time.perf_counter()
    job = prepare(
        registry, task, _settings(settings, overrides), data_dir=data_dir, progress=progress
    )
    teachers = train_teachers(job)
    students = distill(job)
    runs = teachers.runs + students.runs
    metric = job.metrics[0]
    chosen = choose(runs, teachers.best, metric, job.settings.tolerance)
    job.say(f"chose {chosen.name} ({metric} {chosen.dev_metrics[metric]:.4f})")
    budget = _budget(job, runs, teachers)
    # Wall-clock seconds stay out of the file: an onboarding resumed or run again must
    # write the same bytes, so that registering it again is "unchanged".
    steady = {k: v for k, v in budget.items() if k != "train_seconds"}
    path = write_chosen(job, chosen, teachers.best, output_path(job, out), {"budget": steady})
    changes = None
    if register:
        changes = registry.register([task], weights={task: path}, promote=promote)
    return OnboardReport(
        task=task,
        version=job.spec.version,
        trunk=job.trunk.name,
        metric=metric,
        tolerance=job.settings.tolerance,
        threshold=threshold(teachers.best.dev_metrics[metric], job.settings.tolerance),
        runs=runs,
        teacher=teachers.best,
        chosen=chosen,
        weights=path,
        budget=budget,
        settings={**teachers.settings, **students.settings, "device": job.device},
        changes=changes,
        seconds=time.perf_counter() - started,
    )


def _budget(job: Job, runs: Sequence[Run], teachers: StageResult) -> dict[str, Any]:
    """The search's cost, explicit: runs, and branch-layer epochs actually trained against
    one full fine-tuning of all N layers for the same epochs (the issue's ≤ 2× goal; the
    one trunk pass that fills the cache is forward-only and comes on top)."""
    n, epochs = job.config.num_hidden_layers, teachers.settings["epochs"]
    layer_epochs = sum(r.layers * r.epochs_run for r in runs)
    return {
        "runs": len(runs),
        "teacher_runs": sum(r.stage == "teacher" for r in runs),
        "student_runs": sum(r.stage == "student" for r in runs),
        "layer_epochs": layer_epochs,
        "full_finetune_layer_epochs": n * epochs,
        "ratio_vs_full": round(layer_epochs / (n * epochs), 3),
        "train_seconds": round(sum(r.seconds for r in runs if not r.resumed), 3),
    }
