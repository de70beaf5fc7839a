"""Both gates' metrics of every shipped recipe (grid recipes aside) x target on both embedded models.

    python -m bench.gates_matrix OUT

Exports each with the recipe's bounds and a shorter check plan (the first prompt, 16 new tokens, 4 x 256
held-out tokens) into OUT/<model>/ and writes OUT/metrics.json: per "model recipe", per target, each gate's
max rel logits, SQNR, KL, top-1, greedy and ppl delta, and the verdict. Used to show that a change leaves
every number as it was (bench/reports/one-home-per-target/).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cpm_mobile.exporter.defaults import EMBEDDED
from cpm_mobile.exporter.pipeline import export_bundle
from cpm_mobile.recipes import load_recipe, recipe_names

METRICS = ("max_rel_logits", "sqnr_db", "kl", "top1", "greedy", "ppl_rel_delta")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gates_matrix")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for model in ("minicpm-tiny", "blockffn-tiny"):
        for name in recipe_names():
            recipe = load_recipe(name)
            sparse = any(p.name == "blockffn_sparse" for s in recipe.targets.values() for p in [*recipe.passes, *s.passes])
            if recipe.weights == "checkpoint_grid" or recipe.vision_language or (sparse and model == "minicpm-tiny"):
                continue
            check = recipe.check.model_copy(update={"prompts": recipe.check.prompts[:1], "max_new_tokens": 16,
                                                    "heldout_windows": 4})
            start = time.time()
            result = export_bundle(EMBEDDED / model, recipe.model_copy(update={"check": check}), out / model, force=True)
            results[f"{model} {name}"] = {
                target: {**{gate: {k: v for k, v in entry[gate]["metrics"].items() if k in METRICS}
                            for gate in ("faithfulness", "fidelity")}, "passed": entry["passed"]}
                for target, entry in result.report["artifacts"].items()}
            print(model, name, f"{time.time() - start:.0f} s", flush=True)
            (out / "metrics.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
