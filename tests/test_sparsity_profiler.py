"""The BlockFFN sparsity profiler against hand-computed TLS / CLS values."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cpm_mobile import exporter
from cpm_mobile.exporter.analysis.sparsity import (
    profile_sparsity,
    render_table,
    sparsity_metrics,
    write_expert_firing_png,
    write_heatmap_png,
)
from cpm_mobile.exporter.errors import InputError
from bench.synthetic import random_state, write_checkpoint

EMBEDDED = Path(exporter.__file__).parent / "embedded"
TOKENIZER = EMBEDDED / "blockffn-tiny" / "tokenizer.json"
TEXT = (
    "The if statement is used for conditional execution. It selects exactly one of the suites by "
    "evaluating the expressions one by one until one is found to be true; then that suite is executed."
)


def pattern(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# -- the metric on hand-built patterns ------------------------------------------------------------


def test_all_idle_is_fully_sparse():
    tls, cls = sparsity_metrics(torch.zeros(64, 8, dtype=torch.bool))
    assert tls == 1.0
    assert all(v == 1.0 for v in cls.values())


def test_all_active_is_dense():
    tls, cls = sparsity_metrics(torch.ones(64, 8, dtype=torch.bool))
    assert tls == 0.0
    assert all(v == 0.0 for v in cls.values())


def test_one_expert_always_on():
    active = torch.zeros(64, 8, dtype=torch.bool)
    active[:, 3] = True
    tls, cls = sparsity_metrics(active)
    assert tls == pytest.approx(7 / 8)
    assert cls == {s: pytest.approx(7 / 8) for s in (1, 2, 4, 8, 16, 32, 64)}


def test_alternating_experts_lose_chunk_sparsity():
    # token t fires expert t % 2 of 4: one of four per token, but every 2-token chunk needs two.
    active = torch.zeros(16, 4, dtype=torch.bool)
    active[torch.arange(16), torch.arange(16) % 2] = True
    tls, cls = sparsity_metrics(active, (1, 2, 4, 8))
    assert tls == pytest.approx(0.75)
    assert cls[1] == pytest.approx(0.75)
    assert cls[2] == pytest.approx(0.5)
    assert cls[4] == cls[8] == pytest.approx(0.5)
    assert cls[1] > cls[2]


def test_hand_computed_small_pattern():
    active = pattern(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 1, 0],
            [1, 0, 0, 0],  # tail: dropped for chunks of 2 and 4
        ]
    )
    tls, cls = sparsity_metrics(active, (1, 2, 4, 8))
    assert tls == pytest.approx(1 - 5 / 20)
    assert cls[1] == pytest.approx(1 - 4 / 16)  # CLS_1 counts whole chunks only: the tail token is dropped
    assert cls[2] == pytest.approx(1 - 3 / 8)  # chunk {0,1}: experts 0,1; chunk {2,3}: expert 2
    assert cls[4] == pytest.approx(1 - 3 / 4)
    assert cls[8] != cls[8]  # no complete chunk: NaN


def test_matches_a_brute_force_count():
    generator = torch.Generator().manual_seed(0)
    active = torch.rand(100, 12, generator=generator) < 0.2
    tls, cls = sparsity_metrics(active, (1, 3, 8))
    assert tls == pytest.approx(1 - active.sum().item() / active.numel())
    for size in (1, 3, 8):
        chunks = [active[i : i + size] for i in range(0, 100 - size + 1, size)]
        union = sum(int(c[:, e].any()) for c in chunks for e in range(12))
        assert cls[size] == pytest.approx(1 - union / (len(chunks) * 12))


def test_rejects_bad_patterns():
    with pytest.raises(ValueError):
        sparsity_metrics(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError):
        sparsity_metrics(torch.zeros(0, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        sparsity_metrics(torch.zeros(4, 4, dtype=torch.bool), (0,))


# -- end to end on synthetic checkpoints with hand-set routers -------------------------------------

EXPERTS = 8


def blockffn_config() -> dict:
    return {
        "model_type": "minicpm",
        "ffn_type": "block_linear",
        "router_act": "relu",
        "norm_after_router": "rms",
        "num_experts": EXPERTS,
        "expert_size": 4,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
        "max_position_embeddings": 64,
        "scale_emb": 12,
        "dim_model_base": 16,
        "scale_depth": 1.4,
        "tie_word_embeddings": True,
    }


def write_model(folder: Path, config: dict, edit=None) -> Path:
    state = random_state(config, seed=3)
    if edit:
        edit(state)
    write_checkpoint(folder, config, state, dtype="float32")
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    return folder


def test_zero_router_is_fully_sparse(tmp_path):
    def zero_router(state):
        for name in state:
            if name.endswith("router_proj.weight"):
                state[name].zero_()

    folder = write_model(tmp_path / "m", blockffn_config(), zero_router)
    profile = profile_sparsity(folder, TEXT, chunk_sizes=(1, 8))
    assert len(profile.layers) == 2
    assert profile.mean_tls == 1.0
    assert profile.mean_cls(8) == 1.0


def test_exactly_one_expert_per_token(tmp_path):
    # Identical embedding rows make every position's hidden state the same at every layer; a router
    # whose expert 0 row is w and expert 1 row is -w then fires exactly one of them for every token.
    def constant_inputs(state):
        generator = torch.Generator().manual_seed(1)
        embed = state["model.embed_tokens.weight"]
        embed[:] = torch.randn(embed.shape[1], generator=generator) / 12
        for name in state:
            if name.endswith("router_proj.weight"):
                w = torch.randn(state[name].shape[1], generator=generator)
                state[name].zero_()
                state[name][0], state[name][1] = w, -w

    folder = write_model(tmp_path / "m", blockffn_config(), constant_inputs)
    profile = profile_sparsity(folder, TEXT * 3, chunk_sizes=(1, 2, 4, 8, 16), max_seq_len=32)
    assert profile.tokens > 64  # several windows of the cached forward
    for layer in profile.layers:
        assert layer.tls == pytest.approx(1 - 1 / EXPERTS)
        assert all(v == pytest.approx(1 - 1 / EXPERTS) for v in layer.cls.values())
        assert sorted(layer.expert_rates, reverse=True) == [1.0] + [0.0] * (EXPERTS - 1)


def test_random_router_profile_is_consistent(tmp_path):
    folder = write_model(tmp_path / "m", blockffn_config())
    profile = profile_sparsity(folder, TEXT, max_tokens=30)
    assert profile.tokens == 30 and profile.num_experts == EXPERTS
    for layer in profile.layers:
        values = [layer.cls[s] for s in (1, 2, 4, 8, 16)]
        assert values == sorted(values, reverse=True)  # unions only grow with the chunk
        assert 0.0 <= layer.cls[16] <= layer.tls <= 1.0
        assert layer.cls[64] != layer.cls[64]  # fewer tokens than one chunk: NaN
    data = json.loads(profile.to_json())
    assert data["layers"][0]["cls"]["8"] == profile.layers[0].cls[8]
    assert data["mean"]["tls"] == pytest.approx(profile.mean_tls)
    assert data["layers"][0]["cls"]["64"] is None and data["mean"]["cls"]["64"] is None
    table = render_table(profile)
    assert table.row_count == len(profile.layers) + 1
    assert len(table.columns) == 2 + len(profile.chunk_sizes)
    heatmap = write_heatmap_png(profile, tmp_path / "heat.png")
    firing = write_expert_firing_png(folder, TEXT, tmp_path / "firing.png", layer=1, max_tokens=24)
    for png in (heatmap, firing):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="out of range"):
        write_expert_firing_png(folder, TEXT, tmp_path / "x.png", layer=5)


def test_dense_model_is_refused(tmp_path):
    config = {k: v for k, v in blockffn_config().items() if k not in ("ffn_type", "router_act", "norm_after_router", "num_experts", "expert_size")}
    folder = write_model(tmp_path / "dense", {**config, "intermediate_size": 64})
    with pytest.raises(InputError, match="no BlockFFN layers") as error:
        profile_sparsity(folder, TEXT)
    assert error.value.path == folder


def test_missing_tokenizer_is_an_input_error(tmp_path):
    folder = write_model(tmp_path / "m", blockffn_config())
    (folder / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="tokenizer.json"):
        profile_sparsity(folder, TEXT)
