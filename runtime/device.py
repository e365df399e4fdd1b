"""Where a bundle's torch network runs: the CPU (the default), or a GPU (``cuda``,
``cuda:N``) under autocast.

On a GPU the weights move to the device once, at load; each call moves the tokenised
batch there, runs under autocast in bf16 where the GPU supports it (fp16 elsewhere: both
keep fp32 weights and accumulate in fp32), and returns fp32 logits on the CPU, so the rest
of the inference path (length buckets, results) does not change. ``torch`` runs on a GPU,
and so does ``fastest`` (its gate timed CPU backends). The fp32 ONNX graphs (``onnx``,
``onnx-fp32``) run on onnxruntime's CUDA execution provider, which needs the
``onnxruntime-gpu`` package; the int8 graphs and CPU autocast are CPU backends.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import torch

from mtreg.core.extras import require
from mtreg.errors import MtregError

CPU = "cpu"


def check_device(name: str) -> torch.device:
    """Return the torch device ``name`` names (``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        MtregError: another name, or a GPU torch cannot see (no CUDA build, no GPU, an
            index past the GPUs there are).
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MtregError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in (CPU, "cuda"):
        raise MtregError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MtregError(
                f"device {name!r}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                "use --device cpu, or install a CUDA build of torch on a GPU machine"
            )
        if (device.index or 0) >= count:
            raise MtregError(f"device {name!r}: this machine has {count} CUDA GPU(s)")
    return device


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Return the reduced precision autocast uses on ``device``: bf16 where supported."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class OnDevice:
    """A torch network on a GPU, called like :class:`~mtreg.nn.network.MultiTaskModel`
    with CPU tensors; returns fp32 logits on the CPU."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model.to(device)
        self.device = device
        self.dtype = autocast_dtype(device)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        tasks: Sequence[str] | None = None,
        rows: Mapping[str, Sequence[int]] | None = None,
        timings: MutableMapping[str, float] | None = None,
    ) -> dict[str, torch.Tensor]:
        moved = [
            None if t is None else t.to(self.device, non_blocking=True)
            for t in (input_ids, attention_mask, token_type_ids)
        ]
        with torch.autocast(self.device.type, dtype=self.dtype):
            out = self.model(*moved, tasks=tasks, rows=rows, timings=timings)
        return {task: logits.float().cpu() for task, logits in out.items()}


# The ONNX backends whose graph is fp32: onnxruntime's CUDA provider runs them whole, while
# an int8 graph's integer matmuls have no CUDA kernel and would run on the CPU in pieces.
GPU_ONNX = ("onnx", "onnx-fp32")
CUDA_PROVIDER = "CUDAExecutionProvider"


def gpu_backend(backend: str) -> str:
    """Return the backend that serves ``backend`` on a GPU: torch for ``torch`` and for
    ``fastest`` (its gate timed the backends on the CPU), the fp32 ONNX graph for ``onnx``
    and ``onnx-fp32``.

    Raises:
        MtregError: any other backend (torch-bf16 autocasts on the CPU; the int8 graphs
            and ``auto``'s timing are for the CPU).
    """
    if backend in GPU_ONNX:
        return backend
    if backend not in ("torch", "fastest"):
        raise MtregError(
            f"a GPU runs the torch backend or the fp32 ONNX graph, not {backend!r}: use "
            "--backend torch (autocast picks bf16 or fp16 on the GPU) or --backend onnx-fp32"
        )
    return "torch"


def onnx_providers(device: torch.device, available: Sequence[str] | None = None) -> list:
    """Return the onnxruntime execution providers for ``device``: the CPU's, or CUDA's on
    GPU ``device.index`` with the CPU's behind it for any operator CUDA lacks.
    ``available``: the providers this onnxruntime has (default: it is asked).

    Raises:
        MtregError: a GPU, and an onnxruntime without the CUDA provider (the CPU package).
    """
    if device.type == CPU:
        return ["CPUExecutionProvider"]
    if available is None:
        available = require("onnxruntime").get_available_providers()
    if CUDA_PROVIDER not in available:
        raise MtregError(
            f"device {str(device)!r}: this onnxruntime has no {CUDA_PROVIDER} (it has "
            f"{', '.join(available)}): install onnxruntime-gpu in place of onnxruntime, "
            "or use --backend torch"
        )
    return [(CUDA_PROVIDER, {"device_id": device.index or 0}), "CPUExecutionProvider"]


def place(model: torch.nn.Module, device: str) -> torch.nn.Module | OnDevice:
    """Return the torch network ``model`` to run on ``device``: itself on the CPU, an
    :class:`OnDevice` of it on a GPU.

    Raises:
        MtregError: a device :func:`check_device` refuses.
    """
    target = check_device(device)
    return model if target.type == CPU else OnDevice(model, target)
