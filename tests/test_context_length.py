"""`export --max-seq-len N`: the context a user chooses, held by every artifact, stated with its memory."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from cpm_mobile.cli import app
from cpm_mobile.exporter.defaults import DEFAULT_MODEL
from cpm_mobile.exporter.models.loader import load_checkpoint
from cpm_mobile.exporter.sizes import state_bytes

runner = CliRunner()


def test_export_holds_the_chosen_context_and_states_its_memory(tmp_path):
    result = runner.invoke(app, ["export", "-t", "onnx", "--max-seq-len", "384", "--out", str(tmp_path),
                                 "--name", "c384"])
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "c384"
    manifest = json.loads((bundle / "manifest.json").read_text())
    config = load_checkpoint(DEFAULT_MODEL).config
    # keys and values of every layer's KV heads in fp32, as the module holds them (minicpm-tiny: 3 kB a token)
    per_token = state_bytes(config, 2) - state_bytes(config, 1)
    assert per_token == config.num_layers * 2 * config.num_kv_heads * config.head_dim * 4
    assert manifest["model"]["max_seq_len"] == 384 and manifest["model"]["state_bytes"] == 384 * per_token
    assert manifest["recipe"]["max_seq_len"] == 384  # `cpm-mobile check` rebuilds the reference at that context
    [artifact] = manifest["artifacts"]
    assert artifact["io"]["max_seq_len"] == 384
    again = runner.invoke(app, ["check", str(bundle)])
    assert again.exit_code == 0, again.output
    facts = json.loads(runner.invoke(app, ["inspect", str(DEFAULT_MODEL), "--json"]).stdout)
    assert facts["state_bytes_per_token"] == per_token and facts["state_bytes_fixed"] == 0


def test_a_context_the_model_cannot_hold_is_refused_before_work(tmp_path):
    result = runner.invoke(app, ["export", "--max-seq-len", "100000", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "100000 not supported: must be in 1..512" in result.output
    result = runner.invoke(app, ["export", "--max-seq-len", "4", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--max-seq-len: 4 is not a context length" in result.output
    assert list(tmp_path.iterdir()) == []
