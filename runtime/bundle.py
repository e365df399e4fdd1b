"""Loading a bundle directory and predicting with it: what a user serves.

``load_bundle`` reads ``manifest.json`` (checked against the bundle id the registry
recorded, when loaded by alias or id), checks every path and the sha256 of every file it
reads, the tokenizer folder as an exact set, and each branch file's own metadata against
its manifest entry, and builds a :class:`MultiTaskModel` holding only the requested tasks
and the trunk up to their deepest fork: trunk layers above that are never opened. Nothing
is trusted before it is hashed: bundle files are hard links to the object store's objects
(docs/architecture.md, "Hard links, verified before trust").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mtreg import heads
from mtreg.artifacts.branch_file import check_against_entry, read_branch
from mtreg.artifacts.checkpoint import load_component
from mtreg.artifacts.config import TrunkConfig
from mtreg.artifacts.gate_file import BACKENDS, FASTEST
from mtreg.artifacts.home import Home
from mtreg.artifacts.integrity import check_tokenizer, checked_file
from mtreg.artifacts.manifest import (
    EMBEDDINGS,
    TOKENIZER_DIR,
    TaskEntry,
    bundle_directory,
    layer_path,
    read_bundle_manifest,
)
from mtreg.artifacts.onnx_info import OnnxInfo
from mtreg.artifacts.release import candidate_key
from mtreg.artifacts.tokenizer import load_tokenizer
from mtreg.core.spec import find_version
from mtreg.core.text import text_problem
from mtreg.errors import MtregError, NotFound
from mtreg.nn.layers import Branch
from mtreg.nn.network import MultiTaskModel, Trunk
from mtreg.runtime.backends import (
    GATED,
    TORCH_BACKENDS,
    Choice,
    OnnxModel,
    gated_model,
    measured_faster,
)
from mtreg.runtime.device import CPU, check_device, gpu_backend, place
from mtreg.runtime.inference import (
    Encoded,
    Input,
    Row,
    check_batch_size,
    cut_text,
    forward_groups,
)


def select_tasks(held: Iterable[str], tasks: Iterable[str] | None) -> list[str]:
    """Return the requested task names (all ``held`` by default), sorted.

    Raises:
        NotFound: a task not among ``held`` (the message lists those that are).
    """
    names = sorted(held)
    if tasks is None:
        return names
    wanted = sorted(set(tasks))
    for name in wanted:
        if name not in names:
            raise NotFound(
                f"task {name!r} is not in this bundle: it holds {', '.join(names) or 'no tasks'}"
            )
    return wanted


class LoadedBundle:
    """A bundle loaded for inference.

    Attributes:
        path: the bundle directory. manifest: its :class:`Manifest` (all its tasks).
        bundle_id: the sha256 of the ``manifest.json`` bytes read (what a server reports).
        onnx_info: the verified ``onnx.json`` of an ONNX export (None for ``torch``).
        tasks: the loaded task names. info: their manifest entries (:class:`TaskEntry`).
        releases: task -> :class:`~mtreg.artifacts.release.Release` of the loaded tasks
            whose candidate is loaded too (the torch backend only: an ONNX graph holds the
            stable versions). branches: every branch a :class:`Row` can name (its
            ``tasks``) -> entry: the tasks, and each candidate under ``candidate_key``.
        model: the :class:`MultiTaskModel` (eval mode); with ``backend="onnx"`` an
            :class:`OnnxModel`, with ``"auto"``, ``"fastest"`` or a gated backend a
            :class:`~mtreg.runtime.backends.PerSizeModel`, all called the same way.
            tokenizer: the trunk's tokenizer.
        choice: with ``"fastest"`` or a gated backend, the backend serving each batch
            size and its speed-up (:class:`~mtreg.runtime.backends.Choice`), else None.

    ``home``: where the quality gate is looked up (default ``$MTREG_HOME``). ``device``:
    where the torch network runs (:mod:`mtreg.runtime.device`).
    """

    def __init__(
        self,
        path: Path,
        tasks: Iterable[str] | None = None,
        backend: str = "torch",
        expected_id: str | None = None,
        home: Home | None = None,
        device: str = CPU,
    ) -> None:
        if check_device(device).type != CPU:
            backend = gpu_backend(backend)
        self.path = Path(path)
        self.manifest, self.bundle_id = read_bundle_manifest(self.path, expected_id)
        self.tasks = select_tasks(self.manifest.tasks, tasks)
        self.info = {name: self.manifest.tasks[name] for name in self.tasks}
        self.config = TrunkConfig(**self.manifest.trunk.config)
        if backend not in BACKENDS:
            raise MtregError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
        held = self.manifest.releases.items() if backend in (*TORCH_BACKENDS, FASTEST) else ()
        self.releases = {name: r for name, r in held if name in self.info}
        candidates = {candidate_key(name): r.candidate for name, r in self.releases.items()}
        self.branches: dict[str, TaskEntry] = {**self.info, **candidates}
        self.backend = backend
        check_tokenizer(self.path, self.manifest)
        self.tokenizer = load_tokenizer(self.path / TOKENIZER_DIR)
        self.onnx_info: OnnxInfo | None = None
        self.choice: Choice | None = None
        if backend == "torch":
            self.model = place(self._torch_model(), device)
        elif backend in (FASTEST, *GATED):
            # A release's candidate is a torch branch: then only torch backends may serve.
            self.model, self.choice = gated_model(
                backend,
                self.bundle_id,
                self.tasks,
                self._torch_model,
                bool(self.releases),
                home,
                device,
            )
        else:
            onnx = OnnxModel(self.path, self.bundle_id, device=device)
            self.onnx_info = onnx.info
            both = {"torch": self._torch_model(), "onnx": onnx}
            self.model = onnx if backend == "onnx" else measured_faster(both, self.tokenizer)

    def _torch_model(self) -> MultiTaskModel:
        depth = max((i.fork_depth for i in self.branches.values()), default=0)
        embeddings = load_component(self._read(EMBEDDINGS))
        trunk = Trunk.from_tensors(
            self.config,
            embeddings,
            [load_component(self._read(layer_path(i))) for i in range(depth)],
        )
        branches = {}
        for name, info in self.branches.items():
            path = self._read(info.file)
            meta, tensors = read_branch(path, self.config)
            check_against_entry(path, meta, info, self.config)
            branch = Branch(self.config, info.num_layers, info.head, fork_depth=info.fork_depth)
            branch.load_state_dict(tensors, strict=True)
            # DeBERTa: every layer reads the trunk's relative embeddings, branch layers too.
            branch.take_from_trunk(embeddings, None)
            branches[name] = (info.fork_depth, branch)
        self.layers_read = depth
        return MultiTaskModel(trunk, branches).eval()

    def _read(self, relative: str) -> Path:
        return checked_file(self.path, self.manifest.files, relative)

    def __repr__(self) -> str:
        return f"LoadedBundle({str(self.path)!r}, tasks={self.tasks})"

    def branch(self, task: str, version: str | None = None) -> str:
        """Return the branch of ``task`` that answers ``version`` (default: the stable one),
        for a :class:`Row`'s ``tasks``; ``run`` keys that row's result by it.

        Raises:
            NotFound: a task not loaded, or a version of it this bundle does not serve.
        """
        name = select_tasks(self.tasks, [task])[0]
        served = {self.info[name].version: name}
        if name in self.releases:
            served[self.releases[name].candidate.version] = candidate_key(name)
        found = served.get(find_version(version, served) or "") if version else name
        if found is None:
            raise NotFound(
                f"task {name!r} has no version {version!r} in this bundle: it serves "
                f"{', '.join(served)}"
            )
        return found

    def encode(self, inputs: Sequence[Input], info: TaskEntry) -> dict[str, Any]:
        """Tokenise ``inputs`` for a task; return tensors (and words, for a per-token head).

        Raises:
            MtregError: an input does not fit the task (a pair for a one-text task, ...).
        """
        columns: list[list[str]] = [[] for _ in info.inputs]
        for index, item in enumerate(inputs):
            fields = _fields(item, info, index)
            for column, value in zip(columns, fields, strict=True):
                column.append(cut_text(value, info.max_length))
        if info.head.per_token:
            words = [text.split() for text in columns[0]]
            batch = self.tokenizer(
                words,
                is_split_into_words=True,
                truncation=True,
                max_length=info.max_length,
                padding=True,
                return_tensors="pt",
            )
            word_ids = [batch.word_ids(i) for i in range(len(words))]
            return {"batch": batch, "words": words, "word_ids": word_ids}
        batch = self.tokenizer(
            *columns,
            truncation=True,
            max_length=info.max_length,
            padding=True,
            return_tensors="pt",
        )
        return {"batch": batch}

    def _asked(self, inputs: Sequence[Input], tasks: Iterable[str] | None) -> tuple[str, ...]:
        # What the CLI's option types check, for callers of the Python API.
        if isinstance(inputs, str | Mapping) or not isinstance(inputs, Sequence):
            raise MtregError("inputs must be a list of inputs: wrap a single input in [ ]")
        if isinstance(tasks, str):
            raise MtregError(f"tasks must be a list of task names: use [{tasks!r}]")
        return tuple(select_tasks(self.tasks, tasks))

    @torch.inference_mode()
    def run(
        self,
        rows: Sequence[Row],
        timings: MutableMapping[str, float] | None = None,
        encoded: Sequence[Encoded] | None = None,
    ) -> list[dict[str, Any]]:
        """Return, per row, ``{task: result}`` for the tasks that row asked for, in sorted
        task order (see :meth:`predict` for the results). With ``timings``, each branch's
        compute time in seconds is stored under its name (torch backend only). ``encoded``:
        ``rows`` tokenised already (:func:`mtreg.runtime.inference.encode_rows`).

        Rows asking for different tasks share one forward pass per input kind
        (:func:`mtreg.runtime.inference.forward_groups`).

        Raises:
            MtregError: an input a task it asks cannot read. KeyError: a task the bundle
                does not hold (rows are checked first: ``mtreg.serving.plan.plan_rows``).
        """
        results: list[dict[str, Any]] = [{} for _ in rows]
        for group in forward_groups(self, rows, timings, encoded):
            for position, i in enumerate(group.members):
                row = rows[i]
                for name in group.tasks:
                    if name in row.tasks:
                        logits = group.logits[name][position]
                        info = self.branches[name]
                        results[i][name] = task_result(
                            info, logits, group.encoded, position, row.logits
                        )
        return [dict(sorted(result.items())) for result in results]

    @torch.no_grad()
    def logits(
        self, inputs: Sequence[Input], tasks: Iterable[str] | None = None
    ) -> dict[str, tuple[torch.Tensor, dict[str, Any]]]:
        """Return ``{task: (logits tensor, encoded batch)}`` for a batch of inputs, the
        encoded batch being what :meth:`encode` returned for the task's input kind.

        Tasks that read their input the same way (one text, a pair, tagged words, same max
        length) share one trunk pass.

        Raises:
            NotFound: an unknown task. MtregError: an input the task cannot read.
        """
        names = self._asked(inputs, tasks)
        rows = [Row(item, names) for item in inputs]
        return {
            name: (group.logits[name], group.encoded)
            for group in forward_groups(self, rows)
            for name in group.tasks
        }

    def predict(
        self,
        inputs: Sequence[Input],
        tasks: Iterable[str] | None = None,
        batch_size: int = 32,
        with_logits: bool = False,
    ) -> list[dict[str, Any]]:
        """Predict every requested task for each input.

        An input is a text, a ``(text, pair)`` sequence, or a mapping of the tasks' input
        field names to texts.

        Returns:
            One dict per input: ``{task: result}``; a result holds ``label`` and ``score``
            (classification), ``labels`` and ``scores`` (multilabel), ``value`` (regression)
            or ``spans`` (tagging), plus ``logits`` when asked.

        Raises:
            NotFound: an unknown task. MtregError: an input the task cannot read (see
                :func:`mtreg.core.text.text_problem`), or arguments of the wrong type.
        """
        names = self._asked(inputs, tasks)
        check_batch_size(batch_size)
        for index, item in enumerate(inputs):  # numbered in the list, not in its batch
            for name in names:
                _fields(item, self.branches[name], index)
        results: list[dict[str, Any]] = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            results.extend(self.run([Row(item, names, with_logits) for item in chunk]))
        return results


def input_fields(item: Input, info: TaskEntry) -> list[str] | None:
    """Return the texts task ``info`` reads from ``item``, or None if it cannot read it
    (a pair for a one-text task, a missing field, a non-string)."""
    if isinstance(item, str):
        values: list = [item]
    elif isinstance(item, Mapping):
        if any(name not in item for name in info.inputs):
            return None
        values = [item[name] for name in info.inputs]
    elif isinstance(item, Sequence):
        values = list(item)
    else:
        return None
    if len(values) != len(info.inputs) or not all(isinstance(v, str) for v in values):
        return None
    return values


def input_problem(item: Input, info: TaskEntry) -> str | None:
    """Return why task ``info`` cannot read ``item`` (a pair for a one-text task, a missing
    field, an empty text: :func:`mtreg.core.text.text_problem`), or None when it can."""
    values = input_fields(item, info)
    if values is None:
        want = "one text" if len(info.inputs) == 1 else "a pair of texts"
        return f"task {info.name!r} reads {want} ({', '.join(info.inputs)})"
    return next(filter(None, map(text_problem, values)), None)


def _fields(item: Input, info: TaskEntry, index: int) -> list[str]:
    problem = input_problem(item, info)
    if problem is not None:
        raise MtregError(f"inputs[{index}]: {problem}")
    return input_fields(item, info) or []


def task_result(
    info: TaskEntry, logits: torch.Tensor, encoded: dict[str, Any], row: int, with_logits: bool
) -> dict[str, Any]:
    """Turn one row of a task's logits into its public result (label and score, labels and
    scores, value, or spans; plus the logits when asked). ``encoded`` is what
    :meth:`LoadedBundle.encode` returned for the batch."""
    head = info.head
    words = (encoded["words"][row], encoded["word_ids"][row]) if head.per_token else None
    result = heads.get(head.kind).result(head, logits, words)
    if with_logits:
        mask = encoded["batch"]["attention_mask"][row].bool()
        result["logits"] = (logits[mask] if head.per_token else logits).tolist()
    return result


def load_bundle(
    ref: str | Path = "serving",
    tasks: Iterable[str] | None = None,
    backend: str = FASTEST,
    registry: Any = None,
    device: str = CPU,
) -> LoadedBundle:
    """Load a bundle for inference: a bundle directory, or an alias / id of the registry.

    Args:
        ref: a directory holding ``manifest.json`` (a :class:`~pathlib.Path`, or a string
            with a ``/`` such as ``./serving``), or an alias or bundle id (prefix).
        tasks: load only these tasks (and the trunk up to their deepest fork).
        backend: ``fastest`` (per batch size, the fastest backend the bundle's quality
            gate finds eligible for every task; torch fp32 without a gate); ``torch``; a
            gated backend by name (``torch-bf16``, ``onnx-int8``, ...); ``onnx`` or ``auto``
            (whichever measured faster) for a folder written by ``mtreg export --format onnx``.
        registry: the :class:`mtreg.Registry` resolving aliases (default: ``Registry()``).
        device: ``cpu``, or ``cuda[:N]``: the torch network on a GPU under bf16/fp16
            autocast, or the fp32 ONNX graph on onnxruntime's CUDA provider
            (:mod:`mtreg.runtime.device`).

    Raises:
        NotFound: no such directory, alias, bundle or task. Damaged: a file that differs
            from the manifest, or a manifest that differs from the registry's bundle id.
        InvalidWeights: an unreadable weight file. MtregError: an unknown backend, or onnx
            without an ONNX export.
    """
    path = bundle_directory(ref)
    if path is not None:
        return LoadedBundle(path, tasks, backend, device=device)
    if registry is None:
        # A bundle directory loads without the database: SQLAlchemy only for a reference.
        from mtreg.registry.api import Registry

        with Registry() as registry:
            record = registry.bundle(str(ref))
            path = registry.bundle_dir(record)
    else:
        record = registry.bundle(str(ref))
        path = registry.bundle_dir(record)
    return LoadedBundle(
        path, tasks, backend, expected_id=record.id, home=registry.home, device=device
    )
