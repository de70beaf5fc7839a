"""int4-mixed's cost curve: KL against fp32 by the body's mean code width, and what the measured choice buys.

    python -m bench.mixed_precision [--model DIR ...] [--budget 4.5 --budget 5 ...] [--out DIR]

For each budget (mean code bits of the body's linears): the int4-mixed recipe's calibration with that budget
(linears kept at 8 bits by measured sensitivity, exporter/sensitivity.py, then GPTQ at each linear's width);
budget 4 is int4-gptq. Scored as the check's fidelity gate scores (its 16 x 256 held-out tokens, teacher
forced) with the calibrated weights and fp32 activations (what Core ML and the weight-only paths compute; the
.pte and .onnx add their kernels' int8 activation rounding at 4 bits). llama.cpp's Q8_0 / Q4_0 rounding of the
same weights (bench.ggml) on the same windows, for scale. Writes mixed_precision.json / .md / .png to --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

from bench.ggml import llamacpp_rounded
from cpm_mobile.exporter.calibration import calibrate_for_recipe, calibrated_model, calibration_text
from cpm_mobile.exporter.defaults import DEFAULT_MODEL, HELDOUT_TEXT
from cpm_mobile.exporter.models.loader import load_model
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.verify import build_plan
from cpm_mobile.recipes import load_recipe
from cpm_mobile.runtimes.check import compare, greedy_runs, teacher_forced_runs
from cpm_mobile.runtimes.torch_session import TorchSession

console = Console()
BUDGETS = (4.0, 4.5, 5.0, 5.5, 6.0, 7.0)


def _recipe(budget: float):
    recipe = load_recipe("int4-mixed")
    calibration = recipe.calibration
    mixed = None if budget <= calibration.bits else calibration.mixed.model_copy(update={"bits_per_weight": budget})
    return recipe.model_copy(update={"calibration": calibration.model_copy(update={"mixed": mixed})})


def model_rows(model_path: Path, budgets: list[float]) -> list[dict]:
    recipe = load_recipe("int4-mixed")
    reference_model, checkpoint = load_model(model_path, max_seq_len=recipe.max_seq_len)
    tokenizer = TextTokenizer.from_folder(model_path)
    heldout = HELDOUT_TEXT.read_text()
    plan = build_plan(recipe, tokenizer, heldout, reference_model.max_seq_len, stop_ids=checkpoint.config.eos_token_ids)
    reference = greedy_runs(TorchSession(reference_model), plan)
    text = calibration_text(None, heldout, plan.heldout_windows)

    def scored(module) -> dict:
        metrics = compare(reference, teacher_forced_runs(TorchSession(module), plan, reference), plan)
        return {"kl": metrics["kl"], "ppl_rel_delta": metrics["ppl_rel_delta"], "top1": metrics["top1"]}

    rows = []
    for ftype, bits in (("Q8_0", 8.5), ("Q4_0", 4.5)):
        rows.append({"model": model_path.name, "kind": f"llama.cpp {ftype} (weights only)", "code_bits": bits - 0.5,
                     "wide_linears": None, **scored(llamacpp_rounded(reference_model, ftype))})
    for budget in budgets:
        with console.status(f"{model_path.name}: calibrating at {budget} bits per weight"):
            grid = calibrate_for_recipe(reference_model, _recipe(budget), tokenizer, text)
        weights = sum(g.codes.numel() for g in grid.linears.values())
        code_bits = sum(g.bits * g.codes.numel() for g in grid.linears.values()) / weights
        wide = sorted(name.removesuffix(".weight") for name, g in grid.linears.items() if g.bits == 8)
        rows.append({"model": model_path.name, "kind": "int4-gptq" if budget <= 4 else f"int4-mixed @ {budget}",
                     "code_bits": code_bits, "wide_linears": wide,
                     **scored(calibrated_model(reference_model, grid))})
        console.print(f"{model_path.name} {rows[-1]['kind']}: code bits {code_bits:.2f}, KL {rows[-1]['kl']:.2e}, "
                      f"{len(wide)} linears at 8 bits")
    return rows


def write_outputs(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_precision.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| model | rounding | mean code bits | KL vs fp32 | ppl delta | top-1 | linears at 8 bits |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        wide = "-" if r["wide_linears"] is None else str(len(r["wide_linears"]))
        lines.append(f"| {r['model']} | {r['kind']} | {r['code_bits']:.2f} | {r['kl']:.2e} | "
                     f"{100 * r['ppl_rel_delta']:+.2f} % | {r['top1']:.3f} | {wide} |")
    (out / "mixed_precision.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
    _plot(rows, out / "mixed_precision.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        ours = [r for r in rows if r["model"] == model and r["wide_linears"] is not None]
        ax.plot([r["code_bits"] for r in ours], [r["kl"] for r in ours], "o-", label="int4-gptq / int4-mixed")
        for r in rows:
            if r["model"] == model and r["wide_linears"] is None:
                ax.axhline(r["kl"], color="grey", linestyle="--")
                ax.annotate(r["kind"], (ours[0]["code_bits"], r["kl"]), fontsize=7, color="grey")
        ax.set_yscale("log")
        ax.set_xlabel("mean code bits of the body's linears (scales not counted)")
        ax.set_ylabel("KL vs fp32 (held-out, fp32 activations)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", default=[])
    parser.add_argument("--budget", type=float, action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("bench/reports/mixed_precision"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows: list[dict] = []
    for model_path in args.model or [DEFAULT_MODEL]:
        rows += model_rows(model_path, args.budget or list(BUDGETS))
        write_outputs(rows, args.out)


if __name__ == "__main__":
    main()
