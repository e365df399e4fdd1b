"""Loading a bundle directory and predicting with it: what a user serves.

``load_bundle`` reads ``manifest.json``, checks every path and every file's sha256 against
it, and builds a :class:`MultiTaskModel` holding only the requested tasks and the trunk up
to their deepest fork: trunk layers above that are never opened.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtreg.artifacts.branch_file import read_branch
from mtreg.artifacts.checkpoint import load_component
from mtreg.artifacts.config import TrunkConfig
from mtreg.artifacts.manifest import MANIFEST, layer_path, read_manifest
from mtreg.artifacts.objects import sha256_file
from mtreg.core.spec import HeadSpec
from mtreg.errors import InvalidWeights, MtregError, NotFound
from mtreg.nn.layers import Branch
from mtreg.nn.network import MultiTaskModel, Trunk
from mtreg.training.data import load_tokenizer, tag_spans

Input = str | Sequence[str] | Mapping[str, str]
BACKENDS = ("torch", "onnx", "auto")


@dataclass(frozen=True)
class TaskInfo:
    """How one task of a bundle reads its input and what it outputs."""

    name: str
    version: str
    head: HeadSpec
    inputs: tuple[str, ...]
    fork_depth: int
    max_length: int


def select_tasks(manifest: Mapping[str, Any], tasks: Iterable[str] | None) -> list[str]:
    """Return the requested task names (all by default), sorted.

    Raises:
        NotFound: a task the bundle does not hold (the message lists those it does).
    """
    held = sorted(manifest["tasks"])
    if tasks is None:
        return held
    wanted = sorted(set(tasks))
    for name in wanted:
        if name not in manifest["tasks"]:
            raise NotFound(
                f"task {name!r} is not in this bundle: it holds {', '.join(held) or 'no tasks'}"
            )
    return wanted


def task_info(manifest: Mapping[str, Any], name: str) -> TaskInfo:
    """Return what the manifest says about task ``name``."""
    entry = manifest["tasks"][name]
    return TaskInfo(
        name=name,
        version=entry["version"],
        head=HeadSpec.from_dict(entry["head"]),
        inputs=tuple(entry["inputs"]),
        fork_depth=entry["fork_depth"],
        max_length=entry["max_length"],
    )


def _checked(root: Path, manifest: Mapping[str, Any], relative: str) -> Path:
    path = root / relative
    expected = manifest["files"].get(relative)
    if expected is None or not path.is_file() or sha256_file(path) != expected:
        raise InvalidWeights(
            f"bundle file {relative} is missing or does not match the manifest: the bundle "
            f"at {root} is damaged; rebuild it (`mtreg sync`) or export it again"
        )
    return path


class OnnxModel:
    """The ONNX graph of an ``mtreg export --format onnx`` folder, called like
    :class:`MultiTaskModel`: ``model(input_ids, attention_mask, token_type_ids, tasks)``."""

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise MtregError("the onnx backend needs `pip install 'mtreg[onnx]'`") from None
        graph = Path(path) / "model.onnx"
        if not graph.is_file():
            raise NotFound(
                f"{path} holds no model.onnx: export one with `mtreg export --format onnx`"
            )
        self.session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, input_ids, attention_mask, token_type_ids=None, tasks=None) -> dict:
        names = self.outputs if tasks is None else sorted(tasks)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        feeds = {
            "input_ids": input_ids.numpy(),
            "attention_mask": attention_mask.numpy(),
            "token_type_ids": token_type_ids.numpy(),
        }
        values = self.session.run(names, feeds)
        return {name: torch.from_numpy(v) for name, v in zip(names, values, strict=True)}


class AutoModel:
    """Both backends, each serving the batch sizes where it measured faster on this machine.

    onnxruntime tends to win at small batches and torch at large ones, but where the
    crossover lies depends on the CPU, so it is measured once, when the bundle loads.
    """

    PROBE_SIZES = (1, 8, 32)

    def __init__(self, torch_model: MultiTaskModel, onnx_model: OnnxModel, tokenizer) -> None:
        self.backends = {"torch": torch_model, "onnx": onnx_model}
        self.choice = {size: self._faster(size, tokenizer) for size in self.PROBE_SIZES}

    def _faster(self, size: int, tokenizer) -> str:
        batch = tokenizer(["a probe sentence of ordinary length for timing"] * size)
        args = [torch.tensor(batch[key]) for key in ("input_ids", "attention_mask")]
        seconds = {}
        with torch.inference_mode():
            for name, model in self.backends.items():
                model(*args)  # warm-up
                started = time.perf_counter()
                for _ in range(3):
                    model(*args)
                seconds[name] = time.perf_counter() - started
        return min(seconds, key=seconds.__getitem__)

    def backend_for(self, size: int) -> str:
        """Return the backend measured faster at the probe size nearest ``size``."""
        nearest = min(self.PROBE_SIZES, key=lambda probe: abs(probe - size))
        return self.choice[nearest]

    def __call__(self, input_ids, attention_mask, token_type_ids=None, tasks=None) -> dict:
        model = self.backends[self.backend_for(input_ids.shape[0])]
        return model(input_ids, attention_mask, token_type_ids, tasks=tasks)


class LoadedBundle:
    """A bundle loaded for inference.

    Attributes:
        path: the bundle directory. manifest: its manifest. tasks: the loaded task names.
        model: the :class:`MultiTaskModel` (eval mode); with ``backend="onnx"`` an
            :class:`OnnxModel`, with ``"auto"`` an :class:`AutoModel`, both called the same
            way. tokenizer: the trunk's tokenizer.
    """

    def __init__(
        self, path: Path, tasks: Iterable[str] | None = None, backend: str = "torch"
    ) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path / MANIFEST)
        self.tasks = select_tasks(self.manifest, tasks)
        self.info = {name: task_info(self.manifest, name) for name in self.tasks}
        self.config = TrunkConfig(**self.manifest["trunk"]["config"])
        if backend not in BACKENDS:
            raise MtregError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
        self.backend = backend
        for relative in self.manifest["files"]:
            if relative.startswith("tokenizer/"):
                self._read(relative)
        self.tokenizer = load_tokenizer(self.path / "tokenizer")
        if backend == "torch":
            self.model = self._torch_model()
        elif backend == "onnx":
            self.model = OnnxModel(self.path)
        else:
            self.model = AutoModel(self._torch_model(), OnnxModel(self.path), self.tokenizer)

    def _torch_model(self) -> MultiTaskModel:
        depth = max((i.fork_depth for i in self.info.values()), default=0)
        trunk = Trunk.from_tensors(
            self.config,
            load_component(self._read("trunk/embeddings.safetensors")),
            [load_component(self._read(layer_path(i))) for i in range(depth)],
        )
        branches = {}
        for name, info in self.info.items():
            entry = self.manifest["tasks"][name]
            _, tensors = read_branch(self._read(entry["file"]), self.config)
            branch = Branch(self.config, entry["num_layers"], info.head)
            branch.load_state_dict(tensors, strict=True)
            branches[name] = (info.fork_depth, branch)
        self.layers_read = depth
        return MultiTaskModel(trunk, branches).eval()

    def _read(self, relative: str) -> Path:
        return _checked(self.path, self.manifest, relative)

    def __repr__(self) -> str:
        return f"LoadedBundle({str(self.path)!r}, tasks={self.tasks})"

    def encode(self, inputs: Sequence[Input], info: TaskInfo) -> dict[str, Any]:
        """Tokenise ``inputs`` for a task; return tensors (and words, for tagging).

        Raises:
            MtregError: an input does not fit the task (a pair for a one-text task, ...).
        """
        columns: list[list[str]] = [[] for _ in info.inputs]
        for item in inputs:
            fields = _fields(item, info)
            for column, value in zip(columns, fields, strict=True):
                column.append(value)
        if info.head.kind == "tagging":
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

    @torch.no_grad()
    def logits(self, inputs: Sequence[Input], tasks: Iterable[str] | None = None) -> dict:
        """Return ``{task: logits tensor}`` for a batch of inputs.

        Tasks that read their input the same way (one text, a pair, tagged words, same max
        length) share one trunk pass.
        """
        names = select_tasks({"tasks": {t: None for t in self.tasks}}, tasks)
        groups: dict[tuple, list[str]] = {}
        for name in names:
            info = self.info[name]
            key = (info.inputs, info.head.kind == "tagging", info.max_length)
            groups.setdefault(key, []).append(name)
        out: dict[str, Any] = {}
        for group in groups.values():
            encoded = self.encode(inputs, self.info[group[0]])
            batch = encoded["batch"]
            logits = self.model(
                batch["input_ids"],
                batch["attention_mask"],
                batch.get("token_type_ids"),
                tasks=group,
            )
            for name in group:
                out[name] = (logits[name], encoded)
        return out

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
            NotFound: an unknown task. MtregError: an input the task cannot read.
        """
        if isinstance(inputs, str | Mapping):
            raise MtregError("predict takes a list of inputs: wrap a single input in [ ]")
        results: list[dict[str, Any]] = []
        for start in range(0, len(inputs), batch_size):
            chunk = list(inputs[start : start + batch_size])
            rows: list[dict[str, Any]] = [{} for _ in chunk]
            for name, (logits, encoded) in self.logits(chunk, tasks).items():
                info = self.info[name]
                for i, row in enumerate(rows):
                    row[name] = task_result(info, logits[i], encoded, i, with_logits)
            results.extend(rows)
        return results


