"""Quality against serving cost: the table and figure of ``mtreg report`` and bench/quality.py.

A :class:`TaskQuality` holds, for one task, the served branch's geometry (fork depth k, branch
layers l, teacher layers L) and its scores (one value per seed) next to the full
fine-tuning reference, when one is known. :func:`summary` adds the overall numbers: mean
quality ratio, and the layers a merged bundle evaluates per request (the trunk once up to
the deepest fork, plus every branch) against one full model per task.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtreg.core.extras import require
from mtreg.errors import MtregError


@dataclass
class TaskQuality:
    """One task's served quality and geometry, and its full fine-tuning reference.

    ``served``, ``teacher`` and ``full`` hold one score per seed (empty: not known).
    ``noise`` is the standard error of ``served - full`` where one was estimated.
    """

    task: str
    metric: str
    split: str
    fork_depth: int
    branch_layers: int
    teacher_layers: int | None = None
    served: list[float] = field(default_factory=list)
    teacher: list[float] = field(default_factory=list)
    full: list[float] = field(default_factory=list)
    teacher_ratio: float | None = None  # teacher over full on the same split (dev)
    noise: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """Mean served score over mean full fine-tuning score, or None without both."""
        if not self.served or not self.full or mean(self.full) == 0:
            return None
        return mean(self.served) / mean(self.full)

    @property
    def within_noise(self) -> bool | None:
        """Whether |served - full| is within 2 standard errors (None when unknown)."""
        if self.noise is None or self.ratio is None:
            return None
        return abs(mean(self.served) - mean(self.full)) <= 2 * self.noise

    @property
    def serving_layers(self) -> int:
        """Layers one request for this task alone evaluates: k + l."""
        return self.fork_depth + self.branch_layers

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict, with the derived ratio and noise verdict."""
        return {**asdict(self), "ratio": self.ratio, "within_noise": self.within_noise}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskQuality:
        """Rebuild a row from :meth:`to_dict` output (derived fields ignored)."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (NaN for no values)."""
    return statistics.fmean(values) if values else math.nan


def std(values: Sequence[float]) -> float | None:
    """Sample standard deviation, or None for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else None


def fmt(values: Sequence[float], scale: float = 100.0) -> str:
    """Return ``mean ± std (n)`` in percent points, ``mean`` for one value, ``–`` for none."""
    if not values:
        return "–"
    spread = std(values)
    if spread is None:
        return f"{mean(values) * scale:.1f}"
    return f"{mean(values) * scale:.1f} ± {spread * scale:.1f} ({len(values)})"


def summary(rows: Sequence[TaskQuality], num_layers: int) -> dict[str, Any]:
    """Return the overall numbers for ``rows`` served from one bundle on an N-layer trunk.

    ``mean_ratio`` averages the per-task ratios over the tasks that have a reference.
    """
    ratios = [r.ratio for r in rows if r.ratio is not None]
    bundle_layers = max((r.fork_depth for r in rows), default=0) + sum(
        r.branch_layers for r in rows
    )
    full_layers = num_layers * len(rows)
    return {
        "tasks": len(rows),
        "tasks_with_reference": len(ratios),
        "mean_ratio": mean(ratios) if ratios else None,
        "bundle_layers": bundle_layers,
        "full_layers": full_layers,
        "layer_ratio": bundle_layers / full_layers if full_layers else None,
        "num_layers": num_layers,
    }


HEADERS = ("task", "metric (split)", "full FT", "teacher", "served branch", "% of full", "noise")


def cells(r: TaskQuality) -> list[str]:
    """Return the report's cells for task ``r``, in :data:`HEADERS` order."""
    ratio = "–" if r.ratio is None else f"{100 * r.ratio:.1f}%"
    verdict = {True: "within noise", False: "outside noise", None: "–"}[r.within_noise]
    if r.noise is not None:
        verdict += f" (SE {100 * r.noise:.1f})"
    teacher = f"L={r.teacher_layers}: {fmt(r.teacher)}" if r.teacher_layers else fmt(r.teacher)
    return [
        r.task,
        f"{r.metric} ({r.split})",
        fmt(r.full),
        teacher,
        f"k={r.fork_depth}, l={r.branch_layers}: {fmt(r.served)}",
        ratio,
        f"{verdict}{' ' + r.note if r.note else ''}",
    ]


