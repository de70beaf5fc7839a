"""Export recipes as data: model x passes x quantisation x target, with the check's tolerances.

A recipe is a YAML file validated by pydantic (schema.py). The built-in ones live beside this
file; `load_recipe` takes a built-in name or a path.
"""
from cpm_mobile.recipes.schema import PassSpec, Recipe, TargetSpec, Tolerances, load_recipe, recipe_names

__all__ = ["PassSpec", "Recipe", "TargetSpec", "Tolerances", "load_recipe", "recipe_names"]
