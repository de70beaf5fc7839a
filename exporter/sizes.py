"""What each recipe's artifacts weigh, predicted from the checkpoint's shapes alone (no export, no tracing).

Per stored tensor: codes x bits / 8 + scales (in the dtype the format stores them) + zero points,
plus every unquantised tensor (norms, biases, RoPE tables, unquantised embedding / lm_head) in the
format's float dtype, plus the format's own overhead (graph, program). The shapes come from a
CausalLM built on the meta device (free for any size); which tensor gets which bits, block and scale
dtype is each target's own rule (exporter/targets/<name>/size.py, following its quantiser). The
passes a recipe applies (blockffn_sparse) regroup weights without changing what is stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from cpm_mobile.exporter.calibration import calibrated_spec, with_planned_grid
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.config import ModelConfig
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.passes import apply_passes
from cpm_mobile.exporter.targets import registry
from cpm_mobile.recipes.schema import load_recipe, recipe_names


@dataclass(frozen=True)
class ArtifactSize:
    recipe: str
    target: str
    bytes: int
    fp32_ratio: float | None  # against the fp32 recipe's artifact of the same target


def shape_model(config: ModelConfig, tied: bool, max_seq_len: int) -> CausalLM:
    """The CausalLM of this config on the meta device: every parameter's and buffer's shape, no memory."""
    with torch.device("meta"):
        model = CausalLM(config, max_seq_len=max_seq_len)
    if tied:
        model.tie_embeddings()
    return model


def state_bytes(config: ModelConfig, max_seq_len: int) -> int:
    """Bytes of the decoding state at max_seq_len as the fp32 module holds it: every attention layer's KV cache
    (grows with max_seq_len) and every linear-attention layer's conv and recurrent state (does not). A format may
    hold it in another dtype (Core ML: fp16 states) or layout (the artifact's io.cache says which)."""
    caches = shape_model(config, tied=False, max_seq_len=max_seq_len).kv_caches
    return sum(t.numel() * t.element_size() for t in caches.buffers())


def predict_bytes(model: CausalLM, spec: Any) -> int:
    """The artifact's size in bytes for one target spec of a recipe."""
    return registry.size_rule(spec.target)(model, spec)


def recipe_sizes(config: ModelConfig, tied: bool, recipes: Iterable[str] | None = None) -> list[ArtifactSize]:
    """One row per (recipe, target) of the recipes (default: the shipped ones) that run on this model;
    a recipe whose passes refuse the model (fp32-sparse on a dense FFN), or that needs a weight grid the
    checkpoint lacks, has no rows."""
    fp32 = load_recipe("fp32")
    baseline = {target: predict_bytes(shape_model(config, tied, fp32.max_seq_len), spec)
                for target, spec in fp32.targets.items()}
    rows = []
    for name in recipes or recipe_names():
        recipe = load_recipe(name)
        if recipe.weights == "checkpoint_grid" and config.weight_grid is None or recipe.vision_language:
            continue  # no grid to carry, or a vision-language recipe (the text models here have no vision half)
        if recipe.calibration is not None and config.weight_grid is not None:
            continue  # a calibration recipe refuses a checkpoint that already carries a grid
        model = with_planned_grid(shape_model(config, tied, recipe.max_seq_len), recipe)
        try:
            # A calibration recipe's artifacts carry its grid: the grid's group size and symmetry in each spec.
            sizes = {}
            for target, spec in recipe.targets.items():
                applied = apply_passes(model, [*recipe.passes, *spec.passes], target)
                spec = calibrated_spec(spec, recipe.calibration)
                if not registry.get_target(target).validate(applied, spec):  # a target refusing the model: no row
                    sizes[target] = predict_bytes(applied, spec)
        except InputError:
            continue
        rows += [ArtifactSize(recipe.name, target, size, size / baseline[target] if target in baseline else None)
                 for target, size in sizes.items()]
    return rows