def overall_text(overall: Mapping[str, Any], strong: str = "**") -> str:
    """Return the overall sentence: mean quality ratio and layers per request, its key
    numbers wrapped in ``strong`` (markdown's bold; ``""`` for plain text)."""
    mean_ratio = overall.get("mean_ratio")
    shown = "–" if mean_ratio is None else f"{100 * mean_ratio:.1f}%"
    return (
        f"Mean quality ratio: {strong}{shown}{strong} of full fine-tuning over "
        f"{overall['tasks_with_reference']} of {overall['tasks']} tasks. Layers per request "
        f"for all tasks: bundle {strong}{overall['bundle_layers']}{strong} against "
        f"{overall['full_layers']} for one {overall['num_layers']}-layer model per task "
        f"({strong}{100 * (overall['layer_ratio'] or 0):.0f}%{strong})."
    )


def markdown(rows: Sequence[TaskQuality], overall: Mapping[str, Any]) -> str:
    """Return the per-task table and the overall line as markdown."""
    lines = [
        "| " + " | ".join(HEADERS) + " |",
        "|---|---|---:|---:|---:|---:|---|",
        *("| " + " | ".join(cells(r)) + " |" for r in rows),
        "",
        overall_text(overall),
    ]
    return "\n".join(lines) + "\n"


