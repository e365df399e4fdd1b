"""bench/serve_load.py's interleaved repeats (bench/repeats.py): the rotated order, ratios
taken repeat by repeat, and the report's summary and table. The load itself (servers,
MiniLM, the gate) is the benchmark's to run; these are its pure parts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import repeats
import serve_load


def test_each_repeat_rotates_the_order_so_no_setting_is_always_first() -> None:
    orders = [order for _, order in repeats.rotations(["a", "b", "c"], 4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert [r for r, _ in repeats.rotations(["a"], 2)] == [0, 1]


def test_ratios_are_taken_per_repeat_then_summarised() -> None:
    # Drift doubles both settings in repeat 2: per repeat the ratio stays 2.
    spread = repeats.ratios([20.0, 40.0, 21.0], [10.0, 20.0, 10.0])
    assert spread == repeats.Spread(2.0, 2.0, 2.1)
    assert spread.ratio_text() == "2.00x (2.00-2.10)"
    assert repeats.ratios([5.0, None], [0.0, 3.0]) is None
    assert repeats.Spread.of([]) is None
    assert repeats.Spread.of([1.5]).ratio_text() == "1.50x"


def _run(throughput: float, p99: float, errors: dict[str, int] | None = None) -> dict:
    return {
        "sentences": 10,
        "seconds": 1.0,
        "throughput_per_s": throughput,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "errors": errors or {},
    }


def test_summary_and_table_give_medians_and_per_repeat_ratios() -> None:
    runs = {
        "d_before_fp32": [_run(10, 100), _run(20, 90), _run(10, 110)],
        "e_fp32_new": [_run(12, 80), _run(22, 85), _run(13, 95)],
        "f_gated_fastest": [_run(30, 50, {"503": 1}), _run(40, 40), _run(20, 60)],
    }
    summary = serve_load.summarise(runs)
    f = summary["f_gated_fastest"]
    assert f["throughput_per_s"] == {"median": 30, "low": 20, "high": 40}
    assert f["p99_ms"]["median"] == 50 and f["sentences"] == 30 and f["errors"] == {"503": 1}
    assert f["vs_d"] == {"median": 2.0, "low": 2.0, "high": 3.0}
    assert f["vs_e"]["median"] == pytest.approx(40 / 22)  # 30/12, 40/22, 20/13
    assert "vs_c" not in f and "vs_d" not in summary["d_before_fp32"]
    report = {
        "concurrency": 4,
        "cpus": 2,
        "repeats": 3,
        "load_average_start": [1, 1, 1],
        "load_average": [2, 2, 2],
        "command": "python bench/serve_load.py",
        "gate": None,
        "summary": {"all_tasks": summary},
        "workloads": {"all_tasks": runs},
    }
    table = serve_load.markdown(report)
    assert "| setting | sentences | sentences/s | vs d | vs e | p50 ms | p99 ms |" in table
    assert "| f_gated_fastest | 30 | 30.0 (20.0-40.0) | 2.00x (2.00-3.00) |" in table


def test_the_report_says_which_gate_f_served_and_that_its_metric_is_meaningless() -> None:
    def backend(seconds: float, eligible: int) -> dict:
        tasks = {t: {"eligible": i < eligible} for i, t in enumerate(serve_load.TASKS)}
        return {"reason": None, "seconds": {"1": seconds, "32": seconds * 10}, "tasks": tasks}

    gate = {
        "backends": {"torch": backend(0.02, 8), "onnx-int8": backend(0.005, 7)},
        "choice": {"1": "onnx-int8", "32": "torch"},
    }
    report = {
        "gate": {"gate": gate, "cached": True, "gate_s": 61.0, "load_average": [0.5, 1, 1]},
        "gate_cache": "/cache/home",
        "gate_dev": 300,
    }
    (line, caveat, _) = serve_load.gate_lines(report)
    assert "taken from the cache; it took 61 s at load [0.5, 1, 1]" in line
    assert "batch 1: onnx-int8 (4.00x fp32" in line and "batch 32: torch (1.00x" in line
    assert "onnx-int8 7/8" in line
    assert "meaningless" in caveat and "agreement with fp32 is real" in caveat


def test_batching_is_read_from_the_server_s_own_metrics() -> None:
    import servestats

    from mtreg.serving.metrics import ServeMetrics

    metrics = ServeMetrics()
    metrics.batch_size.observe(8)
    before = servestats.parse(metrics.render().decode())
    for size, wait in ((12, 0.05), (14, 0.15)):  # two batches during the measurement
        metrics.batch_size.observe(size)
        metrics.queue_wait.observe(wait)
    after = servestats.parse(metrics.render().decode())
    assert servestats.batching(before, after) == {"inputs_per_batch": 13.0, "queue_wait_ms": 100.0}
    assert servestats.batching(after, after) == {"inputs_per_batch": None, "queue_wait_ms": None}


def test_fewer_than_one_repeat_is_refused_by_the_parser() -> None:
    import argparse

    import fleet

    with pytest.raises(argparse.ArgumentTypeError, match="at least 1, got 0"):
        repeats.count("0")  # serve_load's --repeats type too
    parser = fleet.parser()
    with pytest.raises(SystemExit) as refused:
        parser.parse_args(["--repeats", "0"])
    assert refused.value.code == 2
    assert parser.parse_args(["--repeats", "2"]).repeats == 2
