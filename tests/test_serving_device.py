"""``--device cuda``: the torch network on a GPU under autocast, and the fp32 ONNX graph on
onnxruntime's CUDA provider, answering as on the CPU; refused in one line where there is no
GPU, no CUDA provider, or the backend cannot run on one.

The tests marked ``gpu`` run only with ``--gpu`` (tests/conftest.py), and fail on a machine
without what they need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
from factories import Checkpoints
from helpers import SERVING_TASKS, registered_bundle

from mtreg.errors import MtregError
from mtreg.runtime.bundle import load_bundle
from mtreg.runtime.device import CUDA_PROVIDER, check_device, gpu_backend, onnx_providers
from mtreg.runtime.export import export_onnx

TASKS = SERVING_TASKS[:4]  # the one-text tasks: every head kind
TEXTS = ["what", "the movie was great", "i want a refund for my order now, it never came"]
GPU = torch.cuda.is_available()
NO_GPU = "no CUDA GPU here (torch.cuda.is_available() is False): run --gpu where there is one"
CUDA_ONNX = GPU and CUDA_PROVIDER in onnxruntime.get_available_providers()
NO_CUDA_ONNX = f"no CUDA GPU with onnxruntime's {CUDA_PROVIDER} here (install onnxruntime-gpu)"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, checkpoints: Checkpoints) -> Path:
    tmp = tmp_path_factory.mktemp("device")
    return registered_bundle(tmp, checkpoints.copy(tmp / "trunk", num_layers=4), TASKS)


def require(available: bool, reason: str) -> None:
    """Fail the calling ``gpu`` test with ``reason`` unless ``available``."""
    if not available:
        pytest.fail(reason, pytrace=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "fastest"])
def test_the_gpu_answers_as_the_cpu_does(bundle_dir: Path, backend: str) -> None:
    require(GPU, NO_GPU)
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


@pytest.mark.gpu
def test_the_onnx_graph_on_the_cuda_provider_answers_as_on_the_cpu(
    bundle_dir: Path, tmp_path: Path
) -> None:
    require(CUDA_ONNX, NO_CUDA_ONNX)
    export_onnx(bundle_dir, tmp_path / "onnx")
    cpu = load_bundle(tmp_path / "onnx", backend="onnx").predict(TEXTS, with_logits=True)
    gpu = load_bundle(tmp_path / "onnx", backend="onnx", device="cuda")
    assert gpu.model.session.get_providers()[0] == CUDA_PROVIDER
    for on_cpu, on_gpu in zip(cpu, gpu.predict(TEXTS, with_logits=True), strict=True):
        for task in on_cpu:
            # fp32 on both; the GPU's kernels sum in another order (TF32 is off in ORT).
            expected = torch.tensor(on_cpu[task]["logits"])
            assert torch.allclose(torch.tensor(on_gpu[task]["logits"]), expected, atol=1e-3)


def test_the_cuda_provider_is_asked_for_on_a_gpu_and_its_absence_is_one_line() -> None:
    assert onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    with_cuda = ["TensorrtExecutionProvider", CUDA_PROVIDER, "CPUExecutionProvider"]
    assert onnx_providers(torch.device("cuda:1"), with_cuda) == [
        (CUDA_PROVIDER, {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    with pytest.raises(MtregError, match="install onnxruntime-gpu") as refused:
        onnx_providers(torch.device("cuda"), ["CPUExecutionProvider"])
    assert "\n" not in str(refused.value)
    # This machine's own onnxruntime: the CPU package, or onnxruntime-gpu.
    if CUDA_PROVIDER in onnxruntime.get_available_providers():
        assert onnx_providers(torch.device("cuda"))[0][0] == CUDA_PROVIDER
    else:
        with pytest.raises(MtregError, match=CUDA_PROVIDER):
            onnx_providers(torch.device("cuda"))


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "banana"])
def test_an_unknown_device_is_refused(name: str) -> None:
    with pytest.raises(MtregError, match="unknown device"):
        check_device(name)


@pytest.mark.parametrize("backend", ["auto", "torch-bf16", "onnx-int8", "onnx-int8-static"])
def test_a_gpu_runs_torch_or_the_fp32_graph_only(backend: str) -> None:
    assert gpu_backend("fastest") == gpu_backend("torch") == "torch"
    assert gpu_backend("onnx") == "onnx" and gpu_backend("onnx-fp32") == "onnx-fp32"
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
