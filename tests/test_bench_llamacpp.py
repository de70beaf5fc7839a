"""The llama.cpp peer's gatekeeping: which checkpoints and tokenizers it takes, before any tool runs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import llamacpp
from bench.run import with_ratios
from cpm_mobile.exporter.defaults import EMBEDDED



def test_blockffn_is_refused_with_the_reason():
    with pytest.raises(llamacpp.UnsupportedModel, match="blockffn-tiny: BlockFFN's FFN is not a llama.cpp architecture"):
        llamacpp.check_supported(EMBEDDED / "blockffn-tiny")
    llamacpp.check_supported(EMBEDDED / "minicpm-tiny")


def test_only_a_gpt2_byte_level_tokenizer_takes_the_gpt2_vocab_path(tmp_path):
    llamacpp._require_gpt2_pretokenizer(EMBEDDED / "minicpm-tiny" / "tokenizer.json")
    spec = json.loads((EMBEDDED / "minicpm-tiny" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit, match="not a GPT-2 byte-level BPE tokenizer"):
        llamacpp._require_gpt2_pretokenizer(tmp_path / "tokenizer.json")


def test_a_checkpoint_without_tokenizer_borrows_the_embedded_one(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    shutil.copy(EMBEDDED / "minicpm-tiny" / "config.json", checkpoint / "config.json")
    folder = llamacpp._with_tokenizer(checkpoint, tmp_path / "staging")
    assert (folder / "config.json").resolve() == (checkpoint / "config.json").resolve()
    assert (folder / "tokenizer.json").read_bytes() == (EMBEDDED / "minicpm-tiny" / "tokenizer.json").read_bytes()
    assert llamacpp._with_tokenizer(EMBEDDED / "minicpm-tiny", tmp_path) == EMBEDDED / "minicpm-tiny"


def test_ratios_are_against_eager_of_the_same_run():
    row = with_ratios({"decode_tok_per_s": 30.0, "prefill_tok_per_s": 200.0}, {"decode_tok_per_s": 10.0,
                                                                               "prefill_tok_per_s": 100.0})
    assert row["decode_speedup"] == 3.0 and row["prefill_speedup"] == 2.0


def test_only_the_sdist_itself_is_taken_from_source(tmp_path, monkeypatch):
    """`--no-binary :all:` would build cmake and scikit-build-core from source before llama.cpp (10+ minutes)."""
    calls = []
    monkeypatch.setattr(llamacpp, "_run", lambda command, *a, **k: calls.append(command))
    (tmp_path / "llama_cpp_python-0.3.0.tar.gz").touch()
    assert llamacpp._download(tmp_path, lambda message: None).name == "llama_cpp_python-0.3.0.tar.gz"
    [command] = calls
    assert command[command.index("--no-binary") + 1] == "llama-cpp-python" and ":all:" not in command
