"""The model card: a bundle's (or an exported task's) ``README.md``, as the Hugging Face
Hub reads it: huggingface_hub's :class:`~huggingface_hub.ModelCard` with YAML metadata
(license, datasets, metrics, an evaluation table per task) over a Markdown body
saying what it serves and what it costs."""

from __future__ import annotations

from typing import Any

from mtreg.artifacts.manifest import Manifest
from mtreg.core.extras import require

# mtreg does not know a trunk's licence: "other" until the card is edited, as the Hub asks.
LICENSE = "other"
_PIPELINES = {"tagging": "token-classification"}


def model_card(manifest: Manifest, task: str | None = None) -> str:
    """Return the model card of the bundle ``manifest`` describes, or, with ``task``, of
    that task exported alone as a transformers classifier."""
    # huggingface_hub is imported only when a card is written, never by `mtreg list`.
    require("huggingface_hub")
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard_data import EvalResult

    names = [task] if task else list(manifest.tasks)
    tasks = {name: manifest.tasks[name] for name in names}
    results = [
        EvalResult(
            task_type=_PIPELINES.get(entry.head.kind, "text-classification"),
            dataset_type=name,
            dataset_name=name,
            metric_type=metric,
            metric_value=value,
        )
        for name, entry in tasks.items()
        for metric, value in sorted(entry.metrics.items())
        if isinstance(value, int | float)
    ]
    data = ModelCardData(
        language=None,
        license=LICENSE,
        library_name="transformers" if task else "mtreg",
        tags=["mtreg", "multi-task", str(manifest.trunk.config["model_type"])],
        datasets=names,
        metrics=sorted({m for entry in tasks.values() for m in entry.metrics}),
        pipeline_tag=_PIPELINES.get(tasks[names[0]].head.kind, "text-classification")
        if task
        else None,
        model_name=task or f"mtreg-{manifest.trunk.name}",
        # The trunk's Hub id when it is known (``TrunkConfig.base_model``); else none.
        base_model=manifest.trunk.config.get("base_model"),
        eval_results=results or None,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(manifest, tasks, task)}"))


def _body(manifest: Manifest, tasks: dict[str, Any], task: str | None) -> str:
    trunk, cost = manifest.trunk, manifest.cost
    title = f"`{task}` on trunk `{trunk.name}`" if task else f"mtreg bundle on trunk `{trunk.name}`"
    lines = [
        f"# {title}",
        "",
        f"Trunk: {trunk.config['model_type']}, {trunk.depth} shared layers kept "
        f"(of {trunk.num_layers}), hidden size {trunk.config['hidden_size']}.",
        "",
        "## Evaluation",
        "",
        "| task | version | head | fork depth | branch layers | metrics |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in tasks.items():
        metrics = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in sorted(entry.metrics.items())
        )
        lines.append(
            f"| {name} | {entry.version} | {entry.head.kind} "
            f"({len(entry.head.labels)} labels) | {entry.fork_depth} "
            f"| {entry.num_layers} | {metrics or '-'} |"
        )
    if task is None:
        bundle, separate = cost.bundle_layers, cost.one_model_per_task_layers
        share = f" ({bundle / separate:.0%})" if separate else ""
        lines += [
            "",
            f"Layer cost per input: {bundle} transformer layers for all {len(tasks)} tasks, "
            f"against {separate} for one full model per task{share}.",
        ]
    lines += ["", "Metrics are dev scores recorded when each task was onboarded.", ""]
    return "\n".join(lines)
