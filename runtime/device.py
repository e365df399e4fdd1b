"""Where a bundle's torch network runs: the CPU (the default), or a GPU (``cuda``,
``cuda:N``) under autocast.

On a GPU the weights move to the device once, at load; each call moves the tokenised
batch there, runs under autocast in bf16 where the GPU supports it (fp16 elsewhere: both
keep fp32 weights and accumulate in fp32), and returns fp32 logits on the CPU, so the rest
of the inference path (length buckets, results) does not change. The device is orthogonal
to the backend, but only the torch network moves: ``torch`` runs on it, and so does
``fastest`` (its gate timed CPU backends); the ONNX backends run on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import torch

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


def gpu_backend(backend: str) -> str:
    """Return the backend that serves ``backend`` on a GPU: torch for ``torch`` and for
    ``fastest`` (its gate timed the backends on the CPU).

    Raises:
        MtregError: any other backend (torch-bf16 autocasts on the CPU; ONNX graphs run
            on the CPU).
    """
    if backend not in ("torch", "fastest"):
        raise MtregError(
            f"a GPU runs the torch backend, not {backend!r}: use --backend torch "
            "(autocast picks bf16 or fp16 on the GPU)"
        )
    return "torch"


def place(model: torch.nn.Module, device: str) -> torch.nn.Module | OnDevice:
    """Return the torch network ``model`` to run on ``device``: itself on the CPU, an
    :class:`OnDevice` of it on a GPU.

    Raises:
        MtregError: a device :func:`check_device` refuses.
    """
    target = check_device(device)
    return model if target.type == CPU else OnDevice(model, target)