def input_fields(item: Input, info: TaskInfo) -> list[str] | None:
    """Return the texts task ``info`` reads from ``item``, or None if it cannot read it
    (a pair for a one-text task, a missing field, a non-string)."""
    if isinstance(item, str):
        values: list = [item]
    elif isinstance(item, Mapping):
        if any(name not in item for name in info.inputs):
            return None
        values = [item[name] for name in info.inputs]
    else:
        values = list(item)
    if len(values) != len(info.inputs) or not all(isinstance(v, str) for v in values):
        return None
    return values


def _fields(item: Input, info: TaskInfo) -> list[str]:
    values = input_fields(item, info)
    if values is None:
        want = "one text" if len(info.inputs) == 1 else "a pair of texts"
        raise MtregError(f"task {info.name!r} reads {want} ({', '.join(info.inputs)})")
    return values


def task_result(
    info: TaskInfo, logits: torch.Tensor, encoded: dict[str, Any], row: int, with_logits: bool
) -> dict[str, Any]:
    """Turn one row of a task's logits into its public result (label and score, labels and
    scores, value, or spans; plus the logits when asked). ``encoded`` is what
    :meth:`LoadedBundle.encode` returned for the batch."""
    head = info.head
    if head.kind == "classification":
        probs = logits.softmax(-1)
        best = int(probs.argmax())
        result: dict[str, Any] = {"label": head.labels[best], "score": float(probs[best])}
    elif head.kind == "multilabel":
        probs = logits.sigmoid()
        scores = {label: float(p) for label, p in zip(head.labels, probs, strict=True)}
        result = {"labels": [label for label, p in scores.items() if p > 0.5], "scores": scores}
    elif head.kind == "regression":
        values = logits.tolist()
        result = (
            {"value": values[0]}
            if len(head.labels) <= 1
            else {"values": dict(zip(head.labels, values, strict=True))}
        )
    else:
        words, word_ids = encoded["words"][row], encoded["word_ids"][row]
        tags = ["O"] * len(words)
        seen = set()
        for position, word in enumerate(word_ids):
            if word is not None and word not in seen:
                seen.add(word)
                tags[word] = head.labels[int(logits[position].argmax())]
        result = {"spans": tag_spans(words, tags)}
    if with_logits:
        mask = encoded["batch"]["attention_mask"][row].bool()
        result["logits"] = (logits[mask] if head.kind == "tagging" else logits).tolist()
    return result


