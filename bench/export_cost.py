"""What an export costs: wall time, peak resident memory and where the time goes, per recipe x target.

Each cell is one `cpm-mobile export --verbose` in its own process (a fresh process: peak memory is the
export's own) on a trained-like synthetic checkpoint of a preset's shape (bench/synthetic.py);
the stages come from the bundle's manifest (export_cost: the progress stages, timed as they ran). Peak
memory is also stated against the model's fp32 weights, the yardstick of issue 23's goals.

python -m bench.export_cost --preset minicpm4-0.5b --recipe int4 --target executorch --out bench/reports/export-cost
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Stage names (exporter/export_cost.py) grouped into the phases the PNG and the table show.
PHASES = {
    "load": ("load checkpoint",),
    "calibrate": ("calibrate", "mixed precision"),
    "trace": ("export: torch.export", "torch.export", "exporting graph"),
    "lower": ("lower:", "ct.convert", "quantising", "coremltools.optimize"),
    "serialise": ("to_executorch", "save", "saving", "writing"),
    "check": ("check", "suggest"),
}


def phase(stage: str) -> str:
    step = stage.split(": ", 1)[1] if stage.split(": ", 1)[0] in ("executorch", "onnx", "coreml") else stage
    for name, prefixes in PHASES.items():
        if step.startswith(prefixes):
            return name
    return "other"


def checkpoint_for(preset: str, root: Path) -> Path:
    from bench.synthetic import write_trained_like_checkpoint
    from cpm_mobile.exporter.defaults import DEFAULT_MODEL

    folder = root / f"{preset}-checkpoint"
    if not (folder / "config.json").is_file():
        write_trained_like_checkpoint(folder, preset)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(DEFAULT_MODEL / name, folder / name)
    return folder


def fp32_weight_bytes(checkpoint: Path) -> int:
    from safetensors import safe_open

    total = 0
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                count = 1
                for size in handle.get_slice(key).get_shape():
                    count *= int(size)
                total += 4 * count
    return total


def run_cell(checkpoint: Path, recipe: str, target: str, work: Path) -> dict:
    name = f"{recipe}-{target}"
    command = [sys.executable, "-m", "cli", "export", "--model", str(checkpoint), "--recipe", recipe,
               "--target", target, "--out", str(work), "--name", name, "--force", "--verbose"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    bundle = next((b for b in (work / name, work / f"{name}.rejected") if (b / "manifest.json").is_file()), None)
    if bundle is None:
        return {"recipe": recipe, "target": target, "exit_code": result.returncode, "wall_s": round(wall, 1),
                "error": (result.stderr or result.stdout)[-800:]}
    manifest = json.loads((bundle / "manifest.json").read_text())
    cost = manifest["export_cost"]
    phases: dict[str, float] = {}
    for entry in cost["stages"]:
        phases[phase(entry["stage"])] = round(phases.get(phase(entry["stage"]), 0.0) + entry["seconds"], 2)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    shutil.rmtree(bundle)
    return {"recipe": recipe, "target": target, "exit_code": result.returncode, "passed": result.returncode == 0,
            "wall_s": round(wall, 1), "export_s": cost["seconds"], "peak_rss_mib": cost["peak_rss_mib"],
            "bundle_bytes": size, "phases": phases, "stages": cost["stages"],
            # where the process's peak memory was reached (the first stage that ended at it)
            "peak_stage": next((e["stage"] for e in cost["stages"] if e.get("peak_rss_mib", 0) >= cost["peak_rss_mib"]),
                               "after the last stage")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minicpm4-0.5b")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder instead of the preset's synthetic one")
    parser.add_argument("--recipe", action="append", help="recipes (default fp32, int8, int4)")
    parser.add_argument("--target", action="append", help="targets (default executorch, onnx, coreml)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="where the checkpoint and bundles go (default OUT/work)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or checkpoint_for(args.preset, work)
    shape = args.checkpoint.name if args.checkpoint else args.preset
    weights = fp32_weight_bytes(checkpoint)
    rows = []
    for recipe in args.recipe or ["fp32", "int8", "int4"]:
        for target in args.target or ["executorch", "onnx", "coreml"]:
            row = run_cell(checkpoint, recipe, target, work / "bundles")
            if "peak_rss_mib" in row:
                row["peak_rss_x_fp32_weights"] = round(row["peak_rss_mib"] * 2**20 / weights, 2)
            rows.append(row)
            print(_line(row), flush=True)
            (args.out / "results.json").write_text(json.dumps(
                {"model": shape, "checkpoint": str(checkpoint), "fp32_weight_bytes": weights, "rows": rows}, indent=2) + "\n")
    plot(rows, args.out / "export_cost.png", shape)


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['recipe']:>8} {row['target']:<10} exit {row['exit_code']}: {row['error'].strip().splitlines()[-1]}"
    phases = "  ".join(f"{name} {seconds:.0f}s" for name, seconds in row["phases"].items())
    return (f"{row['recipe']:>8} {row['target']:<10} {row['export_s']:7.1f} s  peak {row['peak_rss_mib']:7.0f} MiB "
            f"({row['peak_rss_x_fp32_weights']:.2f}x fp32 weights, in {row['peak_stage']})  "
            f"{'pass' if row['passed'] else 'FAIL'}  {phases}")


def plot(rows: list[dict], path: Path, shape: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "phases" in r]
    if not done:
        return
    names = [*PHASES, "other"]
    figure, axis = plt.subplots(figsize=(9, 0.5 * len(done) + 1.5))
    labels = [f"{r['recipe']} {r['target']}" for r in done]
    left = [0.0] * len(done)
    for name in names:
        widths = [r["phases"].get(name, 0.0) for r in done]
        axis.barh(labels, widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    for index, row in enumerate(done):
        axis.text(left[index], index, f" {row['export_s']:.0f} s, {row['peak_rss_mib'] / 1024:.1f} GiB", va="center")
    axis.set_xlabel("seconds (2 cores)")
    axis.set_title(f"export cost, {shape}: where the time goes")
    axis.set_xlim(0, 1.3 * max(left))
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
