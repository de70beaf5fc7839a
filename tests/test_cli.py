"""The thin CLI: defaults to the embedded models, writes what it says, refuses bad input in one line."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from cli import app
from exporter.defaults import DEFAULT_MODEL

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


def test_sparsity_refuses_a_model_without_blockffn(tmp_path):
    result = runner.invoke(app, ["sparsity", "--model", str(DEFAULT_MODEL), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert str(DEFAULT_MODEL) in result.stderr and "\n" not in result.stderr.strip()
    assert not (tmp_path / "s").exists()


def test_unknown_target_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["export", "--target", "tflite", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "choose one of" in result.output
    assert list(tmp_path.iterdir()) == []