def load_bundle(
    ref: str | Path = "serving",
    tasks: Iterable[str] | None = None,
    backend: str = "torch",
    registry: Any = None,
) -> LoadedBundle:
    """Load a bundle for inference: a bundle directory, or an alias / id of the registry.

    Args:
        ref: a directory holding ``manifest.json``, or an alias or bundle id (prefix).
        tasks: load only these tasks (and the trunk up to their deepest fork).
        backend: ``torch``; ``onnx`` or ``auto`` (per batch size, whichever measured faster)
            for a folder written by ``mtreg export --format onnx``.
        registry: the :class:`mtreg.Registry` resolving aliases (default: ``Registry()``).

    Raises:
        NotFound: no such directory, alias, bundle or task. InvalidWeights: a damaged bundle.
        MtregError: an unknown backend, or onnx without an ONNX export.
    """
    path = Path(ref)
    if not (path / MANIFEST).is_file():
        if path.is_dir() or "/" in str(ref):
            raise NotFound(f"{ref} holds no {MANIFEST}: point at a bundle directory")
        if registry is None:
            from mtreg.registry.api import Registry

            with Registry() as registry:
                path = registry.bundle_path(str(ref))
        else:
            path = registry.bundle_path(str(ref))
    return LoadedBundle(path, tasks, backend)
