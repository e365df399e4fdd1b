"""The serving cost of a bundle against one full fine-tuned model per task: throughput
on the same tokenised sentences (interleaved repeats), layers and parameters, the peak RSS of
a fresh process holding each side; and the table that shows it."""

from __future__ import annotations

import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchtasks  # noqa: E402  (bench/ is not a package)

TIMING_SENTENCES, TIMING_BATCH, TIMING_REPEATS = 256, 32, 3


def timing_batches(tokenizer: Any) -> list[dict[str, Any]]:
    """Return the timing inputs: SST-2 dev sentences, tokenised once, in batches."""
    path = benchtasks.DATA_DIR / "glue" / "SST-2" / "dev.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines][:TIMING_SENTENCES]
    return [
        dict(
            tokenizer(
                texts[i : i + TIMING_BATCH],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), TIMING_BATCH)
    ]


def bundle_heads(bundle_dir: Path) -> list[Any]:
    """Return the head of every task of a bundle, read from its manifest alone."""
    from mtreg.artifacts.manifest import MANIFEST, read_manifest

    manifest = read_manifest(Path(bundle_dir) / MANIFEST)
    return [task.head for task in manifest.tasks.values()]


def full_models(heads: Sequence[Any]) -> list[Any]:
    """Return one full fine-tuning-shaped model per head (embeddings, all trunk layers,
    pooler, the head) with the trunk's weights."""
    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.nn.layers import Branch
    from mtreg.nn.network import Standalone, Trunk

    checkpoint = read_checkpoint(benchtasks.minilm_folder())
    config = checkpoint.config
    models = []
    for head in heads:
        trunk = Trunk.from_tensors(config, checkpoint.embeddings, [])
        branch = Branch(config, config.num_hidden_layers, head)
        for layer, tensors in zip(branch.layers, checkpoint.layers, strict=True):
            layer.load_state_dict(tensors)
        models.append(Standalone(trunk, 0, branch).eval())
    return models


def _seconds(fn: Callable[[dict], Any], batches: list[dict]) -> float:
    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            fn(batch)
    return time.perf_counter() - started


def measure_serving(bundle_dir: Path) -> dict[str, Any]:
    """Time the bundle against N full models on the same inputs; count layers and
    parameters; measure each side's peak RSS in a fresh process."""
    import torch

    import mtreg

    bundle = mtreg.load_bundle(bundle_dir)
    models = full_models(bundle_heads(bundle_dir))
    batches = timing_batches(bundle.tokenizer)

    def run_bundle(b: dict) -> None:
        bundle.model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))

    def run_full(b: dict) -> None:
        for model in models:
            model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))

    _seconds(run_bundle, batches[:1]), _seconds(run_full, batches[:1])  # warm-up
    times: dict[str, list[float]] = {"bundle": [], "full": []}
    for _ in range(TIMING_REPEATS):  # interleaved: drift in the machine's load hits both
        times["bundle"].append(_seconds(run_bundle, batches))
        times["full"].append(_seconds(run_full, batches))
    bundle_s, full_s = statistics.median(times["bundle"]), statistics.median(times["full"])
    sentences = sum(int(b["input_ids"].shape[0]) for b in batches)
    depth = max(info.fork_depth for info in bundle.info.values())
    branch_layers = sum(info.num_layers for info in bundle.info.values())
    n_layers = bundle.config.num_hidden_layers
    memory = {kind: peak_rss(kind, bundle_dir) for kind in ("baseline", "bundle", "full")}
    return {
        "tasks": bundle.tasks,
        "sentences": sentences,
        "batch_size": TIMING_BATCH,
        "threads": torch.get_num_threads(),
        "bundle_sentences_per_s": sentences / bundle_s,
        "full_sentences_per_s": sentences / full_s,
        "throughput_ratio": full_s / bundle_s,
        "times_s": times,
        "bundle_layers": depth + branch_layers,
        "full_layers": n_layers * len(models),
        "bundle_parameters": sum(p.numel() for p in bundle.model.parameters()),
        "full_parameters": sum(p.numel() for m in models for p in m.parameters()),
        "peak_rss_mib": memory,
    }


def _rss_child(kind: str, bundle_dir: str, queue: Any) -> None:
    import torch

    import mtreg

    ids = torch.randint(1000, 2000, (8, 32))
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    with torch.inference_mode():
        if kind != "baseline":
            if kind == "bundle":
                models = [mtreg.load_bundle(bundle_dir).model]
            else:  # the full models stand alone: the bundle is never loaded
                models = full_models(bundle_heads(Path(bundle_dir)))
            for model in models:
                model(ids, mask, types)
    queue.put(peak_mib())


def peak_mib() -> float:
    """This process's peak resident set in MiB (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def peak_rss(kind: str, bundle_dir: Path) -> float:
    """Peak RSS (MiB) of a fresh process importing mtreg (``baseline``) and holding the
    bundle or the N full models, after one forward pass."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_rss_child, args=(kind, str(bundle_dir), queue))
    process.start()
    value = queue.get()
    process.join()
    return value


def without_times(serving: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return a serving record without its raw timings (None for None)."""
    return {k: v for k, v in serving.items() if k != "times_s"} if serving else None


def serving_table(serving: dict[str, Any]) -> list[str]:
    """Return the lines of the serving-cost table of a serving record (and a blank)."""
    m = serving["peak_rss_mib"]
    threads = f", {serving['threads']} threads" if "threads" in serving else ""
    return [
        "| | bundle | one full model per task | ratio |",
        "|---|---:|---:|---:|",
        f"| layers per request | {serving['bundle_layers']} | {serving['full_layers']} "
        f"| {serving['bundle_layers'] / serving['full_layers']:.2f} |",
        f"| sentences/s (all {len(serving['tasks'])} tasks, batch {serving['batch_size']}"
        f"{threads}) | {serving['bundle_sentences_per_s']:.1f} "
        f"| {serving['full_sentences_per_s']:.1f} | {serving['throughput_ratio']:.2f}× faster |",
        f"| parameters | {serving['bundle_parameters'] / 1e6:.1f} M "
        f"| {serving['full_parameters'] / 1e6:.1f} M "
        f"| {serving['bundle_parameters'] / serving['full_parameters']:.2f} |",
        f"| peak RSS (MiB; import alone {m['baseline']:.0f}) | {m['bundle']:.0f} "
        f"| {m['full']:.0f} | {m['bundle'] / m['full']:.2f} |",
        "",
    ]
