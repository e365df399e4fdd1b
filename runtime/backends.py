"""The backends a loaded bundle runs on, and the fastest one its quality gate allows.

Every backend is called like :class:`MultiTaskModel`: ``model(input_ids, attention_mask,
token_type_ids, tasks, rows, timings)`` returning ``{task: logits}``. torch fp32 is the
reference; ``torch-bf16`` runs the same weights under CPU autocast; the ONNX backends run a
graph of the bundle's ONNX cache folder (fp32 with onnxruntime's fusions, int8 dynamic or
static quantisation, per tensor or per channel), verified against its ``onnx.json``.

``fastest`` reads the bundle's gate (:mod:`mtreg.artifacts.gate_file`) and serves each
batch size with the fastest backend eligible for every loaded task; with no gate it serves
torch fp32 and says how to compute one.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mtreg.artifacts.gate_file import (
    BACKEND_FILES,
    FASTEST,
    PROBE_SIZES,
    REFERENCE,
    Gate,
    read_gate,
)
from mtreg.artifacts.home import Home
from mtreg.artifacts.manifest import read_bundle_manifest
from mtreg.artifacts.onnx_info import GRAPH, OnnxInfo, verify_onnx
from mtreg.core.extras import require
from mtreg.errors import MtregError, NotFound
from mtreg.nn.network import MultiTaskModel
from mtreg.runtime.device import CPU, check_device, onnx_providers

log = logging.getLogger("mtreg.runtime")

# Backends chosen by name that run what the gate's folder holds (``onnx`` and ``auto`` keep
# meaning a folder's own ``mtreg export --format onnx``).
GATED = tuple(name for name in BACKEND_FILES if name != REFERENCE)
TORCH_BACKENDS = (REFERENCE, "torch-bf16")
GATE_HINT = "compute one with `mtreg bundle gate` on this bundle"


class OnnxModel:
    """An ONNX graph of an export folder (``model.onnx`` unless ``graph`` names another),
    called like :class:`MultiTaskModel`.

    The folder's graph files are verified against its ``onnx.json`` (``info``), which
    must name ``bundle_id`` (the sha256 of the folder's manifest), before onnxruntime
    opens them; a caller opening several graphs of one folder verifies it once and passes
    the ``verified`` record (hashing every graph per graph opened cost seconds per load).
    The graph computes every output in one call, so ``rows`` and ``timings`` (per-branch
    times) are accepted and not used. ``device``: ``cpu``, or ``cuda[:N]`` for onnxruntime's
    CUDA provider (:func:`~mtreg.runtime.device.onnx_providers`); inputs and logits stay
    CPU arrays either way.
    """

    def __init__(
        self,
        path: Path,
        bundle_id: str,
        graph: str = GRAPH,
        verified: OnnxInfo | None = None,
        device: str = CPU,
    ) -> None:
        onnxruntime = require("onnxruntime")
        providers = onnx_providers(check_device(device))
        self.info: OnnxInfo = verified or verify_onnx(path, bundle_id)
        options = onnxruntime.SessionOptions()
        # As many threads as torch uses, so the backends compare (and share a CPU) fairly.
        options.intra_op_num_threads = torch.get_num_threads()
        # Idle threads that spin would steal the cores from torch (another backend, or the
        # tokeniser) between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(Path(path) / graph), options, providers=providers
        )
        self.outputs = [o.name for o in self.session.get_outputs()]
        # A family without token types (DistilBERT, ModernBERT) has no token_type_ids input.
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(
        self, input_ids, attention_mask, token_type_ids=None, tasks=None, rows=None, timings=None
    ) -> dict:
        names = self.outputs if tasks is None else sorted(tasks)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        feeds = {
            "input_ids": input_ids.numpy(),
            "attention_mask": attention_mask.numpy(),
            "token_type_ids": token_type_ids.numpy(),
        }
        feeds = {k: v for k, v in feeds.items() if k in self.inputs}
        values = self.session.run(names, feeds)
        return {name: torch.from_numpy(v) for name, v in zip(names, values, strict=True)}


class Bf16Model:
    """The torch weights run under CPU bf16 autocast (matmuls in bf16 on AMX/AVX-512
    BF16 CPUs); logits come back as fp32."""

    def __init__(self, model: MultiTaskModel) -> None:
        self.model = model

    def __call__(
        self, input_ids, attention_mask, token_type_ids=None, tasks=None, rows=None, timings=None
    ) -> dict:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.model(input_ids, attention_mask, token_type_ids, tasks, rows, timings)
        return {name: logits.float() for name, logits in out.items()}


class PerSizeModel:
    """Several backends, each serving the batch sizes nearest (in ratio) the probe size it
    was chosen for: ``choice`` maps probe size -> backend name."""

    def __init__(self, choice: Mapping[int, str], backends: Mapping[str, Callable]) -> None:
        self.choice, self.backends = dict(choice), dict(backends)

    def backend_for(self, size: int) -> str:
        """Return the backend serving a batch of ``size`` inputs."""
        nearest = min(self.choice, key=lambda probe: abs(math.log(probe / max(size, 1))))
        return self.choice[nearest]

    def __call__(
        self, input_ids, attention_mask, token_type_ids=None, tasks=None, rows=None, timings=None
    ) -> dict:
        model = self.backends[self.backend_for(input_ids.shape[0])]
        return model(input_ids, attention_mask, token_type_ids, tasks, rows, timings)


def measured_faster(backends: Mapping[str, Callable], tokenizer) -> PerSizeModel:
    """Return the backends as a :class:`PerSizeModel` serving each of batch sizes 1, 8 and
    32 with the one that measured faster on this machine now (``backend="auto"``)."""
    choice = {}
    with torch.inference_mode():
        for size in (1, 8, 32):
            batch = tokenizer(["a probe sentence of ordinary length for timing"] * size)
            args = [torch.tensor(batch[key]) for key in ("input_ids", "attention_mask")]
            seconds = {}
            for name, model in backends.items():
                model(*args)  # warm-up
                started = time.perf_counter()
                for _ in range(3):
                    model(*args)
                seconds[name] = time.perf_counter() - started
            choice[size] = min(seconds, key=seconds.__getitem__)
    return PerSizeModel(choice, backends)


@dataclass(frozen=True)
class Choice:
    """The backend serving each probe batch size (``backends``), its measured speed-up
    over torch fp32 (``speedup``, 1.0 without a gate), and a ``note`` (why fp32, or that
    an explicit choice is not eligible), shown by :meth:`line`."""

    backends: Mapping[int, str]
    speedup: Mapping[int, float]
    note: str = ""

    def line(self) -> str:
        """Return the one line printed at load: each probe size's backend and speed-up."""
        if len(set(self.backends.values())) == 1:
            (name,) = set(self.backends.values())
            parts = [
                f"{name} at every batch size ("
                + ", ".join(f"{self.speedup[s]:.2f}x fp32 at {s}" for s in sorted(self.backends))
                + ")"
            ]
        else:
            parts = [
                f"{self.backends[size]} at batch {size} ({self.speedup[size]:.2f}x fp32)"
                for size in sorted(self.backends)
            ]
        return "backend: " + ", ".join(parts) + (f"; {self.note}" if self.note else "")


def gate_folder(bundle_id: str, home: Home | None = None) -> Path:
    """Return the folder holding bundle ``bundle_id``'s gate and graphs: its ONNX cache
    folder under ``home`` (default: ``$MTREG_HOME``'s)."""
    return (home or Home.resolve()).onnx(bundle_id)


@dataclass(frozen=True)
class GateFolder:
    """A bundle's gate folder, verified once: its ``path``, the id of the export in it
    (``folder_id``), its ``onnx.json`` (``info``) and the ``gate`` it lists."""

    path: Path
    folder_id: str
    info: OnnxInfo
    gate: Gate

    def model(self, name: str, device: str = CPU) -> OnnxModel:
        """Return gated ONNX backend ``name`` on this folder's graph (not hashed again),
        running on ``device``."""
        graph = BACKEND_FILES[name]
        assert graph is not None
        return OnnxModel(self.path, self.folder_id, graph, verified=self.info, device=device)


def load_gate(bundle_id: str, home: Home | None = None) -> GateFolder | None:
    """Return bundle ``bundle_id``'s gate folder once its files verify (every file hashed
    once), or None when it has no gate.

    Raises:
        Damaged: a gate or graph file that differs from the folder's ``onnx.json``, or a
            gate computed for another bundle.
    """
    folder = gate_folder(bundle_id, home)
    if not (folder / GRAPH).is_file():
        return None
    _, folder_id = read_bundle_manifest(folder)
    info = verify_onnx(folder, folder_id)  # hashes gate.json too: it is listed there
    gate = read_gate(folder)
    if gate is None or "gate.json" not in info.files:
        return None
    if gate.bundle != bundle_id or info.source != bundle_id:
        raise MtregError(f"{folder} holds the gate of bundle {gate.bundle[:12]}: {GATE_HINT}")
    return GateFolder(folder, folder_id, info, gate)


def choose(gate: Gate, tasks: list[str], allowed: tuple[str, ...]) -> dict[int, str]:
    """Return, per probe size, the fastest backend among ``allowed`` that ran and is
    eligible for every one of ``tasks`` (torch fp32 always is)."""
    eligible = [
        name
        for name, backend in gate.backends.items()
        if name in allowed and (name == REFERENCE or backend.eligible(tasks))
    ]
    return {
        size: min(eligible, key=lambda name: gate.backends[name].seconds.get(size, math.inf))
        for size in PROBE_SIZES
    }


def gated_model(
    backend: str,
    bundle_id: str,
    tasks: list[str],
    torch_model: Callable[[], MultiTaskModel],
    torch_only: bool,
    home: Home | None = None,
    device: str = CPU,
) -> tuple[Callable, Choice]:
    """Build the model for ``backend`` (``fastest`` or one of :data:`GATED`) and say what
    serves: ``fastest`` picks per batch size from the gate (among torch backends only when
    ``torch_only``: a release's candidate runs on torch); a named backend runs as asked, with
    a note when the gate does not find it eligible for ``tasks``; an ONNX backend runs its
    graph on ``device``. Logs the choice's line.

    Raises:
        NotFound: an ONNX backend asked by name for a bundle without a gate folder.
        Damaged: a gate folder whose files differ from its ``onnx.json``.
    """
    folder = load_gate(bundle_id, home)
    gate = folder.gate if folder else None
    torch_model = functools.cache(torch_model)  # one copy of the weights for both torch backends
    note = ""
    if backend == FASTEST:
        if gate is None:
            choice = dict.fromkeys(PROBE_SIZES, REFERENCE)
            note = f"no quality gate for bundle {bundle_id[:12]}: " + GATE_HINT
        else:
            allowed = TORCH_BACKENDS if torch_only else tuple(BACKEND_FILES)
            choice = choose(gate, tasks, allowed)
    else:
        choice = dict.fromkeys(PROBE_SIZES, backend)
        if gate is None and BACKEND_FILES[backend] is not None:
            raise NotFound(
                f"backend {backend!r} runs a graph of the quality gate's folder, and bundle "
                f"{bundle_id[:12]} has none: " + GATE_HINT
            )
        if gate is not None and not gate.backends[backend].eligible(tasks):
            note = f"{backend} is not within the quality gate for every task (asked for anyway)"
    models = {name: _build(name, torch_model, folder, device) for name in set(choice.values())}
    base = gate.backends[REFERENCE].seconds if gate else {}
    speedup = {
        size: _ratio(base.get(size), gate.backends[name].seconds.get(size) if gate else None)
        for size, name in choice.items()
    }
    made = Choice(choice, speedup, note)
    log.info("%s", made.line())
    # One backend for every size needs no dispatch: torch stays a plain MultiTaskModel.
    if len(models) == 1:
        return next(iter(models.values())), made
    return PerSizeModel(choice, models), made


def _ratio(reference: float | None, seconds: float | None) -> float:
    return reference / seconds if reference and seconds else 1.0


def _build(
    name: str, torch_model: Callable[[], MultiTaskModel], folder: GateFolder | None, device: str
) -> Callable:
    if name == REFERENCE:
        return torch_model()
    if name == "torch-bf16":
        return Bf16Model(torch_model())
    assert folder is not None  # an ONNX backend without a gate was refused before
    return folder.model(name, device)
