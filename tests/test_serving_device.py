"""``--device cuda``: the torch network on a GPU under autocast, answering as it does on the
CPU; refused in one line where there is no GPU or the backend cannot run on one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import Checkpoints
from helpers import SERVING_TASKS, registered_bundle

from mtreg.errors import MtregError
from mtreg.runtime.bundle import load_bundle
from mtreg.runtime.device import check_device, gpu_backend

TASKS = SERVING_TASKS[:4]  # the one-text tasks: every head kind
TEXTS = ["what", "the movie was great", "i want a refund for my order now, it never came"]
GPU = torch.cuda.is_available()
NO_GPU = "no CUDA GPU here (torch.cuda.is_available() is False): the GPU path runs where one is"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints) -> Path:
    tmp = tmp_path_factory.mktemp("device")
    return registered_bundle(tmp, checkpoints.copy(tmp / "trunk", num_layers=4), TASKS)


@pytest.mark.skipif(not GPU, reason=NO_GPU)
@pytest.mark.parametrize("backend", ["torch", "fastest"])
def test_the_gpu_answers_as_the_cpu_does(bundle_dir: Path, backend: str) -> None:
    cpu = load_bundle(bundle_dir, backend="torch").predict(TEXTS, with_logits=True)
    gpu = load_bundle(bundle_dir, backend=backend, device="cuda")
    assert gpu.backend == "torch"
    answers = gpu.predict(TEXTS, with_logits=True)
    for on_cpu, on_gpu in zip(cpu, answers, strict=True):
        assert on_cpu.keys() == on_gpu.keys()
        for task in on_cpu:
            # bf16/fp16 autocast: logits close, not equal.
            expected = torch.tensor(on_cpu[task]["logits"])
            assert torch.allclose(torch.tensor(on_gpu[task]["logits"]), expected, atol=5e-2)


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "banana"])
def test_an_unknown_device_is_refused(name: str) -> None:
    with pytest.raises(MtregError, match="unknown device"):
        check_device(name)


@pytest.mark.parametrize("backend", ["onnx", "auto", "torch-bf16", "onnx-int8"])
def test_a_gpu_runs_the_torch_backend_only(backend: str) -> None:
    assert gpu_backend("fastest") == gpu_backend("torch") == "torch"
    with pytest.raises(MtregError, match="--backend torch"):
        gpu_backend(backend)


def test_a_gpu_that_is_not_there_is_one_line_and_exit_1(bundle_dir: Path) -> None:
    # No GPU: any cuda device; with GPUs: the index past the last one.
    device = f"cuda:{torch.cuda.device_count()}" if GPU else "cuda"
    with pytest.raises(MtregError, match="CUDA GPU"):
        load_bundle(bundle_dir, device=device)
    command = [sys.executable, "-m", "mtreg", "predict", "--bundle", str(bundle_dir)]
    result = subprocess.run(
        [*command, "--device", device, "a text"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA GPU" in lines[0], result.stderr
    assert result.stdout == ""