def figure(
    rows: Sequence[TaskQuality],
    overall: Mapping[str, Any],
    path: Path,
    title: str = "",
    others: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> Path:
    """Draw quality ratio against serving cost and save it as a PNG at ``path``.

    Left: per task, % of full fine-tuning against the layers one request for that task
    evaluates (k + l for the served branch, k + L for its teacher; a full model is N).
    Right: all tasks, mean ratio against the layers of the bundle, of ``others`` (label
    and :func:`summary` of other bundles of the same tasks, e.g. other onboarding
    settings) and of one full model per task.

    Returns:
        ``path``.

    Raises:
        MtregError: matplotlib is missing (``pip install 'mtreg[report]'``).
    """
    # The headless backend, chosen before pyplot loads: reports are drawn on servers too.
    require("matplotlib").use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    _draw_tasks(left, rows, overall["num_layers"])
    _draw_bundles(right, overall, others)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_tasks(axes: Any, rows: Sequence[TaskQuality], n: int) -> None:
    """Plot each task's served branch and teacher against full fine-tuning of ``n`` layers."""
    axes.scatter([n], [100], marker="*", s=200, color="black", label="full fine-tuning", zorder=3)
    for r in rows:
        if r.ratio is None:
            continue
        ratio = 100 * r.ratio
        (point,) = axes.plot([r.serving_layers], [ratio], "o", label=r.task)
        axes.annotate(r.task, (r.serving_layers, ratio), textcoords="offset points", xytext=(4, 4))
        if r.teacher_ratio is not None and r.teacher_layers:
            teacher = 100 * r.teacher_ratio
            x = r.fork_depth + r.teacher_layers
            axes.plot([x], [teacher], "^", color=point.get_color(), alpha=0.5)
            axes.plot([r.serving_layers, x], [ratio, teacher], ":", color=point.get_color())
    axes.axhline(100, color="grey", linewidth=0.5)
    axes.set_xlabel(f"layers per request for the task alone (k + l; full model = {n})")
    axes.set_ylabel("% of full fine-tuning (mean over seeds)")
    axes.set_title("per task: served branch (o), teacher (^)")
    axes.set_xlim(0, n + 1)
    axes.legend(fontsize=7, loc="best")


def _draw_bundles(
    axes: Any, overall: Mapping[str, Any], others: Sequence[tuple[str, Mapping[str, Any]]]
) -> None:
    """Plot the mean ratio of the merged bundle and of ``others`` against their layers per
    request, beside one full model per task."""
    if overall.get("mean_ratio") is not None:
        axes.plot([overall["full_layers"]], [100], "s", color="black", markersize=10)
        axes.annotate(
            "one full model per task",
            (overall["full_layers"], 100),
            textcoords="offset points",
            xytext=(-60, 8),
        )
        bundles = [("merged bundle", overall), *others]
        for label, summed in bundles:
            if summed.get("mean_ratio") is None:
                continue
            point = (summed["bundle_layers"], 100 * summed["mean_ratio"])
            axes.plot(*point, "o", markersize=10)
            axes.annotate(label, point, textcoords="offset points", xytext=(6, -12))
    axes.set_xlim(0, overall["full_layers"] * 1.1 + 1)
    axes.set_xlabel(f"layers per request, all {overall['tasks']} tasks")
    axes.set_ylabel("mean % of full fine-tuning")
    axes.set_title("all tasks")


# -- from a registry ------------------------------------------------------------------------


def load_baseline(path: Path) -> dict[str, dict[str, Any]]:
    """Read full fine-tuning references: ``{"baseline": {task: {"metric", "split",
    "full": [scores]}}}`` (bench/quality.json has this section) or that mapping alone.

    Raises:
        MtregError: the file is missing or not of that shape.
    """
    try:
        data = json.loads(Path(path).read_text())
        table = data.get("baseline", data)
        for task, entry in table.items():
            if not isinstance(entry.get("full"), list) or "metric" not in entry:
                raise ValueError(f"task {task!r} lacks 'metric' or a 'full' list")
    except (OSError, ValueError, AttributeError) as exc:
        raise MtregError(f"cannot read full fine-tuning references from {path}: {exc}") from None
    return table


def rows_from_registry(
    registry: Any, tasks: Iterable[str] | None, baseline: Mapping[str, Mapping[str, Any]]
) -> tuple[list[TaskQuality], int]:
    """Return a row per active task (all, or ``tasks``) from the registry's records: the
    dev metrics and geometry its branch file recorded, and the baseline's reference when
    it has one for the same metric; plus the trunk's layer count.

    Raises:
        NotFound: an unknown task. MtregError: a removed task, or tasks on several trunks.
    """
    records = {t.name: t for t in registry.tasks()}
    names = sorted(records) if tasks is None else list(dict.fromkeys(tasks))
    rows, trunks = [], set()
    for name in names:
        record = registry.task(name)
        if record.active_version is None:
            raise MtregError(f"task {name!r} is removed: nothing to report")
        version = next(v for v in registry.versions(name) if v.version == record.active_version)
        trunks.add(version.trunk)
        training = version.training or {}
        metric = (version.metric_names or list(version.metrics) or ["?"])[0]
        reference = baseline.get(name, {})
        same = reference.get("metric") == metric and reference.get("split", "dev") == "dev"
        teacher = training.get("teacher_dev_metrics", {}).get(metric)
        full = list(reference.get("full", [])) if same else []
        rows.append(
            TaskQuality(
                task=name,
                metric=metric,
                split="dev",
                fork_depth=version.fork_depth,
                branch_layers=version.num_layers,
                teacher_layers=training.get("teacher_layers"),
                served=[version.metrics[metric]] if metric in version.metrics else [],
                teacher=[teacher] if teacher is not None else [],
                full=full,
                teacher_ratio=teacher / mean(full) if teacher is not None and full else None,
                note="" if same or not reference else "(baseline metric or split differs)",
            )
        )
    if len(trunks) > 1:
        raise MtregError(f"tasks on several trunks ({', '.join(sorted(trunks))}): report each")
    layers = registry.trunk(trunks.pop()).config["num_hidden_layers"] if trunks else 0
    return rows, layers
