"""A training job: everything one task's training needs, loaded once (:class:`Job`,
:func:`prepare`): its spec and settings (:mod:`mtreg.training.settings`), its train and dev
data encoded with the trunk's tokenizer, the trunk, and the trunk's activations.

Cost (bench/onboarding.py measures it): the trunk below a fork is frozen and runs without
dropout, so its hidden states at every candidate depth are computed in one pass and cached
on disk (fp16, :mod:`mtreg.training.cache`); every teacher and student trains on those. The
trunk is read from the registry's object store, never from the folder it was added from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtreg import heads
from mtreg.artifacts.checkpoint import load_component
from mtreg.artifacts.config import TrunkConfig
from mtreg.artifacts.fingerprint import TrunkFingerprint
from mtreg.artifacts.tokenizer import load_tokenizer
from mtreg.core import env
from mtreg.core.disk import disk_errors
from mtreg.core.env import using_data_dir
from mtreg.errors import MtregError
from mtreg.nn.layers import Branch
from mtreg.nn.network import Trunk
from mtreg.plugins.isolation import Overran, within
from mtreg.training.cache import ActivationCache, cache_key
from mtreg.training.data import Encoded, check_example, collate, data_hash, encode
from mtreg.training.loop import Recipe
from mtreg.training.metrics import check_names
from mtreg.training.progress import Progress, batch_reporter
from mtreg.training.settings import Settings

if TYPE_CHECKING:
    from mtreg.core.spec import TaskSpec
    from mtreg.registry.api import Registry
    from mtreg.registry.records import TrunkRecord

FORMAT = "mtreg-onboarding/1"  # bump when a change makes old saved runs stale
CACHE_BATCH = 64  # examples per trunk pass while caching activations


# -- preparing a job: task, data, trunk ---------------------------------------------------


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

    def recipe(self, lr: float, epochs: int) -> Recipe:
        """Return the training recipe of this job's settings at ``lr`` for ``epochs``."""
        s = self.settings
        return Recipe(
            epochs=epochs,
            lr=lr,
            batch_size=s.batch_size,
            dropout=s.dropout,
            seed=s.seed,
            patience=s.patience,
            precision=s.precision,
        )


def load_split(spec: TaskSpec, split: str, plugin: str | None = None) -> list[dict[str, Any]]:
    """Return the examples of ``split``, each checked by :func:`check_example`, before
    anything is tokenised, cached or trained. ``plugin`` (the task's) is named in messages.

    Raises:
        MtregError: the loader fails, at once or halfway through, whatever it raises, or
            takes longer than ``$MTREG_LOADER_TIMEOUT``; the split is empty; an example is
            malformed. The message names the task, the split and the row (counted from 1).
    """
    where = f"task {spec.name!r}, {split} split"
    limit = env.loader_timeout()
    try:
        # A loader is plugin code: one that never returns must not hang onboarding.
        return within(partial(_checked, spec, split, where), limit)
    except Overran:
        owner = f"plugin {plugin!r}'s " if plugin else "its plugin's "
        raise MtregError(
            f"{where}: {owner}load_dataset hook gave no complete split within {limit:g} s "
            f"(the limit, {env.LOADER_TIMEOUT_ENV}); fix the loader or raise the limit"
        ) from None


def _checked(spec: TaskSpec, split: str, where: str) -> list[dict[str, Any]]:
    """Return the examples of ``split``, read and checked (see :func:`load_split`)."""
    examples = []
    for number, example in enumerate(_read(spec, split, where), 1):
        try:
            examples.append(check_example(example, spec.inputs, spec.head))
        except MtregError as exc:
            raise MtregError(f"{where}, row {number}: {exc}") from None
    if not examples:
        raise MtregError(
            f"task {spec.name!r}: its {split} split is empty: its loader gave no examples"
        )
    return examples


