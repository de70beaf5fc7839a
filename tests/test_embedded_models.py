"""The fixture models shipped in exporter/embedded: they load, fit the size budget, and learned what
they were trained for (language for both, activation sparsity for BlockFFN)."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from cpm_mobile import exporter
from cpm_mobile.exporter.analysis.sparsity import profile_sparsity
from cpm_mobile.exporter.models import load_model
from bench.training.evaluate import greedy_text, perplexity

EMBEDDED = Path(exporter.__file__).parent / "embedded"
MODELS = ("minicpm-tiny", "blockffn-tiny")
SIZE_BUDGET = 10_000_000  # bytes, all of exporter/embedded
EVAL_TOKENS = 4096  # a prefix of heldout.txt keeps the tests fast


@lru_cache(maxsize=None)
def heldout() -> str:
    return (EMBEDDED / "heldout.txt").read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def model(name: str):
    return load_model(EMBEDDED / name)


@lru_cache(maxsize=None)
def tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_file(str(EMBEDDED / name / "tokenizer.json"))


def test_embedded_folder_fits_the_size_budget():
    total = sum(p.stat().st_size for p in EMBEDDED.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total <= SIZE_BUDGET, f"exporter/embedded holds {total} bytes"
    for name in ("heldout.txt", "TRAINING.md"):
        assert (EMBEDDED / name).is_file()


@pytest.mark.parametrize("name", MODELS)
def test_model_folder_is_a_complete_hf_checkpoint(name):
    folder = EMBEDDED / name
    for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / file).is_file(), file
    module, checkpoint = model(name)
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] in ("bfloat16", "float16")
    assert checkpoint.tied and module.max_seq_len == 512
    assert checkpoint.config.attention == "gqa" and checkpoint.config.num_kv_heads < checkpoint.config.num_heads
    assert checkpoint.config.scale_emb != 1 and checkpoint.config.scale_depth and checkpoint.config.dim_model_base
    assert checkpoint.config.ffn == ("blockffn" if name.startswith("blockffn") else "gated")


def test_backbones_match_and_parameter_counts_are_close():
    mini, block = model("minicpm-tiny")[1], model("blockffn-tiny")[1]
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "scale_emb", "scale_depth"):
        assert getattr(mini.config, field) == getattr(block.config, field)
    sizes = [sum(t.numel() for t in c.state.values()) for c in (mini, block)]
    assert abs(sizes[0] - sizes[1]) / sizes[0] < 0.05


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_round_trips_text(name):
    tok = tokenizer(name)
    samples = [heldout()[:2000], "Tabs\tand  double  spaces,\r\nunicode: naïve café 🤖 ∑ — “quotes”.", " leading space\n"]
    for text in samples:
        encoding = tok.encode(text)
        assert encoding.ids[0] == 1  # <s> prepended, as MiniCPM's add_bos_token
        assert tok.decode(encoding.ids, skip_special_tokens=True) == text
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2, 3, 4]
    assert 4096 <= tok.get_vocab_size() <= 8192
    config = json.loads((EMBEDDED / name / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["add_bos_token"] is True and "<|im_start|>" in config["chat_template"]
    assert config["model_max_length"] == 512


def test_blockffn_fixture_is_sparse_on_heldout_text():
    profile = profile_sparsity(EMBEDDED / "blockffn-tiny", heldout(), max_tokens=EVAL_TOKENS)
    assert profile.tokens == EVAL_TOKENS
    assert profile.mean_tls >= 0.80, profile.to_json()
    assert profile.mean_cls(8) >= 0.60, profile.to_json()


def test_heldout_perplexities_are_close():
    ppl = {}
    for name in MODELS:
        ids = tokenizer(name).encode(heldout()).ids[:EVAL_TOKENS]
        ppl[name] = perplexity(model(name)[0], ids)
    assert ppl["minicpm-tiny"] < 200, ppl  # learned the language (a uniform guess is 4096)
    assert ppl["blockffn-tiny"] <= 1.10 * ppl["minicpm-tiny"], ppl


@lru_cache(maxsize=None)
def known_words() -> frozenset[str]:
    from bench.training.corpus import build_corpus

    corpus = build_corpus()
    return frozenset(re.findall(r"[a-z]+", (corpus.train_text + corpus.heldout_text).lower()))


@pytest.mark.parametrize("name", MODELS)
def test_greedy_continuation_is_mostly_real_words(name):
    text = heldout()[:120]
    prompt = text[: text.rfind(" ")]
    continuation = greedy_text(model(name)[0], tokenizer(name), prompt, max_new_tokens=40)
    words = re.findall(r"[A-Za-z]+", continuation)
    assert len(words) >= 8, continuation
    real = [w for w in words if w.lower() in known_words()]
    assert len(real) / len(words) >= 0.8, continuation
    assert len(set(w.lower() for w in words)) >= 4, continuation  # not one word repeated
