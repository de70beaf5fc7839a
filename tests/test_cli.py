"""The thin CLI: defaults to the embedded models, writes what it says, refuses bad input in one line."""
from __future__ import annotations

import json

from typer.testing import CliRunner

import yaml

from cpm_mobile.cli import app
from cpm_mobile.exporter.defaults import DEFAULT_MODEL
from cpm_mobile.recipes import load_recipe, recipe_names
from cpm_mobile.recipes.schema import recipe_from_dict

runner = CliRunner()


def test_inspect_defaults_to_the_embedded_model():
    result = runner.invoke(app, ["inspect", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["path"] == str(DEFAULT_MODEL) and facts["family"] == "minicpm" and facts["attention"] == "gqa"


def test_sparsity_writes_json_and_pngs(tmp_path):
    out = tmp_path / "sparsity"
    result = runner.invoke(app, ["sparsity", "--out", str(out), "--max-tokens", "512"])
    assert result.exit_code == 0, result.output
    profile = json.loads((out / "sparsity.json").read_text())
    assert profile["tokens"] == 512 and len(profile["layers"]) == 4
    for png in ("sparsity_heatmap.png", "expert_firing.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CLS_8" in result.stdout
    table = [line for line in result.stdout.splitlines() if not line.startswith("written: ")]
    assert max(len(line) for line in table) <= 80  # the paths print whole, one per line
    assert f"written: {out / 'sparsity.json'}" in result.stdout


def test_sparsity_refuses_a_model_without_blockffn(tmp_path):
    result = runner.invoke(app, ["sparsity", "--model", str(DEFAULT_MODEL), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert str(DEFAULT_MODEL) in result.stderr and "\n" not in result.stderr.strip()
    assert not (tmp_path / "s").exists()


def test_unknown_target_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["export", "--target", "tflite", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "'tflite' is not one of 'executorch', 'onnx', 'coreml', 'all'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"cpm-mobile {version('cpm-mobile')}\n"


def test_help_lists_choices_and_recipes():
    result = runner.invoke(app, ["export", "--help"], terminal_width=100)
    assert result.exit_code == 0
    assert "executorch|onnx|coreml|all" in result.stdout
    for name in recipe_names():
        assert name in result.stdout
    commands = runner.invoke(app, ["--help"]).stdout
    for command in ("inspect", "export", "check", "generate", "sparsity", "recipes"):
        assert command in commands


def test_recipes_lists_every_builtin_in_80_columns():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for name in recipe_names():
        recipe = load_recipe(name)
        row = next(line for line in result.stdout.splitlines() if line.strip().startswith(name + " "))
        assert ", ".join(recipe.targets) in row


def test_recipes_show_prints_the_recipe_file():
    result = runner.invoke(app, ["recipes", "show", "coreml-fp16"])
    assert result.exit_code == 0
    assert recipe_from_dict(yaml.safe_load(result.stdout)) == load_recipe("coreml-fp16")
    unknown = runner.invoke(app, ["recipes", "show", "fp64"])
    assert unknown.exit_code == 2 and unknown.stderr.count("\n") == 1 and "fp32" in unknown.stderr


def test_inspect_table_fits_80_columns():
    result = runner.invoke(app, ["inspect"])
    assert result.exit_code == 0 and max(len(line) for line in result.stdout.splitlines()) <= 80


def test_progress_clock_keeps_running_after_a_stage_completes():
    from rich.progress import Progress

    from cpm_mobile.cli import _Elapsed

    column = _Elapsed()
    progress = Progress(column, disable=True)
    task = progress.add_task("export onnx", total=1.0)
    progress.update(task, completed=1.0)  # rich's own clock freezes here
    column.started -= 75  # as if the export had run for 75 s since
    assert str(column.render(progress.tasks[0])) == "0:01:15"


def test_an_error_after_the_progress_started_is_one_line(tmp_path):
    from bench.synthetic import write_synthetic_checkpoint
    from tests.conftest import TINY_GQA

    folder = write_synthetic_checkpoint(tmp_path / "m", "minicpm4-0.5b", vocab_size=400, **TINY_GQA)
    result = runner.invoke(app, ["export", "--model", str(folder), "--target", "onnx", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "tokenizer.json not found" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # no progress frame above the error
    assert not (tmp_path / "o").exists()


def test_every_refusal_of_every_target_is_said_before_any_work(tmp_path):
    """Blocks of 128 divide none of minicpm-tiny's widths (192): all three targets refuse int4 so, and say so at once
    (int4 without its calibration: each target rounds on its own blocks)."""
    recipe = load_recipe("int4").model_dump(mode="json")
    recipe["calibration"] = None
    recipe["targets"]["executorch"]["quantization"]["group_size"] = 128
    recipe["targets"]["onnx"]["quantization"]["block_size"] = 128
    recipe["targets"]["coreml"]["quantization"]["group_size"] = 128
    for spec in recipe["targets"].values():
        spec.pop("target", None)
    path = tmp_path / "blocks128.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--recipe", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 3, result.stderr
    for target in ("executorch", "onnx", "coreml"):
        [line] = [line for line in lines if f"{target} target: " in line]
        assert "128 does not divide" in line, line
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())  # nothing built, nothing staged


def test_a_pass_two_targets_cannot_take_is_refused_for_both(tmp_path):
    recipe = load_recipe("fp32-sparse").model_dump(mode="json")
    for spec in recipe["targets"].values():
        spec.pop("target", None)
    recipe["targets"]["coreml"] = {"passes": [{"name": "blockffn_sparse"}], "faithfulness": {}, "fidelity": {}}
    path = tmp_path / "sparse-all.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["export", "--recipe", str(path), "--out", str(tmp_path / "out")])  # dense minicpm-tiny
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 3, result.stderr
    assert sum("needs a model with BlockFFN layers" in line for line in lines) == 2
    assert any("coreml target: the 'blockffn_sparse' pass is not supported" in line for line in lines)
