"""What XNNPACK's int8 activations cost against the weight-only kernels' fp32 ones, per recipe, from the eager
ExecuTorch twins alone (what `cpm-mobile export --dry-run` measures: the fp32 recipe's check plan).

    python -m bench.activations [--model exporter/embedded/minicpm-tiny] [--recipe int4 --recipe int4-gptq ...]

Prints one line per recipe and activation kind: KL and perplexity delta against the fp32 reference.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cpm_mobile.exporter import estimate as est
from cpm_mobile.exporter.calibration import calibration_text
from cpm_mobile.exporter.defaults import DEFAULT_MODEL, HELDOUT_TEXT, read_heldout
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.verify import build_plan
from cpm_mobile.recipes import Recipe, load_recipe


def with_activations(recipe: Recipe, activations: str) -> Recipe:
    """The recipe with its .pte's linears on XNNPACK (int8: 8-bit weights per channel, as XNNPACK runs them) or on
    the weight-only kernels (fp32: blocks of 32)."""
    spec = recipe.targets["executorch"]
    # only the fields the recipe sets: a grid-carrying recipe refuses a rounding set explicitly
    fields = {**spec.quantization.model_dump(include=spec.quantization.model_fields_set), "activations": activations}
    if activations == "fp32":
        fields["group_size"] = 32
    elif fields["scheme"] == "int8":
        fields["group_size"] = None
    quantization = type(spec.quantization).model_validate(fields)
    targets = {**recipe.targets, "executorch": spec.model_copy(update={"quantization": quantization})}
    return recipe.model_copy(update={"targets": targets})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--recipe", action="append")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.model)
    tokenizer = TextTokenizer.from_folder(checkpoint.folder)
    base = load_recipe("fp32")
    heldout = read_heldout(None)
    plan = build_plan(base, tokenizer, heldout, base.max_seq_len, checkpoint.config.eos_token_ids, HELDOUT_TEXT)
    calibration = calibration_text(None, heldout, plan.heldout_windows)
    reference = build_model(checkpoint, max_seq_len=base.max_seq_len)
    expected = est.reference_runs(reference, plan)
    for name in args.recipe or ["int8", "int4", "int4-gptq"]:
        for activations in ("int8", "fp32"):
            recipe = with_activations(load_recipe(name), activations)
            result = est.estimate(reference, recipe, plan, expected, tokenizer, calibration, 1, 1)
            print(f"{checkpoint.folder.name} {name:10s} activations {activations}: {est.summary(result.metrics)}",
                  flush=True)


if __name__ == "__main__":
    main()
