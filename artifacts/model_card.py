"""The model card: a bundle's ``README.md``, saying what it serves and what it costs."""

from __future__ import annotations

from mtreg.artifacts.manifest import Manifest


def model_card(manifest: Manifest) -> str:
    """Return the Markdown model card of the bundle ``manifest`` describes."""
    trunk, tasks, cost = manifest.trunk, manifest.tasks, manifest.cost
    lines = [
        f"# mtreg bundle on trunk `{trunk.name}`",
        "",
        f"Trunk: {trunk.config['model_type']}, {trunk.depth} shared layers kept "
        f"(of {trunk.num_layers}), hidden size {trunk.config['hidden_size']}.",
        "",
        "| task | version | head | fork depth | branch layers | metrics |",
        "|---|---|---|---|---|---|",
    ]
    for name, task in tasks.items():
        metrics = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in sorted(task.metrics.items())
        )
        lines.append(
            f"| {name} | {task.version} | {task.head.kind} "
            f"({len(task.head.labels)} labels) | {task.fork_depth} "
            f"| {task.num_layers} | {metrics or '-'} |"
        )
    bundle, separate = cost.bundle_layers, cost.one_model_per_task_layers
    share = f" ({bundle / separate:.0%})" if separate else ""
    lines += [
        "",
        f"Layer cost per input: {bundle} transformer layers for all {len(tasks)} tasks, "
        f"against {separate} for one full model per task{share}.",
        "",
    ]
    return "\n".join(lines)
