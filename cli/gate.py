"""``mtreg bundle gate [REF]``: score every reduced-precision backend of a bundle on each
task's dev split against torch fp32, time them, and store the gate the default backend
(``fastest``) is chosen from. torch and onnxruntime are imported inside the command."""

from __future__ import annotations

import itertools
from dataclasses import asdict
from typing import Any

import click

from mtreg.artifacts.home import Home
from mtreg.cli.context import Context, pass_context
from mtreg.cli.output import echo_json, echo_table, json_option
from mtreg.errors import MtregError


def _task_data(ctx: Context, manifest: Any, calibration: int) -> dict[str, Any]:
    """Return task -> TaskData for every task of ``manifest``: its plugin's dev split and
    the first ``calibration`` examples of its train split.

    Raises:
        NotFound: no plugin offers a task. MtregError: a task without a dataset loader, or
            a split that fails to load or holds a malformed example.
    """
    from mtreg import heads
    from mtreg.runtime.gate import TaskData
    from mtreg.training.data import check_example
    from mtreg.training.job import load_split

    discovery = ctx.registry.discover()
    data = {}
    for name, entry in sorted(manifest.tasks.items()):
        spec = discovery.task(name).spec
        if spec.load_dataset is None:
            raise MtregError(
                f"task {name!r} has no dataset loader: the gate scores each task on its dev "
                "split, so its plugin must pass TaskSpec(load_dataset=...)"
            )
        if spec.version != entry.version:
            click.echo(
                f"task {name!r}: the bundle holds version {entry.version}, scored on the dev "
                f"split of the installed plugin's version {spec.version}",
                err=True,
            )
        try:
            train = itertools.islice(spec.load_dataset("train"), calibration)
            examples = [check_example(e, spec.inputs, spec.head) for e in train]
        except Exception as exc:  # plugin code: whatever it raises is one line
            raise MtregError(
                f"task {name!r}, train split: {type(exc).__name__}: {exc}; fix the plugin's "
                "load_dataset"
            ) from None
        metrics = tuple(spec.metrics or heads.get(spec.head.kind).default_metrics)
        data[name] = TaskData(metrics, load_split(spec, "dev"), examples)
    return data


def _rows(gate: Any) -> list[list[Any]]:
    base = gate.backends["torch"].seconds
    rows = []
    for name, backend in gate.backends.items():
        if backend.reason is not None:
            rows.append([name, "-", "-", "-", "-", "-", "no", "-", "-", backend.reason])
            continue
        speed = [f"{base[size] / backend.seconds[size]:.2f}x" for size in (1, 32)]
        for task, s in backend.tasks.items():
            scores = [f"{s.agreement:.4f}", f"{s.metric_name} {s.metric:.4f}"]
            scores += [f"{s.reference:.4f}", f"{s.drop:+.4f}", "yes" if s.eligible else "no"]
            rows.append([name, task, *scores, *speed, ""])
    return rows


@click.command("gate")
@click.argument("ref", default="latest")
@json_option
@pass_context
def gate(ctx: Context, ref: str, as_json: bool) -> None:
    """Score each backend (torch bf16, ONNX fp32 fused, int8 dynamic and static, per
    tensor and per channel) on every task's dev split against torch fp32, time each at
    batch 1 and 32, and store the result in the bundle's ONNX cache. A backend is eligible
    for a task within the gate's tolerance; predict, load_bundle and serve then use the
    fastest eligible one by default."""
    from mtreg.artifacts.manifest import read_bundle_manifest
    from mtreg.cli.inference import resolve_bundle
    from mtreg.runtime.backends import Choice, choose
    from mtreg.runtime.gate import CALIBRATION, compute_gate
    from mtreg.training.metrics import evaluate

    path, ident = resolve_bundle(ctx, ref)
    manifest, bundle_id = read_bundle_manifest(path, ident)
    data = _task_data(ctx, manifest, CALIBRATION)
    click.echo(f"computing the quality gate of bundle {bundle_id[:12]}...", err=True)
    result = compute_gate(path, bundle_id, data, evaluate, Home.resolve(ctx.home))
    choice = choose(result, sorted(manifest.tasks), tuple(result.backends))
    base = result.backends["torch"].seconds
    speedup = {size: base[size] / result.backends[n].seconds[size] for size, n in choice.items()}
    if as_json:
        echo_json({**asdict(result), "choice": {str(k): v for k, v in choice.items()}})
        return
    headers = ["BACKEND", "TASK", "AGREEMENT", "METRIC", "FP32", "DROP", "ELIGIBLE"]
    echo_table(_rows(result), [*headers, "B1", "B32", "WHY NOT"], "no backends")
    tolerance = result.tolerance
    click.echo(
        f"tolerance: agreement >= {tolerance.agreement:.2%}, metric drop <= "
        f"{tolerance.metric_drop:.4f}; default {Choice(choice, speedup).line()}"
    )
