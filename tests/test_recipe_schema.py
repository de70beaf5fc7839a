"""Recipes are typed per target: a typo anywhere is a one-line error naming the field and what is allowed."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.recipes import load_recipe, recipe_names
from cpm_mobile.recipes.schema import recipe_from_dict
from cpm_mobile.exporter.targets.coreml.spec import CoreMLSpec
from cpm_mobile.exporter.targets.executorch.spec import ExecuTorchSpec
from cpm_mobile.exporter.targets.onnx.spec import OnnxSpec

GATES = {"faithfulness": {}, "fidelity": {}}


def _recipe(target: str, **spec) -> dict:
    return {"name": "t", "targets": {target: {**GATES, **spec}}, "check": {"prompts": ["a"]}}


def _error(data: dict) -> str:
    with pytest.raises(InputError) as raised:
        recipe_from_dict(data, "r.yaml")
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_builtin_recipes_validate_into_typed_specs():
    types = {"executorch": ExecuTorchSpec, "onnx": OnnxSpec, "coreml": CoreMLSpec}
    for name in recipe_names():
        recipe = load_recipe(name)
        for target, spec in recipe.targets.items():
            assert type(spec) is types[target]
            assert spec.faithfulness is not None and spec.fidelity is not None


@pytest.mark.parametrize("target, field, allowed", [
    ("executorch", "atention", "attention, backend"),
    ("onnx", "opsett", "external_data_threshold_bytes, opset, pad_mla_values"),
    ("coreml", "deployment", "deployment_target"),
])
def test_a_misspelt_option_names_the_field_and_the_allowed_ones(target, field, allowed):
    message = _error(_recipe(target, options={field: 1}))
    assert f"targets.{target}.options.{field}" in message and f"allowed: {allowed}" in message


@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_a_misspelt_tolerance_or_spec_field_is_refused(target):
    assert f"targets.{target}.faithfulness.max_kll" in _error(_recipe(target, faithfulness={"max_kll": 1}))
    assert f"targets.{target}.tolerances" in _error({**_recipe(target), "targets": {target: {"tolerances": {}, **GATES}}})
    assert f"targets.{target}.fidelity" in _error({**_recipe(target), "targets": {target: {"faithfulness": {}}}})


@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_an_unknown_quantisation_scheme_is_refused(target):
    message = _error(_recipe(target, quantization={"scheme": "int3"}))
    assert f"targets.{target}.quantization" in message


@pytest.mark.parametrize("target, value", [("executorch", {"backend": "vulkan"}), ("coreml", {"deployment_target": "iOS17"}),
                                           ("onnx", {"opset": 13})])
def test_an_unsupported_option_value_is_refused(target, value):
    field = next(iter(value))
    assert f"targets.{target}.options.{field}" in _error(_recipe(target, options=value))


def test_precisions_per_target():
    assert "precision" in _error(_recipe("executorch", precision="fp16"))
    recipe_from_dict(_recipe("coreml", precision="fp16"))
    recipe_from_dict(_recipe("onnx", precision="fp16"))


def test_cli_exits_2_with_one_line_on_a_misspelt_option(tmp_path):
    path = tmp_path / "bad.yaml"
    data = yaml.safe_load(open(load_recipe.__globals__["RECIPES_DIR"] / "fp32.yaml"))
    data["targets"]["onnx"]["options"]["opsett"] = 20
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "cli", "export", "--recipe", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {path}: invalid recipe: targets.onnx.options.opsett: unknown field 'opsett' "
                     "(allowed: external_data_threshold_bytes, opset, pad_mla_values)"], done.stderr
    assert not (tmp_path / "out").exists()
