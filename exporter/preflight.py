"""Pre-flight: every requested target judges the recipe against the checkpoint before any module is built
or any artifact written, and everything refused is said at once (one line per refusal, exit 2)."""
from __future__ import annotations

from pathlib import Path

from cpm_mobile.exporter.errors import InputError, Refused
from cpm_mobile.exporter.models.config import ModelConfig
from cpm_mobile.exporter.passes import apply_passes, pass_refusals
from cpm_mobile.exporter.sizes import shape_model
from cpm_mobile.exporter.targets.registry import get_target
from cpm_mobile.recipes.schema import Recipe


def recipe_refusals(recipe: Recipe, config: ModelConfig, tied: bool, vision_language: bool = False) -> list[str]:
    """Every reason the recipe cannot be exported from a checkpoint of this config (and weight grid).

    The targets judge a model of the checkpoint's shapes on the meta device (no weights), with the
    recipe's passes applied as the export would apply them. vision_language: `config` is the LLM of a
    vision-language checkpoint (whose vision half takes the recipe's vision and slicing settings)."""
    if recipe.vision_language and not vision_language:  # nothing else of the recipe applies to a text model
        return [f"recipe {recipe.name} is for vision-language checkpoints (it sets the vision encoder's grid or "
                "the image slicing), and this checkpoint is a text model"]
    refusals = []
    if recipe.weights == "checkpoint_grid" and config.weight_grid is None:
        refusals.append(f"recipe {recipe.name} exports a checkpoint's own integer grid, and this checkpoint's "
                        "weights lie on none (see `cpm-mobile inspect`): use int4 or ternary to quantise it")
    shapes = shape_model(config, tied, recipe.max_seq_len)
    if recipe.calibration is not None:
        # The targets judge the grid calibration will give (its names, group size, symmetry) as they judge a
        # checkpoint's own grid.
        from cpm_mobile.exporter.calibration import calibration_refusals, with_planned_grid

        found = calibration_refusals(recipe, shapes)
        if found:
            return refusals + found
        shapes = with_planned_grid(shapes, recipe)
    for name, spec in recipe.targets.items():
        passes = [*recipe.passes, *spec.passes]
        found = pass_refusals(passes, name)
        if not found:
            try:
                found = get_target(name).validate(apply_passes(shapes, passes, name), spec)
            except InputError as error:  # a pass that refuses this model (sparse on a dense FFN)
                found = [error.problem]
        refusals += [f"{name} target: {reason}" for reason in found]
    return refusals


def preflight(recipe: Recipe, config: ModelConfig, tied: bool, source: str | Path,
              vision_language: bool = False) -> None:
    refusals = recipe_refusals(recipe, config, tied, vision_language)
    if refusals:
        raise Refused(source, refusals)