def _read(spec: TaskSpec, split: str, where: str) -> Iterator[Any]:
    """Yield what the task's loader gives for ``split``; whatever the loader raises (a
    plugin's own exception, ``sys.exit``) becomes one MtregError naming the row it was on."""
    assert spec.load_dataset is not None
    number = 0
    try:
        for number, example in enumerate(spec.load_dataset(split), 1):  # noqa: B007
            yield example
    except MtregError as exc:
        raise MtregError(f"{where}: {exc}") from None
    except (Exception, SystemExit) as exc:  # a loader is plugin code: anything can come out
        at = f" at row {number + 1} (after {number} good rows)" if number else ""
        detail = " ".join(str(exc).split())
        raise MtregError(
            f"{where}: its loader failed{at}: {type(exc).__name__}: {detail}; fix the "
            "plugin's load_dataset"
        ) from None


def _encode(job_spec: TaskSpec, tokenizer: Any, examples: list, split: str, n: int) -> Encoded:
    try:
        return encode(tokenizer, examples, job_spec.inputs, job_spec.head, n)
    except MtregError as exc:
        raise MtregError(f"task {job_spec.name!r}, {split} split: {exc}") from None


def _materialise_tokenizer(registry: Registry, trunk: TrunkRecord) -> Path:
    """Return a folder holding the trunk's tokenizer files under their real names (hard
    links to the object store, kept under MTREG_HOME/cache/tokenizers for reuse)."""
    folder = registry.home.tokenizer(trunk.fingerprint["tokenizer"])
    if (folder / ".complete").is_file():
        return folder
    with disk_errors(folder):
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
    offered = registry.discover().task(task)
    spec = offered.spec
    if spec.load_dataset is None:
        raise MtregError(
            f"task {task!r} has no dataset loader: its plugin must pass "
            "TaskSpec(load_dataset=...) to be trained"
        )
    if spec.trunk is None:
        raise MtregError(f"task {task!r} names no trunk: set TaskSpec(trunk=...) in its plugin")
    metrics = spec.metrics or heads.get(spec.head.kind).default_metrics
    check_names(metrics)
    trunk = registry.trunk(spec.trunk)
    with using_data_dir(data_dir):
        train = load_split(spec, "train", offered.plugin)
        dev = load_split(spec, "dev", offered.plugin)
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
        cache=ActivationCache(registry.home.activations),
        stage_dir=registry.home.onboarding(spec.name, spec.version),
        progress=progress,
    )


# -- cached activations -------------------------------------------------------------------


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
    job: Job,
    encoded: Encoded,
    depths: Sequence[int],
    batch_size: int = CACHE_BATCH,
    on_batch: Callable[[int], None] | None = None,
) -> dict[int, list[torch.Tensor]]:
    """Run the frozen trunk once over ``encoded`` and return, per depth, each example's
    hidden state [len, H] (padding removed, fp32 on the CPU); ``on_batch`` hears the
    number of each batch done."""
    trunk = job.trunk_module(max(depths)).to(job.device)
    out: dict[int, list[torch.Tensor]] = {d: [None] * len(encoded) for d in depths}  # type: ignore[list-item]
    # Batching examples of similar length wastes less work on padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    pad = job.tokenizer.pad_token_id or 0
    for number, start in enumerate(range(0, len(order), batch_size), 1):
        indices = order[start : start + batch_size]
        batch = {k: v.to(job.device) for k, v in collate(encoded, indices, pad).items()}
        states = trunk(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], depths)
        for row, i in enumerate(indices):
            n = len(encoded.input_ids[i])
            for d in depths:
                out[d][i] = states[d][row, :n].float().cpu()
        if on_batch is not None:
            on_batch(number)
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
        encoded = job.train if split == "train" else job.dev
        batches = math.ceil(len(encoded) / CACHE_BATCH)
        report = batch_reporter(job.progress, batches, run=f"caching {split} activations")
        computed = compute_hidden(job, encoded, missing, CACHE_BATCH, report)
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
    kind = heads.get(job.spec.head.kind)
    labels = kind.stack([encoded.labels[i] for i in indices], hidden.shape[1])
    return kind.loss(branch(hidden, batch["attention_mask"]), labels)
