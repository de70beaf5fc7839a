"""Prefill then single-token decode with the static cache equals one full-sequence forward."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpm_mobile.exporter.models import greedy_generate, load_model, prompt_logits
from bench.synthetic import write_synthetic_checkpoint
from tests.conftest import TINY_BLOCKFFN, TINY_GQA, TINY_MLA

CASES = {
    "minicpm4-gqa-longrope": ("minicpm4-0.5b", TINY_GQA),
    "minicpm3-mla": ("minicpm3-4b", dict(TINY_MLA, intermediate_size=256)),
    "blockffn-mla": ("blockffn-small", TINY_BLOCKFFN),
}


@pytest.fixture(scope="module", params=list(CASES))
def model(request, tmp_path_factory):
    preset, overrides = CASES[request.param]
    folder = write_synthetic_checkpoint(tmp_path_factory.mktemp(request.param), preset, dtype="float32",
                                        vocab_size=1000, **overrides)
    return load_model(folder, max_seq_len=96)[0]


def test_prefill_plus_32_decode_steps_equals_full_forward(model):
    tokens = torch.randint(0, 1000, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    full = prompt_logits(model, tokens)
    model.reset_cache()
    rows = [model(torch.tensor([tokens[:16]]), torch.tensor([0]))[0]]
    for position in range(16, 48):
        rows.append(model(torch.tensor([[tokens[position]]]), torch.tensor([position]))[0])
    stepped = torch.cat(rows)
    assert stepped.shape == full.shape == (48, 1000)
    assert (stepped - full).abs().max().item() <= 1e-5


def test_prefill_in_uneven_chunks(model):
    tokens = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    full = prompt_logits(model, tokens)
    model.reset_cache()
    rows, start = [], 0
    for size in (7, 1, 13, 19):
        rows.append(model(torch.tensor([tokens[start:start + size]]), torch.tensor([start]))[0])
        start += size
    assert (torch.cat(rows) - full).abs().max().item() <= 1e-5


def test_stale_cache_from_a_longer_sequence_is_invisible(model):
    long = torch.randint(0, 1000, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    short = long[:10][::-1]
    prompt_logits(model, long)  # fills 60 slots
    model(torch.tensor([short]), torch.tensor([0]))  # no reset: slots 10..59 hold the old sequence
    again = model(torch.tensor([[5]]), torch.tensor([10]))[0]
    fresh = prompt_logits(model, short + [5])[-1:]
    assert (again - fresh).abs().max().item() <= 1e-5


def test_greedy_generation_uses_the_cache_consistently(model):
    run = greedy_generate(model, [1, 2, 3, 4], max_new_tokens=20)
    assert len(run.generated) == 20
    # Each greedy token is the argmax of the full-sequence forward of everything before it.
    full = prompt_logits(model, run.prompt + run.generated[:-1])
    assert full[3:].argmax(-1).tolist() == run.generated
    assert run.decode_logits.shape == (19, 1000)


def test_max_seq_len_is_enforced(model):
    with pytest.raises(Exception):
        model(torch.zeros(1, 97, dtype=torch.int64), torch.tensor([0]))


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    folder = write_synthetic_checkpoint(tmp_path_factory.mktemp("prop"), "minicpm4-0.5b", dtype="float32",
                                        vocab_size=1000, **TINY_GQA)
    return load_model(folder, max_seq_len=64)[0]


@settings(max_examples=20, deadline=None, derandomize=True)
@given(chunks=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_any_split_into_prefill_and_decode_chunks_equals_one_forward(gqa_model, chunks, seed):
    total = min(sum(chunks), 64)
    tokens = torch.randint(0, 1000, (total,), generator=torch.Generator().manual_seed(seed)).tolist()
    full = prompt_logits(gqa_model, tokens)
    gqa_model.reset_cache()
    rows, start = [], 0
    for size in chunks:
        if start >= total:
            break
        piece = tokens[start:start + size]
        rows.append(gqa_model(torch.tensor([piece]), torch.tensor([start]))[0])
        start += len(piece)
    # Chunk shapes change the GEMM blocking, so fp32 sums run in other orders: a few ulps of the
    # logits (|z| ~ 4 here), not the 1e-5 of the fixed 16 + 32 schedule above; a cache bug is O(1).
    assert (torch.cat(rows) - full).abs().max().item() <= 5e-5
