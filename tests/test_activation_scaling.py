"""Activation-aware scaling (AWQ) folded into the float model before GPTQ: every fold keeps the float model's
function on every layer kind, the scales are stored with the grid, and on a model with the activation outliers
trained LLMs have it recovers most of what 4-bit rounding loses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.outliers import write_outlier_checkpoint
from bench.presets import preset_config
from cpm_mobile.exporter.activation_scaling import _apply, folds
from cpm_mobile.exporter.calibration import (
    GRID_FILE, calibrate, calibrated_model, calibration_windows, load_grid, save_grid,
)
from cpm_mobile.exporter.defaults import DEFAULT_MODEL, HELDOUT_TEXT
from cpm_mobile.exporter.models import ModelConfig, load_model
from cpm_mobile.exporter.models.norm import RMSNorm
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.recipes.schema import CalibrationSpec
from tests.conftest import TINY_BLOCKFFN, TINY_GQA
from test_qwen35 import qwen35_checkpoint

PROMPT = torch.tensor([[1, 17, 42, 300, 5, 99, 123, 2, 60, 311, 42, 7, 250, 8, 9, 10]])


def _logits(model: CausalLM, tokens: torch.Tensor = PROMPT) -> torch.Tensor:
    model.reset_cache()
    with torch.no_grad():
        return model(tokens, torch.zeros(1, dtype=torch.int64))


def _models(tmp_path: Path) -> dict[str, CausalLM]:
    torch.manual_seed(0)
    gqa = CausalLM(ModelConfig.from_hf_dict(preset_config("minicpm4-0.5b", **TINY_GQA, vocab_size=320)), 64)
    blockffn = CausalLM(ModelConfig.from_hf_dict(preset_config("blockffn-small", **TINY_BLOCKFFN, vocab_size=320)), 64)
    hybrid, _ = load_model(qwen35_checkpoint(tmp_path / "qwen35"), max_seq_len=64)
    for model in (gqa, blockffn):
        with torch.no_grad():  # norms away from 1, so that a wrong fold into them shows
            for module in model.modules():
                if isinstance(module, RMSNorm):
                    module.weight.uniform_(0.5, 1.5)
    return {"gqa": gqa.eval(), "mla+blockffn": blockffn.eval(), "qwen35-hybrid": hybrid}


# Per layer: the folds found (attention input norm, FFN input norm, v -> o, up -> down where they exist).
FOLDS = {"gqa": [4, 4], "mla+blockffn": [2, 2], "qwen35-hybrid": [3, 3, 3, 4, 3]}


def test_every_fold_keeps_the_float_model_on_every_layer_kind(tmp_path):
    generator = torch.Generator().manual_seed(1)
    for kind, model in _models(tmp_path).items():
        before = _logits(model)
        assert [len(folds(layer)) for layer in model.layers] == FOLDS[kind], kind
        for layer in model.layers:
            for fold in folds(layer):
                width = fold.producer.weight.shape[0]
                scales = torch.exp(torch.empty(width).uniform_(-1.5, 1.5, generator=generator))
                with torch.no_grad():
                    _apply(fold, scales)
        after = _logits(model)
        scale = before.abs().max()
        assert (after - before).abs().max() <= 1e-4 * scale, (kind, float((after - before).abs().max() / scale))
        assert not torch.equal(after, before), kind  # the weights did change


def _kl(reference: CausalLM, model: CausalLM, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for window in windows:
        tokens = torch.tensor([window])
        p = F.log_softmax(_logits(reference, tokens).double(), -1)
        q = F.log_softmax(_logits(model, tokens).double(), -1)
        total += float((p.exp() * (p - q)).sum())
        count += p.shape[1]
    return total / count


@pytest.fixture(scope="module")
def outlier_grids(tmp_path_factory):
    embedded = _logits(load_model(DEFAULT_MODEL, max_seq_len=128)[0])
    model, _ = load_model(write_outlier_checkpoint(DEFAULT_MODEL, tmp_path_factory.mktemp("outliers")), max_seq_len=128)
    assert (_logits(model) - embedded).abs().max() <= 1e-4 * embedded.abs().max()  # the same function
    tokenizer = TextTokenizer.from_folder(DEFAULT_MODEL)
    ids = tokenizer.encode(HELDOUT_TEXT.read_text(encoding="utf-8"))
    heldout = [ids[i * 127:(i + 1) * 127] for i in range(4)]
    windows = calibration_windows(ids, 16, 128, tokenizer.bos_id, reserved=4 * 127)
    grids = {awq: calibrate(model, windows, CalibrationSpec(windows=16, tokens=128, sequential=False, awq=awq))
             for awq in (False, True)}
    return model, heldout, grids


def test_scaling_recovers_what_outlier_channels_cost_the_rounding(outlier_grids):
    """Measured (one-pass GPTQ on 16 x 128 calibration tokens, KL on 4 x 127 held-out tokens): 2.4e-2 without
    scaling, 6.3e-3 with. The embedded model itself (no outliers): 3.9e-3 without, 4.3e-3 with at this small
    calibration; at the shipped recipes' (bench.quality) scaling lowers it (recipes/int4*.yaml)."""
    model, heldout, grids = outlier_grids
    plain, scaled = (_kl(model, calibrated_model(model, grids[awq]), heldout) for awq in (False, True))
    assert scaled < 0.5 * plain, (scaled, plain)
    # The outlier channels were scaled back: every stored norm gain is far flatter than the outlier model's.
    for name, gain in grids[True].floats.items():
        original = dict(model.named_parameters())[name]
        assert float(gain.abs().max() / gain.abs().median()) < 0.5 * float(original.abs().max() / original.abs().median()), name


def test_the_scaled_norms_are_stored_with_the_grid_and_rebuild_the_same_model(outlier_grids, tmp_path):
    model, heldout, grids = outlier_grids
    grid = grids[True]
    assert sorted(grid.floats) == sorted(f"layers.{i}.{norm}.weight" for i in range(len(model.layers))
                                         for norm in ("input_layernorm", "post_attention_layernorm"))
    assert grid.source.startswith("awq + gptq")
    save_grid(grid, tmp_path / GRID_FILE)
    loaded = load_grid(tmp_path / GRID_FILE)
    assert list(loaded.floats) == list(grid.floats)
    assert all(torch.equal(loaded.floats[name], grid.floats[name]) for name in grid.floats)
    rebuilt, direct = calibrated_model(model, loaded), calibrated_model(model, grid)
    assert torch.equal(rebuilt.layers[2].input_layernorm.weight, grid.floats["layers.2.input_layernorm.weight"])
    assert torch.equal(_logits(rebuilt), _logits(direct))
    assert not torch.equal(model.layers[2].input_layernorm.weight, rebuilt.layers[2].input_layernorm.weight)
    assert load_grid_without_floats(tmp_path, grids[False]).floats == {}


def load_grid_without_floats(folder: Path, grid):
    path = folder / "plain.safetensors"
    save_grid(grid, path)
    return load_grid(path)
