"""Tokenizers as the releases ship them: a sentencepiece tokenizer.model converted exactly, special
tokens at their declared ids, the bundle's files read alike by every client, bad sizes refused."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from cpm_mobile.exporter.defaults import HELDOUT_TEXT
from cpm_mobile.exporter.errors import InputError
from bench.synthetic import write_synthetic_checkpoint
from cpm_mobile.exporter.tokenizer import TextTokenizer
from tests.conftest import TINY_GQA

ROOT = Path(__file__).resolve().parents[1]
BASE_VOCAB = 1000
# MiniCPM4's added tokens, at the ids after the sentencepiece vocabulary (73440.. in the release).
ADDED = ["<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>", "<|execute_end|>",
         "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Not in the training half; exercises byte fallback (characters the model never saw) and space runs.
EXTRA_TEXTS = ["naïve café — 東京 ∑ x² 🙂", "  leading spaces", "tabs\tand\n\n\nnewlines   ", "a  b   c    d"]


def _halves() -> tuple[str, str]:
    text = HELDOUT_TEXT.read_text(encoding="utf-8")
    return text[: len(text) // 2], text[len(text) // 2 :]


def write_sentencepiece_tokenizer(folder: Path, user_defined: tuple[str, ...] = ()) -> Path:
    """A real LlamaTokenizer-style sentencepiece BPE (Llama's trainer settings) in MiniCPM's file layout."""
    train, _ = _halves()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        user_defined_symbols=list(user_defined),
        sentence_iterator=iter(train.splitlines()), model_writer=model, vocab_size=BASE_VOCAB, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    names = {0: "<unk>", 1: "<s>", 2: "</s>", **{BASE_VOCAB + i: t for i, t in enumerate(ADDED)}}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|im_end|>",
        "unk_token": "<unk>", "pad_token": None, "legacy": True, "tokenizer_class": "LlamaTokenizer",
        "sp_model_kwargs": {}, "model_max_length": 1000000000000000019884624838656, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": t, **special} for i, t in names.items()},
        "chat_template": CHAT_TEMPLATE,
    }))
    (folder / "added_tokens.json").write_text(json.dumps({t: BASE_VOCAB + i for i, t in enumerate(ADDED)}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "additional_special_tokens": ADDED[:2],
    }))
    return folder


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory) -> Path:
    return write_sentencepiece_tokenizer(tmp_path_factory.mktemp("spm"))


def _heldout_texts() -> list[str]:
    _, heldout = _halves()
    return [p for p in heldout.split("\n\n") if p.strip()] + EXTRA_TEXTS


def test_converted_tokenizer_encodes_and_decodes_as_sentencepiece(spm_folder):
    sp = spm.SentencePieceProcessor(model_file=str(spm_folder / "tokenizer.model"))
    ours = TextTokenizer.from_folder(spm_folder)
    texts = _heldout_texts()
    assert len(texts) > 400
    mismatched = [t for t in texts if ours.encode(t) != [1, *sp.encode(t)]]
    assert not mismatched, mismatched[:3]
    undecoded = [t for t in texts if ours.decode(ours.encode(t)) != sp.decode(sp.encode(t))]
    assert not undecoded, undecoded[:3]
    _, heldout = _halves()
    assert ours.encode(heldout) == [1, *sp.encode(heldout)]  # the whole held-out half in one piece
    used = {i for t in texts for i in sp.encode(t)}
    assert any(sp.is_byte(i) for i in used)  # byte fallback was exercised, not only known pieces


def test_added_special_tokens_keep_their_ids(spm_folder):
    ours = TextTokenizer.from_folder(spm_folder)
    assert [ours.tokenizer.token_to_id(t) for t in ADDED] == list(range(BASE_VOCAB, BASE_VOCAB + len(ADDED)))
    ids = ours.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[:2] == [1, BASE_VOCAB + 1] and ids[-1] == BASE_VOCAB
    assert ours.decode(ids) == "user\nhello"
    assert ours.max_id == BASE_VOCAB + len(ADDED) - 1


def test_an_added_token_that_cannot_keep_its_id_is_refused(tmp_path, spm_folder):
    folder = tmp_path / "gap"
    folder.mkdir()
    for name in ("tokenizer.model", "special_tokens_map.json"):
        (folder / name).write_bytes((spm_folder / name).read_bytes())
    config = json.loads((spm_folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"1005": {"content": "<|im_end|>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"'<\|im_end\|>' declares id 1005, but the next free id .* is 1000"):
        TextTokenizer.from_folder(folder)


def test_bundle_tokenizer_files_encode_alike_in_every_loader(tmp_path, spm_folder):
    """tokenizers, ExecuTorch's C++ HFTokenizer (what TextLLMRunner loads) and its sentencepiece tokenizer."""
    from pytorch_tokenizers import CppHFTokenizer, CppSPTokenizer

    ours = TextTokenizer.from_folder(spm_folder)
    written = ours.write_bundle_files(tmp_path, max_seq_len=256)
    assert written == ["added_tokens.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                       "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 256 and config["chat_template"] == CHAT_TEMPLATE
    assert (config["add_bos_token"], config["add_eos_token"], config["bos_token"]) == (True, False, "<s>")
    shipped = TextTokenizer.from_folder(tmp_path)
    runner_json, runner_spm = CppHFTokenizer(), CppSPTokenizer()
    runner_json.load(str(tmp_path))
    runner_spm.load(str(tmp_path / "tokenizer.model"))
    assert (runner_json.bos_tok(), runner_spm.bos_tok()) == (1, 1)
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    plain = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for text in _heldout_texts()[:150] + EXTRA_TEXTS:
        expected = ours.encode(text)
        assert shipped.encode(text) == expected
        assert plain.encode(text).ids == expected  # post-processor adds the same single BOS
        assert hf.encode(text) == expected, text
        assert runner_json.encode(text, 1, 0) == expected, text
        assert runner_spm.encode(text, 1, 0) == expected, text


def test_user_defined_pieces_convert_exactly(tmp_path):
    """sentencepiece emits user-defined pieces whole, with no dummy prefix after them; so does the conversion."""
    folder = write_sentencepiece_tokenizer(tmp_path / "spm", user_defined=("<reserved_0>", "<reserved_1>"))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ours = TextTokenizer.from_folder(folder)
    texts = _heldout_texts()[:150] + ["a<reserved_0>b", " <reserved_1> x<reserved_0><reserved_1>"]
    mismatched = [t for t in texts if ours.encode(t) != [1, *sp.encode(t)]]
    assert not mismatched, mismatched[:3]
    assert sp.piece_to_id("<reserved_0>") in ours.encode("a<reserved_0>b")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", "from cli import app; app()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess) -> None:
    """One `error:` line, last on stderr, and no traceback or library warning anywhere.

    (The progress display's own line before it is the CLI's business, not the loader's.)
    """
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    for noise in ("Traceback", "Warning", "warn("):
        assert noise not in result.stdout + result.stderr, result.stderr


def test_tokenizer_larger_than_the_vocab_is_refused_at_load(tmp_path, spm_folder):
    folder = write_synthetic_checkpoint(tmp_path / "ckpt", "minicpm4-0.5b", dtype="float32",
                                        vocab_size=BASE_VOCAB, **TINY_GQA)
    for name in ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        (folder / name).write_bytes((spm_folder / name).read_bytes())
    out = tmp_path / "out"
    result = _cli("export", "--model", str(folder), "--target", "onnx", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result)
    error = result.stderr.strip().splitlines()[-1]
    assert "tokenizer.model: tokenizer has ids up to 1007 (1008 tokens)" in error and "vocab_size 1000" in error
    assert not out.exists() or not any(out.iterdir())


def test_sentencepiece_only_checkpoint_exports(tmp_path, spm_folder):
    from cpm_mobile.exporter.pipeline import export_bundle
    from cpm_mobile.recipes import load_recipe

    folder = write_synthetic_checkpoint(tmp_path / "ckpt", "minicpm4-0.5b", dtype="float32",
                                        vocab_size=BASE_VOCAB + len(ADDED), eos_token_id=[2, BASE_VOCAB], **TINY_GQA)
    for name in ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        (folder / name).write_bytes((spm_folder / name).read_bytes())
    assert not (folder / "tokenizer.json").exists()
    result = export_bundle(folder, load_recipe("fp32").select(["onnx"]), tmp_path / "out")
    assert result.passed, result.report
    bundle = result.bundle
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= set(result.manifest["tokenizer"])
    assert all((bundle / name).is_file() for name in result.manifest["tokenizer"])
    config = json.loads((bundle / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["model_max_length"] == 256
    source, shipped = TextTokenizer.from_folder(folder), TextTokenizer.from_folder(bundle)
    texts = ["The interpreter reads", "<|im_start|>user\nA list comprehension<|im_end|>\n<|im_start|>assistant\n"]
    assert all(shipped.encode(t) == source.encode(t) for t in texts + _heldout_texts()[:50])
    # onnxruntime-genai reads the bundle's tokenizer.json + tokenizer_config.json itself.
    import onnxruntime_genai as og

    genai = og.Tokenizer(og.Model(str(bundle)))
    genai.update_options(add_special_tokens="true")
    for text in texts:
        assert [int(i) for i in genai.encode(text)] == source.encode(text), text
