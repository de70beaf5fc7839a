"""Decode and prefill speed, peak memory and size of the artifacts against PyTorch eager, and llama.cpp
on the same weights, all measured in the same run.

python -m bench.run --preset minicpm4-0.5b            # synthetic checkpoint of the real 0.5B shape
python -m bench.run --model exporter/embedded/minicpm-tiny --recipe fp32 --recipe int8 --llamacpp

Each runtime runs in its own process (peak memory is its own); every speed is also reported as a
ratio to eager measured in this run. `--recipe` (repeatable) exports each target with that recipe's
spec and passes; `--llamacpp` adds llama.cpp F32 / Q8_0 / Q4_0 (bench/llamacpp.py) for the models
it can run. Writes results.json (rows + host, versions, command, load), results.md and results.png
to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
from rich.segment import Segments
from rich.table import Table

from cpm_mobile.exporter.calibration import calibrated_model, gptq_linear, rounding_for
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models import load_checkpoint
from cpm_mobile.exporter.models.grid import WeightGrid
from cpm_mobile.exporter.sensitivity import body_linears
from bench.synthetic import write_synthetic_checkpoint
from cpm_mobile.exporter.models.loader import build_model
from cpm_mobile.exporter.passes import apply_passes
from cpm_mobile.exporter.targets.base import ExportContext
from cpm_mobile.exporter.targets.registry import get_target
from cpm_mobile.recipes import Recipe, load_recipe

console = Console()
COLUMNS = ("model", "runtime", "recipe", "decode tok/s", "x eager", "prefill tok/s", "x eager", "peak RSS MB",
           "file MB")


def export_artifacts(model_path: Path, recipe: Recipe, targets: list[str], folder: Path, max_seq_len: int) -> dict[str, int]:
    checkpoint = load_checkpoint(model_path)
    reference = on_recipe_grid(build_model(checkpoint, max_seq_len=max_seq_len), recipe)
    # The context exactly as exporter.pipeline.export_bundle builds it.
    context = ExportContext(checkpoint.config.bos_token_id, checkpoint.config.eos_token_ids)
    infos, sizes = [], {}
    for target in targets:
        spec = recipe.targets[target]
        model = apply_passes(reference, [*recipe.passes, *spec.passes], target)
        with console.status(f"exporting {target} ({recipe.name}) for {model_path.name}"):
            info = get_target(target).export(model, folder, spec, context, lambda *a: None).info
        infos.append(asdict(info))
        sizes[target] = info.metadata["size_bytes"]  # what the target wrote, as it records it
    (folder / "artifacts.json").write_text(json.dumps(infos))
    return sizes


def on_recipe_grid(reference, recipe: Recipe):
    """A calibrated recipe's artifacts carry its grid. Speed depends on the grid's layout (bits, groups, scales),
    not on which codes calibration picks, so the bench rounds each body linear to nearest on that grid instead of
    calibrating (minutes saved on a large shape); the quality bench (bench.quality) calibrates."""
    if recipe.calibration is None:
        return reference
    rounding = rounding_for(recipe.calibration.bits, recipe.calibration)
    linears = {name: gptq_linear(module.weight, None, rounding) for name, module in body_linears(reference).items()}
    return calibrated_model(reference, WeightGrid("round to nearest on the recipe's grid (bench)", linears))


def run_one(runtime: str, folder: Path, model_path: Path, args, vocab: int) -> dict:
    command = [sys.executable, "-m", "bench.measure", "--runtime", runtime, "--bundle", str(folder),
               "--model", str(model_path), "--max-seq-len", str(args.max_seq_len), "--vocab", str(vocab),
               "--prefill", str(args.prefill), "--decode", str(args.decode), "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
    with console.status(f"measuring {runtime} on {model_path.name}"):
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def with_ratios(row: dict, eager: dict) -> dict:
    return {**row, "decode_speedup": row["decode_tok_per_s"] / eager["decode_tok_per_s"],
            "prefill_speedup": row["prefill_tok_per_s"] / eager["prefill_tok_per_s"]}


def _workspace(args, label: str):
    """Where a model's artifacts go: a temporary folder, or with --artifacts one that later runs reuse."""
    if args.artifacts is None:
        return tempfile.TemporaryDirectory(prefix="cpm-bench-")
    folder = args.artifacts / label.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(str(folder))


