"""The hardware limit a bundle's forward pass is measured against (used by bench/serving.py).

* :func:`matmul_peaks`: this machine's own matrix-product peak, measured now with the
  threads torch uses: a large fp32 and bf16 GEMM through torch, and int8 through the faster
  of ``torch._int_mm`` and onnxruntime's ``MatMulInteger`` (int8 x int8 -> int32, what a
  dynamically quantised graph runs).
* :func:`bundle_flops`: the floating-point operations of one forward pass of a bundle,
  counted from its shapes: the trunk's layers up to the deepest fork once, then every
  branch's layers, pooler and classifier, attention included (QK^T and the weighted sum of
  V, per head). Elementwise work (softmax, GELU, layer norms, embeddings) is left out: it
  is a few percent of the matmuls at these sizes. ``tokens`` counts each row at its actual
  token length (the useful work) or at its batch's padded width (what the hardware did).
* :func:`bucketed`: each backend again over mtreg's length buckets (what ``mtreg serve``
  runs: ``runtime.inference.length_buckets`` at its default overhead), so the share of the
  peak is measured for the padding the server actually pays, not only a batch's longest.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# GEMMs of each size, best of the calls that fit in BUDGET_S per size; sizes stop growing
# once one call takes SLOW_CALL_S (a slow kernel needs no bigger product to show its rate).
SIZES = (256, 512, 1024, 2048)
SLOW_CALL_S = 0.5
BUDGET_S = 1.0


def _peak(make) -> float:
    """Return the best GFLOP/s over the sizes of ``make(n)`` (an n x n x n GEMM, as a
    callable). The best call, not the mean: on a shared machine the peak is what a call
    reaches when it has the cores to itself."""
    rates = []
    for n in SIZES:
        fn = make(n)
        began = time.perf_counter()
        fn()  # warm-up
        best = once = time.perf_counter() - began
        spent = 0.0
        while spent < BUDGET_S and once < SLOW_CALL_S:
            began = time.perf_counter()
            fn()
            took = time.perf_counter() - began
            best, spent = min(best, took), spent + took
        rates.append(2 * n**3 / best / 1e9)
        if once >= SLOW_CALL_S:
            break
    return max(rates)


def _torch_gemm(dtype: torch.dtype):
    def make(n: int):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        return lambda: torch.mm(a, b)

    return make


def _torch_int8(n: int):
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    b = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    return lambda: torch._int_mm(a, b)


def _onnx_int8(n: int):
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])],
        "gemm",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [n, n]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemm.onnx"
        onnx.save(model, str(path))
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    rng = np.random.default_rng(0)
    feeds = {
        "a": rng.integers(0, 255, (n, n), dtype=np.uint8),
        "b": rng.integers(-128, 127, (n, n), dtype=np.int8),
    }
    return lambda: session.run(None, feeds)


def matmul_peaks() -> dict[str, Any]:
    """Return this machine's measured GEMM peak in GFLOP/s (GOP/s for int8) per precision,
    with torch's current threads, and how int8 was measured."""
    int8 = {"onnxruntime MatMulInteger": _peak(_onnx_int8), "torch._int_mm": _peak(_torch_int8)}
    source = max(int8, key=int8.__getitem__)
    return {
        "threads": torch.get_num_threads(),
        "fp32": _peak(_torch_gemm(torch.float32)),
        "bf16": _peak(_torch_gemm(torch.bfloat16)),
        "int8": int8[source],
        "int8_by": {k: round(v, 2) for k, v in int8.items()},
        "int8_source": source,
    }


def layer_flops(hidden: int, intermediate: int, length: int) -> int:
    """FLOPs of one encoder layer on one row of ``length`` tokens: Q, K, V and output
    projections, the feed-forward pair, and attention (scores and weighted values)."""
    linear = 2 * length * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = 2 * 2 * length * length * hidden
    return linear + attention


def bundle_flops(bundle: Any, tasks: Sequence[str], lengths: Sequence[int]) -> int:
    """FLOPs of one forward pass of ``tasks`` of a loaded ``bundle`` over rows of token
    ``lengths`` (actual or padded, as the caller counts them)."""
    config = bundle.config
    entries = [bundle.info[name] for name in tasks]
    depth = max(entry.fork_depth for entry in entries)
    layers = depth + sum(entry.num_layers for entry in entries)
    h, i = config.hidden_size, config.intermediate_size
    per_rows = sum(layers * layer_flops(h, i, length) for length in lengths)
    # Pooler (h x h) and classifier (h x labels) per row and task.
    heads = sum(2 * h * h + 2 * h * max(1, len(entry.head.labels)) for entry in entries)
    return per_rows + heads * len(lengths)


# The precision each backend of bench/serving.py computes in, hence the peak it is held to.
PRECISION = {"torch": "fp32", "onnx_fp32": "fp32", "torch_bf16": "bf16", "onnx_int8": "int8"}
BUCKETED = "_buckets"  # suffix of a backend run over length buckets (:func:`bucketed`)


