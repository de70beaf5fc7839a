"""Decode and prefill speed of the artifacts against PyTorch eager, measured in the same run.

python -m bench.run --preset minicpm4-0.5b            # synthetic checkpoint of the real 0.5B shape
python -m bench.run --model exporter/embedded/minicpm-tiny --model exporter/embedded/blockffn-tiny

Each runtime runs in its own process (peak memory is its own); every speed is also reported as a
ratio to eager measured in this run. Writes results.json, results.md, results.png and
provenance.json (command, versions, host) to --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from exporter.models import load_checkpoint, write_synthetic_checkpoint
from exporter.models.loader import build_model
from exporter.targets import ExportContext, get_target

console = Console()


def export_artifacts(model_path: Path, targets: list[str], folder: Path, max_seq_len: int) -> dict[str, int]:
    checkpoint = load_checkpoint(model_path)
    model = build_model(checkpoint, max_seq_len=max_seq_len)
    context = ExportContext(max_seq_len, checkpoint.config.vocab_size, checkpoint.config.bos_token_id,
                            checkpoint.config.eos_token_ids)
    infos, sizes = [], {}
    for target in targets:
        with console.status(f"exporting {target} for {model_path.name}"):
            info = get_target(target).export(model, folder, context, lambda *a: None)
        infos.append(asdict(info))
        sizes[target] = sum(p.stat().st_size for f in info.files for p in _files(folder / f))
    (folder / "artifacts.json").write_text(json.dumps(infos))
    return sizes


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


def run_one(runtime: str, folder: Path, model_path: Path, args, vocab: int) -> dict:
    command = [sys.executable, "-m", "bench.measure", "--runtime", runtime, "--bundle", str(folder),
               "--model", str(model_path), "--max-seq-len", str(args.max_seq_len), "--vocab", str(vocab),
               "--prefill", str(args.prefill), "--decode", str(args.decode), "--repeats", str(args.repeats)]
    with console.status(f"measuring {runtime} on {model_path.name}"):
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def bench_model(model_path: Path, label: str, args) -> list[dict]:
    vocab = load_checkpoint(model_path).config.vocab_size
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpm-bench-") as temp:
        folder = Path(temp)
        sizes = export_artifacts(model_path, args.targets, folder, args.max_seq_len)
        eager = run_one("eager", folder, model_path, args, vocab)
        rows.append({"model": label, "runtime": "eager", **eager, "size_mb": None})
        for target in args.targets:
            result = run_one(target, folder, model_path, args, vocab)
            rows.append({"model": label, "runtime": target, **result, "size_mb": sizes[target] / 2**20,
                         "decode_speedup": result["decode_tok_per_s"] / eager["decode_tok_per_s"],
                         "prefill_speedup": result["prefill_tok_per_s"] / eager["prefill_tok_per_s"]})
        rows[0].update(decode_speedup=1.0, prefill_speedup=1.0)
    return rows


def write_outputs(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from bench.provenance import provenance

    context = provenance()
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "provenance.json").write_text(json.dumps(context, indent=2) + "\n")
    header = "| model | runtime | decode tok/s | x eager | prefill tok/s | x eager | peak RSS MB | artifact MB |"
    versions = context["versions"]
    load = context["host"]["load_average"]
    lines = [f"`{context['command']}` on {context['host']['platform']} ({context['host']['cpus']} CPUs"
             f"{f', load {load[0]:.1f}' if load else ''}), {context['date']}; torch {versions['torch']}, executorch "
             f"{versions['executorch']}, onnxruntime {versions['onnxruntime']}", "", header, "|" + "---|" * 8]
    table = Table(title="decode / prefill vs PyTorch eager (same run)")
    for column in ("model", "runtime", "decode tok/s", "x eager", "prefill tok/s", "x eager", "peak RSS MB", "artifact MB"):
        table.add_column(column)
    for r in rows:
        size = f"{r['size_mb']:.1f}" if r["size_mb"] is not None else "-"
        cells = [r["model"], r["runtime"], f"{r['decode_tok_per_s']:.1f}", f"{r['decode_speedup']:.2f}",
                 f"{r['prefill_tok_per_s']:.0f}", f"{r['prefill_speedup']:.2f}", f"{r['peak_rss_mb']:.0f}", size]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "results.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(runtimes)
    for axis, key, title in ((axes[0], "decode_speedup", "decode speed vs eager"),
                             (axes[1], "prefill_speedup", "prefill speed vs eager")):
        for index, runtime in enumerate(runtimes):
            values = [next((r[key] for r in rows if r["model"] == m and r["runtime"] == runtime), 0) for m in models]
            axis.bar([i + index * width for i in range(len(models))], values, width, label=runtime)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks([i + width * (len(runtimes) - 1) / 2 for i in range(len(models))], models, fontsize=8)
        axis.set_title(title)
        axis.set_ylabel("x eager (higher is faster)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", default=[], help="checkpoint folder (repeatable)")
    from exporter.models.presets import PRESETS

    parser.add_argument("--preset", action="append", default=[], choices=sorted(PRESETS), metavar="PRESET",
                        help=f"synthetic checkpoint of a real model's shape (repeatable): {', '.join(sorted(PRESETS))}")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--targets", default="executorch,onnx", help="comma-separated: executorch, onnx")
    parser.add_argument("--max-seq-len", type=int, default=256, help="KV cache positions of the artifacts")
    parser.add_argument("--prefill", type=int, default=128, help="tokens in the one prefill call")
    parser.add_argument("--decode", type=int, default=32, help="decode steps timed (median per token)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="folder for results.json/.md/.png and provenance.json")
    args = parser.parse_args()
    args.targets = args.targets.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpm-bench-ckpt-") as temp:
        for preset in args.preset:
            overrides = {"num_hidden_layers": args.layers} if args.layers else {}
            with console.status(f"writing synthetic {preset} checkpoint"):
                path = write_synthetic_checkpoint(Path(temp) / preset, preset, dtype="float32", **overrides)
            rows += bench_model(path, f"{preset} (synthetic)", args)
        for model in args.model:
            rows += bench_model(model, model.name, args)
    write_outputs(rows, args.out)


if __name__ == "__main__":
    main()
