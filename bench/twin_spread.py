"""Faithfulness of quantised artifacts at depth: the artifact against its twin, the twin's own spread,
and wrong twins (a fault the artifact does not have) against the same artifact.

For each depth, a trained-like checkpoint (bench.synthetic.write_trained_like_checkpoint: MiniCPM4-0.5B's
layout narrowed, logits as large as a trained model's) is exported with a quantised recipe (ExecuTorch and
ONNX); then the check is repeated with faulty twins, which measures what a wrong kernel would score without
building wrong artifacts:
- flipped code: the largest weight of one middle-layer down_proj with its sign flipped before quantising
  (its code moves across the whole range);
- scale x (1 + 2**-8): every linear's weights scaled by one bf16 step (codes unchanged, every scale off
  by what storing fp32 scales as bf16 can cost);
- zero point ignored: one middle-layer gate_proj's weights shifted by their mean |w| (what dropping an
  asymmetric grid's zero points does to a linear).

    python -m bench.twin_spread [--recipe int8 --recipe int4] [--layers 4 --layers 24 ...] [--out DIR]
Prints one line per artifact and case and writes DIR/twin_spread.json.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from bench.gate_bounds import NARROW
from bench.synthetic import write_trained_like_checkpoint
from cpm_mobile.exporter.defaults import DEFAULT_MODEL, HELDOUT_TEXT
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint
from cpm_mobile.exporter.models.variant import with_weights
from cpm_mobile.exporter.pipeline import export_bundle
from cpm_mobile.exporter.targets.registry import get_target
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.verify import Twin, build_plan, check_artifacts
from cpm_mobile.recipes import load_recipe

SHOWN = ("sqnr_db", "kl", "top1", "max_rel_logits", "ppl_rel_delta")


def checkpoint(folder: Path, layers: int, logit_max: float) -> Path:
    vocab = json.loads((DEFAULT_MODEL / "config.json").read_text())["vocab_size"]
    path = write_trained_like_checkpoint(folder, "minicpm4-0.5b", logit_max=logit_max, vocab_size=vocab,
                                         num_hidden_layers=layers, **NARROW["minicpm4-0.5b"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, path / name)
    return path


def faults(model, scale_step: float = 2.0**-8) -> dict[str, dict[str, torch.Tensor]]:
    """Weight edits of the reference that the twin gets and the artifact does not (tests/test_twin_spread.py
    uses them too)."""
    params = dict(model.named_parameters())
    middle = len(model.layers) // 2
    down = params[f"layers.{middle}.mlp.down_proj.weight"].detach().clone()
    index = down.abs().argmax()
    down.view(-1)[index] = -down.view(-1)[index]
    gate = params[f"layers.{middle}.mlp.gate_proj.weight"].detach()
    scaled = {name: p.detach() * (1 + scale_step) for name, p in params.items()
              if name.startswith("layers.") and p.dim() == 2}
    return {
        "flipped code": {f"layers.{middle}.mlp.down_proj.weight": down},
        f"scale x (1 + 2**{math.log2(scale_step):.0f})": scaled,
        "zero point ignored": {f"layers.{middle}.mlp.gate_proj.weight": gate + gate.abs().mean()},
    }


def twin_with_fault(target: str, reference, spec, bundle, artifact, case: str, scale_step: float = 2.0**-8):
    """ONNX reads its twin back from the file, so the fault goes into the twin's dequantised weights;
    ExecuTorch rebuilds its twin from the model, so the fault goes into the model before quantising."""
    if target == "onnx":
        module, description = get_target(target).twin(reference, spec, bundle, artifact)
        return with_weights(module, faults(module, scale_step)[case]), description
    return get_target(target).twin(with_weights(reference, faults(reference, scale_step)[case]), spec, bundle, artifact)


def line(layers: int, recipe: str, target: str, case: str, gate: dict) -> str:
    m = gate["metrics"]
    spread = gate.get("spread") or {}
    s = spread.get("metrics", {})
    bound = gate["tolerances"]
    return (f"L={layers:<3d} {recipe:6s} {target:10s} {case:22s} sqnr {m['sqnr_db']:6.1f} (>= {bound.get('min_sqnr_db') or 0:5.1f}; "
            f"spread {s.get('sqnr_db', float('nan')):5.1f}) kl {m['kl']:.1e} (<= {bound.get('max_kl') or 0:.1e}) "
            f"top1 {m['top1']:.3f} {'pass' if not gate['breaches'] else 'FAIL'}"
            f"{' | exact weights: FAIL' if gate['structure'] else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append")
    parser.add_argument("--layers", action="append", type=int)
    parser.add_argument("--target", action="append")
    parser.add_argument("--logit-max", type=float, default=40.0)
    parser.add_argument("--out", type=Path, default=Path("bench/reports/twin_spread"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory() as root:
        for layers in args.layers or [4, 24, 30, 40]:
            path = checkpoint(Path(root) / f"L{layers}", layers, args.logit_max)
            for recipe_name in args.recipe or ["int8", "int4"]:
                recipe = load_recipe(recipe_name).select(args.target or ["executorch", "onnx"])
                recipe = recipe.model_copy(update={"check": recipe.check.model_copy(
                    update={"max_new_tokens": 32, "heldout_windows": 2})})
                result = export_bundle(path, recipe, Path(root) / "out" / f"{layers}-{recipe_name}")
                reference = build_model(load_checkpoint(path), max_seq_len=recipe.max_seq_len)
                tokenizer = TextTokenizer.from_folder(result.bundle)
                plan = build_plan(recipe, tokenizer, HELDOUT_TEXT.read_text(), recipe.max_seq_len)
                for artifact in result.manifest["artifacts"]:
                    target = artifact["target"]
                    entry = result.report["artifacts"][target]
                    cases = {"right artifact": {**entry["faithfulness"], "structure": [
                        b for b in entry["breaches"] if b.startswith("structure")]}}
                    for case in faults(reference):
                        module, description = twin_with_fault(target, reference, recipe.targets[target],
                                                               result.bundle, artifact, case)
                        structural = get_target(target).structure(result.bundle, artifact, module)
                        with torch.no_grad():
                            report = check_artifacts(reference, {target: Twin(module, description)}, tokenizer,
                                                     recipe, result.bundle, [artifact], plan,
                                                     extra_breaches={target: structural}).report
                        cases[case] = {**report["artifacts"][target]["faithfulness"], "structure": structural}
                    for case, gate in cases.items():
                        print(line(layers, recipe_name, target, case, gate), flush=True)
                        results.append({"layers": layers, "recipe": recipe_name, "target": target, "case": case,
                                        "passed": gate["passed"], "structure": gate["structure"], "tolerances": gate["tolerances"],
                                        "spread": (gate.get("spread") or {}).get("metrics"),
                                        "metrics": {k: gate["metrics"].get(k) for k in SHOWN}})
                    # Written after every artifact: a long run stopped part way keeps what it measured.
                    args.out.mkdir(parents=True, exist_ok=True)
                    (args.out / "twin_spread.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