def precision(name: str) -> str:
    """Return the precision backend ``name`` (bucketed or not) computes in."""
    return PRECISION[name.removesuffix(BUCKETED)]


def sub_batches(batch: dict[str, torch.Tensor], overhead: int) -> list[dict[str, torch.Tensor]]:
    """Return ``batch`` (right-padded) split as the server splits it: mtreg's length
    buckets at ``overhead``, each cut to its longest row."""
    from mtreg.runtime.inference import length_buckets

    lengths = batch["attention_mask"].sum(1).tolist()
    pieces = []
    for rows in length_buckets(lengths, overhead):
        width, index = max(lengths[r] for r in rows), torch.tensor(rows)
        pieces.append({key: value[index, :width] for key, value in batch.items()})
    return pieces


def bucketed(
    candidates: dict[str, Callable[[dict], Any]], data: Sequence[dict]
) -> tuple[dict[str, Callable[[dict], Any]], list[dict]]:
    """Return each of ``candidates`` as a backend named ``NAME_buckets`` that runs a batch
    of ``data`` as its length buckets (split up front, like the tokenisation), and every
    sub-batch, for :func:`achieved`'s padded count."""
    from mtreg.runtime.inference import BUCKET_OVERHEAD

    split = {id(batch): sub_batches(batch, BUCKET_OVERHEAD) for batch in data}

    def over_buckets(fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
        return lambda batch: [fn(piece) for piece in split[id(batch)]]

    runs = {f"{name}{BUCKETED}": over_buckets(fn) for name, fn in candidates.items()}
    return runs, [piece for pieces in split.values() for piece in pieces]


def _padded_flops(bundle: Any, data: Sequence[dict]) -> int:
    return sum(
        bundle_flops(bundle, bundle.tasks, [b["input_ids"].shape[1]] * b["input_ids"].shape[0])
        for b in data
    )


def achieved(
    bundle: Any,
    data: Sequence[dict],
    seconds: dict[str, float],
    peaks: dict,
    pieces: Sequence[dict] = (),
) -> dict:
    """Return the FLOPs of all of ``bundle``'s tasks over the tokenised batches ``data``
    (at actual token lengths, and padded to each batch's longest), and for each backend of
    ``seconds`` (its time over ``data``) its GFLOP/s and percent of its precision's peak.
    A bucketed backend's padded share counts the sub-batches ``pieces`` it ran."""
    actual = sum(
        bundle_flops(bundle, bundle.tasks, b["attention_mask"].sum(1).tolist()) for b in data
    )
    padded = {"": _padded_flops(bundle, data), BUCKETED: _padded_flops(bundle, pieces)}
    out: dict = {"gflop_actual": actual / 1e9, "gflop_padded": padded[""] / 1e9}
    for name, spent in seconds.items():
        peak = peaks[precision(name)]
        ran = padded[BUCKETED if name.endswith(BUCKETED) else ""]
        out[f"{name}_gflops"] = actual / spent / 1e9
        out[f"{name}_peak_pct"] = 100 * actual / spent / 1e9 / peak
        out[f"{name}_padded_peak_pct"] = 100 * ran / spent / 1e9 / peak
    return out


def markdown(backends: dict, peaks: dict) -> list[str]:
    """Return the markdown lines of the limit: the peaks, then each backend's share."""
    lines = [
        "",
        "## The 8-task bundle against this machine's matmul peak",
        "",
        f"Peak measured in this run ({peaks['threads']} threads, best GEMM of 256..2048): "
        f"fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s (torch), int8 "
        f"{peaks['int8']:.1f} GOP/s ({peaks['int8_source']}; {peaks['int8_by']}). FLOPs are "
        "counted from the bundle's shapes (trunk to depth 4 once, 8 one-layer branches, "
        "poolers and heads, attention included) at each sentence's actual token count; "
        "'padded' counts what ran, each batch padded to its longest sentence (a "
        f"`{BUCKETED}` backend: each of its length buckets padded to its own longest, as "
        "`mtreg serve` runs them).",
        "",
        "| batch | backend | precision | GFLOP/s (actual) | % of peak | % of peak (padded) |",
        "|---|---|---|---|---|---|",
    ]
    for size in (32, 1):
        v = backends[f"batch_{size}"]
        names = [*PRECISION, *(n for n in v if n.endswith(BUCKETED + "_gflops"))]
        for name in (n.removesuffix("_gflops") for n in names):
            if f"{name}_gflops" not in v:
                lines.append(f"| {size} | {name} | {precision(name)} | not run | - | - |")
                continue
            lines.append(
                f"| {size} | {name} | {precision(name)} | {v[f'{name}_gflops']:.1f} "
                f"| {v[f'{name}_peak_pct']:.1f}% | {v[f'{name}_padded_peak_pct']:.1f}% |"
            )
    return lines