def exported_or_reused(model_path: Path, recipe: Recipe, targets: list[str], folder: Path, max_seq_len: int) -> dict[str, int]:
    recorded = folder / "sizes.json"
    if recorded.exists() and all(t in json.loads(recorded.read_text()) for t in targets):
        return json.loads(recorded.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    sizes = export_artifacts(model_path, recipe, targets, folder, max_seq_len)
    recorded.write_text(json.dumps(sizes))
    return sizes


def bench_model(model_path: Path, label: str, args, llama, skipped: list[dict]) -> list[dict]:
    vocab = load_checkpoint(model_path).config.vocab_size
    with _workspace(args, label) as temp:
        eager = run_one("eager", Path(temp), model_path, args, vocab)
        rows = [{"model": label, "runtime": "eager", "recipe": "fp32", **with_ratios(eager, eager), "size_mb": None}]
        for name in args.recipe:
            recipe = load_recipe(name)
            targets = [t for t in args.targets if t in recipe.targets]
            skipped += [{"model": label, "runtime": t, "recipe": recipe.name, "reason": "target not in the recipe"}
                        for t in args.targets if t not in recipe.targets]
            folder = Path(temp) / recipe.name
            sizes = exported_or_reused(model_path, recipe, targets, folder, args.max_seq_len)
            for target in targets:
                result = run_one(target, folder, model_path, args, vocab)
                rows.append({"model": label, "runtime": target, "recipe": recipe.name, **with_ratios(result, eager),
                             "size_mb": sizes[target] / 2**20})
        if llama is not None:
            rows += llamacpp_rows(model_path, label, args, llama, eager, Path(temp), skipped)
    return rows


def llamacpp_rows(model_path: Path, label: str, args, llama, eager: dict, folder: Path, skipped: list[dict]) -> list[dict]:
    from bench import llamacpp

    try:
        llamacpp.check_supported(model_path)
        f32 = folder / "model-F32.gguf"
        if not f32.exists():
            with console.status(f"converting {model_path.name} to GGUF F32 (llama.cpp's convert_hf_to_gguf.py)"):
                f32 = llamacpp.convert(llama.get(), model_path, f32)
    except llamacpp.UnsupportedModel as exc:
        skipped.append({"model": label, "runtime": "llama.cpp", "recipe": "*", "reason": str(exc)})
        return []
    rows = []
    for qtype in args.llamacpp_types:
        gguf = f32
        if qtype != "F32" and not (folder / f"model-{qtype}.gguf").exists():
            with console.status(f"llama-quantize {qtype}"):
                llamacpp.quantize(llama.get(), f32, folder / f"model-{qtype}.gguf", qtype)
        if qtype != "F32":
            gguf = folder / f"model-{qtype}.gguf"
        with console.status(f"llama-bench {qtype} on {model_path.name}"):
            result = llamacpp.bench(llama.get(), gguf, args.threads, args.prefill, args.decode, args.repeats)
        rows.append({"model": label, "runtime": "llama.cpp", "recipe": qtype, **with_ratios(result, eager),
                     "size_mb": gguf.stat().st_size / 2**20})
    return rows


class _LlamaCppOnFirstUse:
    """Found (or built: minutes) when the first model reaches its llama.cpp rows, so a build can
    overlap the export and timing of our own artifacts."""

    def __init__(self):
        self.found = None

    def get(self):
        if self.found is None:
            from bench import llamacpp

            with console.status("finding or building llama.cpp"):
                self.found = llamacpp.find_or_build(log=console.print)
        return self.found


def host_facts() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return {"node": platform.node(), "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "simd": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags],
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def write_outputs(rows: list[dict], meta: dict, skipped: list[dict], out: Path, quiet: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=2))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table = Table(title="decode / prefill vs PyTorch eager (same run)")
    for column in COLUMNS:
        table.add_column(column, no_wrap=True)
    for r in rows:
        size = f"{r['size_mb']:.1f}" if r["size_mb"] is not None else "-"
        cells = [r["model"], r["runtime"], r["recipe"], f"{r['decode_tok_per_s']:.1f}", f"{r['decode_speedup']:.2f}",
                 f"{r['prefill_tok_per_s']:.0f}", f"{r['prefill_speedup']:.2f}", f"{r['peak_rss_mb']:.0f}", size]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    if not quiet:
        print_table(table, labels=("model", "runtime", "recipe"))
        for s in skipped:
            console.print(f"not measured: {s['model']} {s['runtime']} {s['recipe']}: {s['reason']}",
                          markup=False, highlight=False, soft_wrap=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "results.png")


def print_table(table: Table, labels: tuple[str, ...] = ()) -> None:
    """Print a table with every name and number whole (the CLI's rule, cpm_mobile.cli._print_table).

    Without a terminal (a log: rich assumes 80 columns) the table is printed as wide as it is. In a terminal
    narrower than the table, the `labels` columns (by header) fold; if even the other columns do not fit,
    the lines run past the terminal's edge rather than cut a number.
    """
    wide = console.options.update_width(10_000)
    folding = set(labels) if console.is_terminal else set()
    slack = 0
    for column in table.columns:
        column.no_wrap, column.overflow = column.header not in folding, "fold"
        cells = [Measurement.get(console, wide, cell) for cell in (column.header, *column.cells)]
        if column.no_wrap:
            column.min_width = max(cell.maximum for cell in cells)
        else:
            slack += max(0, max(cell.minimum for cell in cells) - 4)  # a label may fold down to 4 characters
    whole = Measurement.get(console, wide, table).minimum
    if whole - slack <= console.width:
        console.print(table)
        return
    lines = console.render_lines(table, console.options.update_width(whole), pad=False, new_lines=True)
    console.print(Segments([segment for line in lines for segment in line]), end="", crop=False)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    panels = (("decode_tok_per_s", "decode tok/s"), ("prefill_tok_per_s", "prefill tok/s"),
              ("peak_rss_mb", "peak RSS MB"), ("size_mb", "file MB"))
    fig, axes = plt.subplots(len(models), len(panels), figsize=(4 * len(panels), 3.2 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        labels = [f"{r['runtime']}\n{r['recipe']}" for r in mine]
        colors = [f"C{['eager', 'executorch', 'onnx', 'coreml', 'llama.cpp'].index(r['runtime'])}"
                  if r["runtime"] in ("eager", "executorch", "onnx", "coreml", "llama.cpp") else "grey" for r in mine]
        for axis, (key, title) in zip(row_axes, panels):
            axis.bar(range(len(mine)), [r[key] or 0 for r in mine], color=colors)
            axis.set_xticks(range(len(mine)), labels, fontsize=6, rotation=90)
            axis.set_title(f"{model}: {title}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    try:
        run(sys.argv[1:])
    except InputError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        raise SystemExit(2) from None


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", default=[], help="checkpoint folder (repeatable)")
    parser.add_argument("--preset", action="append", default=[], help="synthetic checkpoint of a preset shape")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--targets", default="executorch,onnx")
    parser.add_argument("--recipe", action="append", default=[], help="recipe per artifact set (repeatable; default fp32)")
    parser.add_argument("--llamacpp", action="store_true", help="also time llama.cpp (built or found in its cache)")
    parser.add_argument("--llamacpp-types", default="F32,Q8_0,Q4_0")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="keep checkpoints and artifacts here and reuse them in later runs (time again without re-exporting)")
    args = parser.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]  # "" : eager (and llama.cpp) only
    args.recipe = args.recipe or ["fp32"]
    args.llamacpp_types = args.llamacpp_types.split(",")
    for name in args.recipe:
        load_recipe(name)  # a bad name fails before any export starts
    meta = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "host": host_facts(), "load_average_start": os.getloadavg(), "threads": args.threads}
    llama = _LlamaCppOnFirstUse() if args.llamacpp else None
    rows: list[dict] = []
    skipped: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cpm-bench-ckpt-") as temp:
        for preset in args.preset:
            overrides = {"num_hidden_layers": args.layers} if args.layers else {}
            root = args.artifacts / "checkpoints" if args.artifacts else Path(temp)
            path = root / preset
            if not (path / "config.json").exists():
                with console.status(f"writing synthetic {preset} checkpoint"):
                    path = write_synthetic_checkpoint(path, preset, dtype="float32", **overrides)
            rows += bench_model(path, f"{preset} (synthetic)", args, llama, skipped)
            write_outputs(rows, meta, skipped, args.out, quiet=True)  # so far, in case a later model fails
        for model in args.model:
            rows += bench_model(model, model.name, args, llama, skipped)
            write_outputs(rows, meta, skipped, args.out, quiet=True)
    from cpm_mobile.exporter.pipeline import library_versions

    meta.update(load_average_end=os.getloadavg(), finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                versions={**library_versions(), **(llama.get().versions() if llama and llama.found else {})})
    write_outputs(rows, meta, skipped, args.out)


if __name__ == "__main__":
    main()
