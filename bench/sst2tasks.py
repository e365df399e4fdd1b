"""The 8-task MiniLM bundle of the serving benchmarks, with SST-2 dev and train splits, and
its quality gate computed once and cached (bench/gate.py, bench/serve_load.py).

The geometry is bench/serving.py's: the packaged MiniLM as trunk ``minilm``, 8 tasks
forking at depth 4 with one layer each, random branch weights (seeded). Each task reads
SST-2 through a path plugin: its dev split is the first ``dev`` sentences of SST-2 dev
(gold labels), its train split the first 64 of SST-2 train (the static quantisation
calibrates on 32 of them). Random branches make the task metric (accuracy) near chance for
every backend; the agreement with fp32 is real, and harder to keep than a trained head's
(random logits sit closer to ties).

:func:`build` makes the registry in a work folder and returns the environment of
``mtreg`` commands on it; :func:`gated` does that and runs ``mtreg bundle gate`` once per
cache key (the settings, the gate format and the library versions), so a second benchmark
run serves the same gated bundle without gating again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchtasks import DATA_DIR, minilm_folder

SST2 = DATA_DIR / "glue" / "SST-2"
TASKS = tuple(f"task{i}" for i in range(8))
DEPTH, LAYERS = 4, 1
LABELS = ("negative", "positive")
TRAIN = 64
# Marks a cache entry complete: written last, after the gate.
DONE = "done.json"

PLUGIN = """
from pathlib import Path

import mtreg

SST2 = Path({sst2!r})
SIZES = {{"dev": {dev}, "train": {train}}}


def load(split):
    lines = (SST2 / f"{{split}}.tsv").read_text(encoding="utf-8").splitlines()[1:]
    for line in lines[: SIZES[split]]:
        text, label = line.rsplit("\\t", 1)
        yield {{"text": text.strip(), "label": {labels!r}[int(label)]}}


@mtreg.hookimpl
def register_tasks(register):
    for name, weights in {weights!r}.items():
        register(mtreg.TaskSpec(name=name, version="1.0.0", trunk="minilm", weights=weights,
            head=mtreg.HeadSpec("classification", {labels!r}),
            load_dataset=load, metrics=("accuracy",), max_length=128))
"""


@dataclass(frozen=True)
class Bench:
    """A benchmark registry: the ``env`` of ``mtreg`` commands on it (its home, database
    and plugin) and the directory of its ``bundle`` (every task, latest)."""

    env: dict[str, str]
    bundle: Path


def environment(work: Path) -> dict[str, str]:
    """Return this process's environment pointed at the registry in ``work``."""
    return {
        **os.environ,
        "MTREG_HOME": str(work / "home"),
        "MTREG_DATABASE_URL": f"sqlite:///{work / 'registry.db'}",
        "MTREG_PLUGINS_PATH": str(work / "plugins"),
        "MTREG_LOAD_PLUGINS": "sst2_tasks",
    }


def build(work: Path, dev: int) -> Bench:
    """Register MiniLM and the 8 random tasks (dev split: the first ``dev`` SST-2 dev
    sentences) in a new registry in ``work``; return it."""
    import torch

    from mtreg.artifacts.branch_file import BranchMeta, branch_shapes, write_branch
    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.core.spec import HeadSpec
    from mtreg.registry.api import Registry

    checkpoint = read_checkpoint(minilm_folder())
    head = HeadSpec("classification", LABELS)
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name in TASKS:
        tensors = {
            key: torch.randn(shape, generator=generator) * 0.02
            for key, shape in branch_shapes(checkpoint.config, LAYERS, head).items()
        }
        meta = BranchMeta(
            name, "1.0.0", DEPTH, LAYERS, head, 128, checkpoint.fingerprint.prefix(DEPTH)
        )
        weights[name] = str(write_branch(work / f"{name}.safetensors", tensors, meta))
    plugins = work / "plugins"
    plugins.mkdir(parents=True)
    text = PLUGIN.format(sst2=str(SST2), dev=dev, train=TRAIN, labels=LABELS, weights=weights)
    (plugins / "sst2_tasks.py").write_text(text)
    env = environment(work)
    with Registry(env["MTREG_DATABASE_URL"], work / "home", [plugins]) as registry:
        registry.add_trunk("minilm", minilm_folder())
        registry.register(list(weights))
        bundle = registry.bundle_path("latest")
    return Bench(env, bundle)


def gate(bench: Bench) -> dict:
    """Run ``mtreg bundle gate latest --json`` on ``bench``'s registry, as a user does;
    return its JSON (the gate and the ``choice`` per batch size).

    Raises:
        SystemExit: the command failed (its last line).
    """
    done = subprocess.run(
        [sys.executable, "-m", "mtreg", "bundle", "gate", "latest", "--json"],
        env=bench.env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        sys.exit(f"mtreg bundle gate failed: {lines[-1]}")
    return json.loads(done.stdout)


def cache_key(dev: int) -> str:
    """Return the cache key of a gated bench registry: what its bundle and gate depend on."""
    import onnxruntime
    import torch

    from mtreg.artifacts.gate_file import FORMAT_VERSION, TOLERANCE

    settings = {
        "dev": dev,
        "train": TRAIN,
        "tasks": TASKS,
        "depth": DEPTH,
        "layers": LAYERS,
        "gate_format": FORMAT_VERSION,
        "tolerance": [TOLERANCE.metric_drop, TOLERANCE.agreement],
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "plugin": PLUGIN,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def gated(cache: Path, dev: int) -> tuple[Bench, dict]:
    """Return the bench registry gated on ``dev`` sentences, built and gated into
    ``cache`` once per :func:`cache_key`, and its record: the gate's JSON (``gate``), the
    seconds it took and the load average before it (``gate_s``, ``load_average``), and
    whether this call found it in the cache (``cached``). The gate's timings decide the
    default backend, so gate on a quiet machine (or delete the cache entry to regate)."""
    import time

    work = cache / f"sst2-gated-{cache_key(dev)}"
    if (work / DONE).is_file():
        record = json.loads((work / DONE).read_text())
        return Bench(environment(work), Path(record["bundle"])), {**record, "cached": True}
    shutil.rmtree(work, ignore_errors=True)  # a run stopped half-way is redone whole
    work.mkdir(parents=True)
    bench = build(work, dev)
    load = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    result = gate(bench)
    took = time.perf_counter() - started
    record = {"bundle": str(bench.bundle), "gate": result, "gate_s": took, "load_average": load}
    (work / DONE).write_text(json.dumps(record) + "\n")
    return bench, {**record, "cached": False}
