"""What verifying before trusting costs: hashing a bundle's files at load, against the load
itself, and what copying objects into each bundle (instead of hard-linking them) would cost.

On the packaged MiniLM with 8 random-weight tasks forking at depth 4 (the ``depth4_l1``
bundle of bench/serving.py), in one run:

* ``load_bundle`` of every task (which hashes every file it reads, the manifest included),
  and the sha256 of those same files alone: the share of a load spent verifying;
* materialising the bundle's files by hard link (what a rebuild does) against by copy
  (what a bundle that shares no inode with the object store would need), and the bytes a
  copied bundle adds to the disk.

Files are in the page cache (the bundle was just written), as on a server's warm start;
repeats are interleaved and the median kept.

    python bench/integrity.py [--repeats 5] [--threads 2]

writes bench/results/integrity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mtreg.artifacts.manifest import read_manifest
from mtreg.artifacts.objects import sha256_file
from mtreg.runtime.bundle import LoadedBundle
from serving import build_bundles

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def timed(fn: Callable[[], object]) -> float:
    """Return the seconds ``fn()`` took."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def materialise(bundle: Path, files: list[str], out: Path, place: Callable) -> None:
    """Place each of ``bundle``'s ``files`` under ``out`` with ``place(source, target)``."""
    for relative in files:
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        place(bundle / relative, target)


def measure(bundle: Path, work: Path, repeats: int) -> dict[str, float]:
    """Return the median seconds of each operation over ``repeats`` interleaved rounds."""
    files = list(read_manifest(bundle / "manifest.json").files)
    seconds: dict[str, list[float]] = {"load": [], "hash": [], "link": [], "copy": []}
    for round_ in range(repeats):
        seconds["load"].append(timed(lambda: LoadedBundle(bundle)))
        seconds["hash"].append(
            timed(lambda: [sha256_file(bundle / rel) for rel in [*files, "manifest.json"]])
        )
        for kind, place in (("link", os.link), ("copy", shutil.copyfile)):
            out = work / f"{kind}-{round_}"
            seconds[kind].append(timed(lambda o=out, p=place: materialise(bundle, files, o, p)))
            shutil.rmtree(out)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    medians["bytes"] = sum((bundle / rel).stat().st_size for rel in files)
    return medians


def main() -> None:
    """Build the bundle, measure, print the table and write bench/results/integrity.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        bundle = build_bundles(work)["depth4_l1"]
        timing = measure(bundle, work, args.repeats)
    results = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{args.threads} torch threads, torch {torch.__version__}",
        "repeats": args.repeats,
        "bundle": "MiniLM, 8 tasks, trunk cut at depth 4, one branch layer each",
        "load_s": timing["load"],
        "hash_s": timing["hash"],
        "hash_share_of_load": timing["hash"] / timing["load"],
        "link_s": timing["link"],
        "copy_s": timing["copy"],
        "copy_over_link": timing["copy"] / timing["link"],
        "copied_mib_per_bundle": timing["bytes"] / 2**20,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "integrity.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| measure | value |\n|---|---|")
    for key in ("load_s", "hash_s", "hash_share_of_load", "link_s", "copy_s", "copy_over_link"):
        print(f"| {key} | {results[key]:.4f} |")
    print(f"| copied_mib_per_bundle | {results['copied_mib_per_bundle']:.1f} |")


if __name__ == "__main__":
    main()
