"""Length buckets measured (used by bench/serving.py): the 8-task bundle at batch 32, each
batch of SST-2 sentences (in their order) padded to its longest against run in sub-batches
of similar length (``mtreg.runtime.inference.length_buckets``), at a few per-sub-batch
overheads, ``BUCKET_OVERHEAD`` (the default) among them. Tokenisation is done up front and
excluded, as everywhere in bench/serving.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

PLAIN = "padded_to_batch_longest"


def bucketing(bundle_dir: Path, texts: list[str], repeats: int, interleaved: Callable) -> dict:
    """Return seconds and speed-up over ``PLAIN`` per setting; ``interleaved`` is the
    timing loop of bench/serving.py (median of interleaved repeats)."""
    from mtreg.runtime.bundle import load_bundle
    from mtreg.runtime.inference import BUCKET_OVERHEAD, Row, encode_rows, length_buckets

    bundle = load_bundle(bundle_dir, backend="torch")
    rows = [Row(text, tuple(bundle.tasks)) for text in texts]
    chunks = [rows[i : i + 32] for i in range(0, len(rows), 32)]
    plain = [(chunk, encode_rows(bundle, chunk, buckets=False)) for chunk in chunks]

    def split(group: Any, overhead: int) -> Any:
        lengths = group.encoded["batch"]["attention_mask"].sum(1).tolist()
        return replace(group, buckets=length_buckets(lengths, overhead))

    def with_overhead(overhead: int) -> list[tuple[Any, Any]]:
        return [(chunk, [split(g, overhead) for g in groups]) for chunk, groups in plain]

    prepared = {PLAIN: plain}
    for overhead in sorted({0, 16, BUCKET_OVERHEAD, 256}):
        prepared[f"buckets_overhead_{overhead}"] = with_overhead(overhead)

    def runner(name: str) -> Callable[[int], Any]:
        # Called with a chunk's index: each setting runs its own tokenised chunks.
        return lambda at: bundle.run(prepared[name][at][0], encoded=prepared[name][at][1])

    seconds = interleaved({name: runner(name) for name in prepared}, range(len(chunks)), repeats)
    out = {
        "default_overhead": BUCKET_OVERHEAD,
        "seconds": seconds,
        "speedup": {name: seconds[PLAIN] / value for name, value in seconds.items()},
    }
    print(f"bucketing, batch 32: {out}", flush=True)
    return out


def markdown(result: dict, sentences: int) -> list[str]:
    """Return the markdown lines of the bucketing table."""
    lines = [
        "",
        "## Length buckets: the 8-task bundle at batch 32, torch fp32",
        "",
        f"{sentences} SST-2 dev sentences in their order, 32 per batch. The default "
        f"overhead is {result['default_overhead']} tokens per sub-batch.",
        "",
        "| setting | s | speed-up |",
        "|---|---|---|",
    ]
    for name, seconds in result["seconds"].items():
        lines.append(f"| {name} | {seconds:.3f} | {result['speedup'][name]:.2f}x |")
    return lines
