"""Every shipped recipe x format on trained weights, next to llama.cpp's Q8_0 / Q4_0 of the same weights, in one run.

    python -m bench.quality [--model exporter/embedded/minicpm-tiny --model ...] [--recipe int8 --recipe int4 ...]
                            [--target executorch --target onnx]

For each model and recipe, `export_bundle` exports every target of the recipe and checks it (both gates, the
recipe's own held-out plan: 16 windows x 256 tokens); the rows are the report's fidelity metrics (vs fp32) and
whether each gate passed, with the artifact's size. The llama.cpp rows are the same weights rounded exactly as
llama-quantize rounds them (bench.ggml, byte-identical to llama-quantize: bench.ggml_parity), run in
PyTorch eager on the same held-out windows and prompts against the same fp32 reference, weights only and with
the q8_0 activation rounding llama.cpp's CPU dot products apply (blocks of 32, int8).
Writes quality.json, quality.md and quality.png to --out.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from cpm_mobile.exporter.defaults import DEFAULT_MODEL, DEFAULT_SPARSE_MODEL, HELDOUT_TEXT
from cpm_mobile.exporter.models.loader import load_model
from cpm_mobile.exporter.models.variant import derive
from cpm_mobile.exporter.pipeline import export_bundle
from bench.ggml import llamacpp_rounded
from cpm_mobile.exporter.targets.onnx.quant import Int8ActivationLinear
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.verify import build_plan
from cpm_mobile.recipes import load_recipe
from cpm_mobile.runtimes.check import compare, greedy_runs, teacher_forced_runs
from cpm_mobile.runtimes.torch_session import TorchSession

console = Console()
RECIPES = ("fp32", "int8", "int4", "coreml-palette4", "coreml-palette2", "ternary")
SHOWN = ("kl", "ppl_rel_delta", "top1", "sqnr_db")


def recipe_rows(model_path: Path, recipe_name: str, out: Path, targets: list[str] | None = None) -> list[dict]:
    recipe = load_recipe(recipe_name)
    if targets:
        recipe = recipe.select([t for t in targets if t in recipe.targets])
    result = export_bundle(model_path, recipe, out, name=f"{model_path.name}-{recipe_name}", force=True)
    sizes = {a["target"]: a["metadata"]["size_bytes"] for a in result.manifest["artifacts"]}
    rows = []
    for target, entry in result.report["artifacts"].items():
        size = sizes[target]
        rows.append({
            "model": model_path.name, "recipe": recipe_name, "runtime": target, "size_mb": size / 2**20,
            **{k: entry["fidelity"]["metrics"].get(k) for k in SHOWN},
            "faithfulness": "pass" if entry["faithfulness"]["passed"] else "FAIL",
            "fidelity": "pass" if entry["fidelity"]["passed"] else "FAIL",
            "faithfulness_sqnr_db": entry["faithfulness"]["metrics"].get("sqnr_db"),
        })
    return rows


def llamacpp_rows(model_path: Path) -> list[dict]:
    recipe = load_recipe("fp32")
    reference_model, checkpoint = load_model(model_path, max_seq_len=256)
    tokenizer = TextTokenizer.from_folder(model_path)
    plan = build_plan(recipe, tokenizer, HELDOUT_TEXT.read_text(), reference_model.max_seq_len,
                      stop_ids=checkpoint.config.eos_token_ids)
    reference = greedy_runs(TorchSession(reference_model), plan)
    rows = []
    for ftype in ("Q8_0", "Q4_0"):
        rounded = llamacpp_rounded(reference_model, ftype)
        with_activations = derive(rounded, lambda _, m: Int8ActivationLinear(m, 32) if isinstance(m, torch.nn.Linear)
                                  else None)
        for label, module in ((ftype, rounded), (f"{ftype} + q8_0 activations", with_activations)):
            metrics = compare(reference, teacher_forced_runs(TorchSession(module), plan, reference), plan)
            rows.append({"model": model_path.name, "recipe": label, "runtime": "llama.cpp rounding (eager)",
                         "size_mb": None, **{k: metrics.get(k) for k in SHOWN},
                         "faithfulness": "-", "fidelity": "-", "faithfulness_sqnr_db": None})
    return rows


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def write_outputs(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| model | recipe | runtime | size MB | KL | ppl delta | top-1 | SQNR dB | gates (faith. / fid.) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = None if r["ppl_rel_delta"] is None else 100 * r["ppl_rel_delta"]
        lines.append(f"| {r['model']} | {r['recipe']} | {r['runtime']} | {_cell(r['size_mb'], '.2f')} | "
                     f"{_cell(r['kl'], '.1e')} | {_cell(ppl, '+.2f')} % | {_cell(r['top1'], '.3f')} | "
                     f"{_cell(r['sqnr_db'], '.1f')} | {r['faithfulness']} / {r['fidelity']} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)  # whole lines, however narrow
    _plot(rows, out / "quality.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 4 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        mine = [r for r in rows if r["model"] == model and r["kl"] and r["recipe"] != "fp32"]
        labels = [f"{r['recipe']}\n{r['runtime'].split(' ')[0]}" for r in mine]
        colors = ["grey" if r["runtime"].startswith("llama.cpp") else "C0" for r in mine]
        ax.bar(range(len(mine)), [r["kl"] for r in mine], color=colors)
        ax.set_yscale("log")
        ax.set_xticks(range(len(mine)), labels, fontsize=6, rotation=60)
        ax.set_ylabel("KL vs fp32 (held-out)")
        ax.set_title(f"{model}: ours (blue) and llama.cpp's rounding of the same weights (grey)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", default=[])
    parser.add_argument("--recipe", action="append", default=[])
    parser.add_argument("--target", action="append", default=[], help="only these targets of each recipe")
    parser.add_argument("--out", type=Path, default=Path("bench/reports/quality"))
    args = parser.parse_args()
    models = args.model or [DEFAULT_MODEL, DEFAULT_SPARSE_MODEL]
    recipes = args.recipe or list(RECIPES)
    torch.set_num_threads(2)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cpm-quality-") as temp:
        for model_path in models:
            rows += llamacpp_rows(model_path)
            for name in recipes:
                with console.status(f"{model_path.name}: exporting and checking {name}"):
                    rows += recipe_rows(model_path, name, Path(temp), args.target)
                write_outputs(rows, args.out)


if __name__ == "__main__":
    main()
