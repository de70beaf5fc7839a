"""The tokenizer gate (exporter/tokenizer_gate.py): each stock client's own tokenizer, loaded from the bundle as
the manifest tells an integrator, encodes the held-out text, the prompts and the hard strings to the checkpoint's
ids and decodes them back to its text; where a client cannot, the bundle says so instead of passing silently.

The matrix: sentencepiece models trained here with each setting (BPE and unigram, byte fallback or not, identity
or NFKC normalisation, user-defined pieces, MiniCPM's added tokens or none) and byte-level BPE tokenizer.json,
each through both clients (pytorch_tokenizers' C++ tokenizers as TextLLMRunner picks them, and
onnxruntime-genai's Tokenizer on the folder). No model runs in the fast tests; the slow ones export and generate.
"""
from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from cpm_mobile.exporter.contract import Report
from cpm_mobile.exporter.defaults import DEFAULT_MODEL, HELDOUT_TEXT
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.tokenizer_cpp_json import CharsmapRules, charsmap_entries
from cpm_mobile.exporter.tokenizer_gate import (
    ET_FOLDER, EXECUTORCH, GENAI, GENAI_MODULE, HARD_STRINGS, apply_gate, client_routes, describe, describe_entry,
    executorch_loader, gate_texts, run_gate, write_client_files,
)
from tests.conftest import short_recipe
from tests.test_tokenizers import ADDED, CHAT_TEMPLATE, _halves

VOCAB = 1000
RESERVED = ("<reserved_0>", "<reserved_1>")
PROMPTS = ["The interpreter reads", "A list comprehension"]


def write_spm_checkpoint_tokenizer(folder: Path, model_type: str = "bpe", byte_fallback: bool = True,
                                   normalization: str = "identity", user_defined: tuple[str, ...] = (),
                                   added: bool = True) -> Path:
    """A sentencepiece tokenizer.model trained on half the held-out text, in MiniCPM's file layout: LlamaTokenizer
    config (legacy), and with `added`, MiniCPM's added tokens at the ids after the sentencepiece vocabulary."""
    train, _ = _halves()
    model = io.BytesIO()
    options = dict(remove_extra_whitespaces=False) if normalization == "identity" else {}  # Llama's / the default
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train.splitlines()), model_writer=model, vocab_size=VOCAB, model_type=model_type,
        byte_fallback=byte_fallback, normalization_rule_name=normalization, user_defined_symbols=list(user_defined),
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, **options,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    names = {0: "<unk>", 1: "<s>", 2: "</s>", **({VOCAB + i: t for i, t in enumerate(ADDED)} if added else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|im_end|>" if added else "</s>",
        "unk_token": "<unk>", "pad_token": None, "legacy": True, "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": {str(i): {"content": t, **special} for i, t in names.items()},
        "chat_template": CHAT_TEMPLATE,
    }))
    return folder


def genai_folder(bundle: Path, vocab_size: int = VOCAB + len(ADDED)) -> list[dict]:
    """genai_config.json as the ONNX target writes it (no model: the tokenizer reads only the config), and the
    artifacts of a bundle with every target."""
    from cpm_mobile.exporter.targets.onnx.genai_config import genai_config

    names = {k: k for k in ("input_ids", "attention_mask", "position_ids", "past_key", "past_value", "logits",
                            "present_key", "present_value")}
    io_ = {"cache": {"key_dim": 32, "stored_value_dim": 32, "layers": 2, "heads": 2}, "names": names}
    config = genai_config(model_file="model.onnx", io=io_, hidden_size=128, num_attention_heads=4, context_length=256,
                          vocab_size=vocab_size, bos_id=1, eos_ids=(2,))
    (bundle / "genai_config.json").write_text(json.dumps(config))
    return [{"target": "executorch", "entry": "model.pte", "metadata": {}},
            {"target": "onnx", "entry": "model.onnx", "metadata": {"genai_config": "genai_config.json"}},
            {"target": "coreml", "entry": "model.mlpackage", "metadata": {}}]


def gate_bundle(checkpoint: Path, bundle: Path) -> tuple[TextTokenizer, list[dict], dict]:
    """The tokenizer part of an export: the bundle's files, the clients' files, the gate."""
    tokenizer = TextTokenizer.from_folder(checkpoint)
    bundle.mkdir(parents=True)
    tokenizer.write_bundle_files(bundle, max_seq_len=256)
    artifacts = genai_folder(bundle)
    write_client_files(tokenizer, bundle, artifacts)
    texts = gate_texts(tokenizer, HELDOUT_TEXT.read_text(encoding="utf-8"), PROMPTS)
    return tokenizer, artifacts, run_gate(tokenizer, bundle, artifacts, texts)


# kind: (model_type, byte_fallback, normalization, user_defined, added) -> ExecuTorch, onnxruntime-genai, and the
# check's own tokenizer.json against sentencepiece. "exact" is claimed and measured; "unsupported" is marked.
MATRIX = {
    "bpe identity byte-fallback added (Llama/MiniCPM style)": (("bpe", True, "identity", (), True), "exact", "exact", "exact"),
    "bpe identity byte-fallback": (("bpe", True, "identity", (), False), "exact", "exact", "exact"),
    "bpe identity": (("bpe", False, "identity", (), False), "exact", "unsupported", "exact"),
    "bpe identity added": (("bpe", False, "identity", (), True), "unsupported", "unsupported", "exact"),
    "bpe nfkc byte-fallback added (the issue's)": (("bpe", True, "nmt_nfkc", (), True), "exact", "unsupported", "exact"),
    "bpe nfkc byte-fallback": (("bpe", True, "nmt_nfkc", (), False), "exact", "unsupported", "exact"),
    "bpe nfkc": (("bpe", False, "nmt_nfkc", (), False), "exact", "unsupported", "exact"),
    "bpe nfkc added": (("bpe", False, "nmt_nfkc", (), True), "unsupported", "unsupported", "exact"),
    "bpe identity user-defined": (("bpe", False, "identity", RESERVED, False), "exact", "unsupported", "exact"),
    "bpe identity byte-fallback user-defined added": (("bpe", True, "identity", RESERVED, True), "unsupported", "unsupported", "exact"),
    "bpe nfkc user-defined": (("bpe", False, "nmt_nfkc", RESERVED, False), "exact", "unsupported", "exact"),
    "unigram identity byte-fallback added": (("unigram", True, "identity", (), True), "unsupported", "unsupported", "unsupported"),
    "unigram nfkc": (("unigram", False, "nmt_nfkc", (), False), "unsupported", "unsupported", "unsupported"),
    "unigram nfkc byte-fallback user-defined added": (("unigram", True, "nmt_nfkc", RESERVED, True), "unsupported", "unsupported", "unsupported"),
}


@pytest.mark.parametrize("kind", list(MATRIX))
def test_every_kind_through_both_clients(kind, tmp_path):
    settings, executorch, genai, reference = MATRIX[kind]
    checkpoint = write_spm_checkpoint_tokenizer(tmp_path / "ckpt", *settings)
    tokenizer, artifacts, entries = gate_bundle(checkpoint, tmp_path / "bundle")
    assert {t: entries[t]["status"] for t in entries} == {"executorch": executorch, "onnx": genai, "coreml": "no client"}, \
        {t: describe_entry(e) for t, e in entries.items()}
    assert all(e["reference"]["status"] == reference for e in entries.values()), entries["executorch"]["reference"]
    for target, entry in entries.items():
        assert entry["passed"], entry["breaches"]  # exact, or marked unsupported: never a silent pass
        metadata = next(a for a in artifacts if a["target"] == target)["metadata"]["tokenizer"]
        if target == "coreml":
            assert metadata["client"] is None and "no stock tokenizer client" in metadata["note"]
            continue
        assert metadata["exact"] == (entry["status"] == "exact") and metadata["path"] == entry["loads"]
        if entry["status"] == "unsupported":
            assert entry["note"] and "\n" not in entry["note"]  # the export's one line
        else:
            assert entry["mismatch"] is None and entry["strings"] >= len(HARD_STRINGS) + 3
            assert entry["tokens"] > 30000  # the whole held-out text went through
    _assert_exact_clients_give_sentencepiece_ids(tmp_path / "bundle", checkpoint, artifacts, entries)


def _assert_exact_clients_give_sentencepiece_ids(bundle: Path, checkpoint: Path, artifacts, entries) -> None:
    """Independently of our own encoder: a client the gate calls exact gives sentencepiece's ids on the hard strings."""
    import onnxruntime_genai as og

    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    routes = {a["target"]: a["metadata"]["tokenizer"] for a in artifacts if a["target"] != "coreml"}
    for _, text in HARD_STRINGS:
        want = [1, *sp.encode(text)]
        if entries["executorch"]["status"] == "exact":
            runner = _runner_tokenizer(bundle / routes["executorch"]["path"])
            assert runner.encode(text, 1, 0) == want, text
        if entries["onnx"]["status"] == "exact":
            genai = og.Tokenizer(og.Config(str(bundle)))
            genai.update_options(add_special_tokens="true")
            assert [int(i) for i in genai.encode(text)] == want, text


def _runner_tokenizer(path: Path):
    """The C++ tokenizer TextLLMRunner(model, path) loads."""
    import pytorch_tokenizers as pt

    name, error = executorch_loader(path)
    assert error is None
    tokenizer = {"HFTokenizer": pt.CppHFTokenizer, "SPTokenizer": pt.CppSPTokenizer}[name]()
    tokenizer.load(str(path))
    return tokenizer


@pytest.mark.parametrize("source", ["embedded minicpm-tiny", "trained byte-level BPE"])
def test_byte_level_bpe_tokenizer_json_is_exact_in_both_clients(source, tmp_path, tokenizer_dir):
    checkpoint = DEFAULT_MODEL if source.startswith("embedded") else tokenizer_dir
    tokenizer, artifacts, entries = gate_bundle(checkpoint, tmp_path / "bundle")
    assert describe(tokenizer).byte_level
    assert [entries[t]["status"] for t in ("executorch", "onnx")] == ["exact", "exact"], entries
    assert entries["executorch"]["loads"] == "." and entries["executorch"]["loaded_as"] == "HFTokenizer"
    assert not (tmp_path / "bundle" / ET_FOLDER).exists() and not (tmp_path / "bundle" / GENAI_MODULE).exists()


def test_byte_level_bpe_with_nfc_is_marked_in_both_clients(tmp_path, tokenizer_dir):
    """Qwen-style tokenizer.json (byte-level BPE after an NFC normaliser): the C++ HFTokenizer's NFC decomposes
    precomposed 'été' and breaks Hangul, onnxruntime-genai applies no normaliser to decomposed 'e\u0301': each is
    marked unsupported with what it got wrong, never passed as exact."""
    checkpoint = tmp_path / "nfc"
    shutil.copytree(tokenizer_dir, checkpoint)
    data = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "NFC"}
    (checkpoint / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tokenizer, artifacts, entries = gate_bundle(checkpoint, tmp_path / "bundle")
    assert describe(tokenizer).byte_level and describe(tokenizer).normalization == "NFC"
    for target, phrase in (("executorch", "decomposes precomposed"), ("onnx", "applies no normaliser")):
        entry = entries[target]
        assert entry["status"] == "unsupported" and entry["passed"] and phrase in entry["note"], entry
        assert entry["mismatch"] is not None and entry["mismatch"]["what"] == "encode"  # measured, not assumed
        assert next(a for a in artifacts if a["target"] == target)["metadata"]["tokenizer"]["exact"] is False


def test_the_hard_strings_and_the_chat_template_are_in_the_gate(tmp_path):
    checkpoint = write_spm_checkpoint_tokenizer(tmp_path / "ckpt")
    texts = dict(gate_texts(TextTokenizer.from_folder(checkpoint), "held out", PROMPTS))
    for label, text in HARD_STRINGS:
        assert texts[label] == text
    assert texts["held-out text"] == "held out" and texts["prompt 0"] == PROMPTS[0]
    assert "<|im_start|>user\n" in texts["chat template"] and "東京" in texts["chat template"]
    assert "<|im_start|>" in texts["chat template's special tokens in text"]
    joined = "".join(texts.values())
    for needle in ("Ｆ", "ﬁ", "\u0301", "🙂", "東", "  ", "\t", "\n\n"):  # full-width, ligature, accent, emoji, CJK...
        assert needle in joined


def test_the_issues_bundle_gives_the_runner_a_tokenizer_json_it_applies_exactly(tmp_path):
    """NFKC + byte fallback + MiniCPM's added tokens: TextLLMRunner on the bundle folder silently fell back to Tiktoken
    (the issue), and its sentencepiece tokenizer decodes byte pieces as '<0xE6>'. The route names executorch_tokenizer/,
    whose normaliser spells the nmt_nfkc charsmap as Replace rules its C++ HFTokenizer reads: sentencepiece's ids on
    every hard string and on each charsmap key, and sentencepiece's text back."""
    checkpoint = write_spm_checkpoint_tokenizer(tmp_path / "ckpt", "bpe", True, "nmt_nfkc")
    tokenizer, artifacts, entries = gate_bundle(checkpoint, tmp_path / "bundle")
    bundle = tmp_path / "bundle"
    assert executorch_loader(bundle)[0] == "Tiktoken"  # what the folder gave TextLLMRunner
    route = artifacts[0]["metadata"]["tokenizer"]
    assert route["path"] == ET_FOLDER and route["exact"] is True and "Replace rules" in route["note"]
    assert entries["executorch"]["status"] == "exact" and entries["executorch"]["loaded_as"] == "HFTokenizer"
    runner = _runner_tokenizer(bundle / route["path"])
    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    for _, text in HARD_STRINGS:  # full-width forms, ligatures, whitespace, emoji: all of it, as sentencepiece does
        ids = runner.encode(text, 1, 0)
        assert ids == [1, *sp.encode(text)], text
        assert runner.decode_batch(ids[1:]).removeprefix(" ") == sp.decode(ids[1:]), text  # the dummy prefix
    # Every key of the charsmap (225k: compatibility forms, compositions, Hangul jamo), a sample in one text.
    data = json.loads(tokenizer.tokenizer.to_str())
    keys = sorted(charsmap_entries(base64.b64decode(data["normalizer"]["normalizers"][0]["precompiled_charsmap"])))
    sample = " ".join(k for k in keys[::40] if k.strip())
    assert runner.encode(sample, 1, 0) == [1, *sp.encode(sample)]
    genai = entries["onnx"]
    assert genai["status"] == "unsupported" and "nmt_nfkc" in genai["note"] and genai["mismatch"]["what"] == "encode"


def test_a_charsmap_the_rules_cannot_spell_is_refused_not_claimed(tmp_path):
    """A rule table whose greedy longest-match the ordered Replace rules do not reproduce (a single-character rule whose
    output another rule rewrites again) is named, and the route stays marked."""
    rules = CharsmapRules.of({"a": "b", "b": "c"})
    assert rules.first_unreproduced({"a": "b", "b": "c"}) == ("a", "b", "c")
    assert CharsmapRules.of({"A": "a", "e\u0301": "\u00e9"}).first_unreproduced({"A": "a", "e\u0301": "\u00e9"}) is None


def test_a_client_claimed_exact_that_differs_fails_the_check(tmp_path):
    """A route that says exact, and a client that is not: the gate fails with the first differing position, both
    id sequences and the client named; the artifact fails; report.json validates."""
    checkpoint = write_spm_checkpoint_tokenizer(tmp_path / "ckpt", "bpe", True, "nmt_nfkc")
    tokenizer, artifacts, _ = gate_bundle(checkpoint, tmp_path / "bundle")
    for artifact in artifacts[:2]:  # as a bundle from before the gate: the bundle folder, claimed exact
        artifact["metadata"]["tokenizer"] = {"client": "", "path": ".", "exact": True, "note": ""}
    texts = gate_texts(tokenizer, HELDOUT_TEXT.read_text(encoding="utf-8"), PROMPTS)
    entries = run_gate(tokenizer, tmp_path / "bundle", artifacts, texts)
    runner, genai = entries["executorch"], entries["onnx"]
    # TextLLMRunner on the folder: Tiktoken, which cannot even encode a newline; named, not a silent fallback.
    assert runner["status"] == "mismatch" and runner["loaded_as"] == "Tiktoken" and not runner["passed"]
    assert runner["mismatch"]["what"] == "encode" and "error" in runner["mismatch"]
    assert runner["breaches"][0].startswith(f"{EXECUTORCH} (.): encode of 'held-out text' failed: ")
    # onnxruntime-genai reads the file but skips the normaliser: the first differing token, both id sequences.
    mismatch = genai["mismatch"]
    assert genai["status"] == "mismatch" and not genai["passed"] and mismatch["string"] == "held-out text"
    position, offset = mismatch["position"], mismatch["offset"]
    assert mismatch["expected"][position - offset] != mismatch["got"][position - offset]
    assert mismatch["expected"][:position - offset] == mismatch["got"][:position - offset]
    assert genai["breaches"] == [f"{GENAI} (.): encode of 'held-out text' differs at token {position}: expected "
                                 f"{mismatch['expected']}, got {mismatch['got']}"
                                 + (f" (from token {offset})" if offset else "")]
    entry = {"passed": True, "failed_gates": [], "breaches": []}
    apply_gate(entry, genai)
    assert entry["passed"] is False and entry["failed_gates"] == ["tokenizer"]
    assert entry["breaches"] == [f"tokenizer: {genai['breaches'][0]}"]
    _assert_report_accepts(runner)


def test_a_decoder_that_loses_spaces_fails_the_check(tmp_path):
    """The C++ decoder applies Strip to every token: with tokenizer.json's own decoder (the bundle folder, as the
    README said before the gate) TextLLMRunner streams 'Theinterpreterreads'. Encoding is exact there; decoding not."""
    checkpoint = write_spm_checkpoint_tokenizer(tmp_path / "ckpt")
    tokenizer, artifacts, _ = gate_bundle(checkpoint, tmp_path / "bundle")
    assert artifacts[0]["metadata"]["tokenizer"]["path"] == ET_FOLDER
    artifacts[0]["metadata"]["tokenizer"] = {"client": EXECUTORCH, "path": ".", "exact": True, "note": ""}
    entries = run_gate(tokenizer, tmp_path / "bundle", artifacts[:1], gate_texts(tokenizer, "", PROMPTS))
    mismatch = entries["executorch"]["mismatch"]
    assert entries["executorch"]["status"] == "mismatch" and mismatch["what"] == "decode", mismatch
    assert mismatch["string"] == "prompt 0" and mismatch["expected"].count(" ") > mismatch["got"].count(" ")


def test_the_check_s_own_encoder_is_held_to_sentencepiece(tmp_path, monkeypatch):
    """The reference (tokenizers on the converted tokenizer.json, what the check and `generate` use) is compared
    with sentencepiece itself: a conversion that drifts fails every artifact's tokenizer gate."""
    checkpoint = write_spm_checkpoint_tokenizer(tmp_path / "ckpt", added=False)
    tokenizer = TextTokenizer.from_folder(checkpoint)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    tokenizer.write_bundle_files(bundle, 256)
    artifacts = genai_folder(bundle, VOCAB)
    write_client_files(tokenizer, bundle, artifacts)
    texts = gate_texts(tokenizer, "", ["a  b", "The interpreter reads"])
    drifted = TextTokenizer.from_folder(checkpoint)
    original = drifted.encode
    monkeypatch.setattr(drifted, "encode", lambda text: [*original(text), 5])
    entries = run_gate(drifted, bundle, artifacts, texts)
    for entry in entries.values():
        assert entry["reference"]["status"] == "mismatch" and not entry["passed"]
        assert entry["breaches"][-1].startswith("tokenizers (tokenizer.json): encode of ")


def _assert_report_accepts(gate: dict) -> None:
    metrics_gate = {"against": "fp32 reference", "metrics": {}, "tolerances": {}, "breaches": [], "passed": True}
    artifact = {"entry": "model.pte", "verified": "ExecuTorch runtime verified", "precision": "fp32",
                "quantization": None, "faithfulness": metrics_gate, "fidelity": metrics_gate,
                "breaches": [], "failed_gates": [], "passed": True}
    apply_gate(artifact, gate)
    report = {"format_version": 2, "passed": artifact["passed"], "artifacts": {"executorch": artifact},
              "reference": {"runtime": "PyTorch eager", "greedy_samples": [], "host": "test"},
              "plan": {"prompts": 0, "max_new_tokens": 0, "stop_ids": [], "heldout_windows": 0, "heldout_tokens": 0}}
    dumped = Report.model_validate(report).dump()
    assert dumped["passed"] is False and dumped["artifacts"]["executorch"]["tokenizer"]["status"] == "mismatch"
    json.dumps(dumped)


def test_the_console_shows_the_tokenizer_row_and_one_line_per_unsupported_client(monkeypatch, tmp_path):
    from rich.console import Console

    from cpm_mobile import cli

    checkpoint = write_spm_checkpoint_tokenizer(tmp_path / "ckpt", "bpe", True, "nmt_nfkc")
    _, _, entries = gate_bundle(checkpoint, tmp_path / "bundle")
    metrics = dict(max_rel_logits=1e-6, sqnr_db=127.0, kl=1e-12, top1=1.0, greedy=1.0, greedy_ties=0)
    gate = {"metrics": metrics, "passed": True}
    report = {"artifacts": {t: {"faithfulness": gate, "fidelity": gate, "breaches": [], "tokenizer": entries[t]}
                            for t in entries}, "plan": {}}
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=buffer, width=80, force_terminal=False, color_system=None))
    cli._print_report(report)
    lines = [" ".join(line.split()) for line in buffer.getvalue().splitlines()]
    assert lines.count("tokenizer - - - - - - unsupported") == 1 and "tokenizer - - - - - - n/a" in lines
    assert lines.count("tokenizer - - - - - - pass") == 1
    notes = [line for line in lines if ": tokenizer: " in line]
    assert [line.split(":")[0] for line in notes] == ["onnx"]
    assert ". (og.Tokenizer) is unsupported for this bundle" in notes[0] and "nmt_nfkc" in notes[0]


def test_routes_are_decided_from_the_kind_alone(tmp_path):
    checkpoint = write_spm_checkpoint_tokenizer(tmp_path / "ckpt")
    routes = client_routes(TextTokenizer.from_folder(checkpoint))
    assert (routes[EXECUTORCH].path, routes[EXECUTORCH].exact) == (ET_FOLDER, True)
    assert routes[GENAI].module == {"tokenizer_class": "GemmaTokenizer"} and routes[GENAI].exact


def test_onnx_without_genai_config_and_core_ml_have_no_client(tmp_path):
    checkpoint = write_spm_checkpoint_tokenizer(tmp_path / "ckpt")
    tokenizer = TextTokenizer.from_folder(checkpoint)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    tokenizer.write_bundle_files(bundle, 256)
    artifacts = [{"target": "onnx", "entry": "model.onnx", "metadata": {"genai_config": None}},
                 {"target": "coreml", "entry": "model.mlpackage", "metadata": {}}]
    assert write_client_files(tokenizer, bundle, artifacts) == []  # nothing for clients that do not run
    entries = run_gate(tokenizer, bundle, artifacts, gate_texts(tokenizer, "", PROMPTS))
    for artifact in artifacts:
        assert artifact["metadata"]["tokenizer"]["client"] is None
        entry = entries[artifact["target"]]
        assert entry["status"] == "no client" and entry["passed"] and entry["note"] == artifact["metadata"]["tokenizer"]["note"]
    assert "genai_config.json" in entries["onnx"]["note"] and "Core ML" in entries["coreml"]["note"]


def test_a_client_library_that_is_not_installed_is_said_not_run(tmp_path, monkeypatch):
    """onnxruntime-genai is a test dependency only: without it the gate says so instead of passing it as exact."""
    import sys

    checkpoint = write_spm_checkpoint_tokenizer(tmp_path / "ckpt")
    tokenizer, artifacts, _ = gate_bundle(checkpoint, tmp_path / "bundle")
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import raises ImportError
    entry = run_gate(tokenizer, tmp_path / "bundle", artifacts[1:2], gate_texts(tokenizer, "", PROMPTS))["onnx"]
    assert entry["status"] == "not run" and entry["passed"] and "not installed" in entry["note"]


# -- whole exports: the bundle as an app runs it --------------------------------------------------------------------


@pytest.fixture(scope="module", params=["identity byte-fallback", "nfkc byte-fallback"])
def spm_bundle(request, tmp_path_factory):
    """A MiniCPM4-layout checkpoint with a trained sentencepiece tokenizer (and MiniCPM's added tokens), exported
    with the default recipe to ExecuTorch and ONNX (a short check plan)."""
    from bench.synthetic import write_synthetic_checkpoint
    from cpm_mobile.exporter.pipeline import export_bundle
    from tests.conftest import TINY_GQA

    root = tmp_path_factory.mktemp("spm-export")
    normalization = "identity" if request.param.startswith("identity") else "nmt_nfkc"
    tokenizer = write_spm_checkpoint_tokenizer(root / "tokenizer", "bpe", True, normalization)
    checkpoint = write_synthetic_checkpoint(root / "ckpt", "minicpm4-0.5b", dtype="float32",
                                            vocab_size=VOCAB + len(ADDED), eos_token_id=[2, VOCAB], **TINY_GQA)
    for path in tokenizer.iterdir():
        shutil.copy(path, checkpoint / path.name)
    recipe = short_recipe("fp32", targets=["executorch", "onnx"], heldout_windows=2, max_new_tokens=12)
    return request.param, checkpoint, export_bundle(checkpoint, recipe, root / "out")


@pytest.mark.slow
def test_exported_bundle_passes_with_each_client_exact_or_marked(spm_bundle):
    kind, _, result = spm_bundle
    assert result.passed, result.report
    entries = {t: e["tokenizer"] for t, e in result.report["artifacts"].items()}
    # NFKC: TextLLMRunner through the charsmap's Replace rules; onnxruntime-genai's BPE has no normaliser (marked).
    expected = {"executorch": "exact", "onnx": "exact" if kind.startswith("identity") else "unsupported"}
    assert {t: e["status"] for t, e in entries.items()} == expected
    Report.model_validate(result.report)
    for artifact in result.manifest["artifacts"]:
        route = artifact["metadata"]["tokenizer"]
        assert route["exact"] == (expected[artifact["target"]] == "exact") and (result.bundle / route["path"]).exists()
    assert all((result.bundle / name).is_file() for name in result.manifest["tokenizer"])


@pytest.mark.slow
def test_text_llm_runner_as_the_readme_configures_it(spm_bundle):
    """TextLLMRunner on the path the manifest names, num_bos=1: the checkpoint's ids for the prompts (and, where the
    route is exact, every hard string), and the report's continuation (streamed after the prompt, so with the
    space that joins it to the prompt where the continuation starts a word)."""
    from cpm_mobile.runtimes.executorch import load_kernel_libraries

    load_kernel_libraries()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    kind, checkpoint, result = spm_bundle
    bundle, source = result.bundle, TextTokenizer.from_folder(checkpoint)
    route = next(a for a in result.manifest["artifacts"] if a["target"] == "executorch")["metadata"]["tokenizer"]
    runner_tokenizer = _runner_tokenizer(bundle / route["path"])
    strings = [s["prompt"] for s in result.report["reference"]["greedy_samples"]]
    if route["exact"]:
        strings += [text for _, text in HARD_STRINGS] + [dict(gate_texts(source))["chat template"]]
    for text in strings:
        assert runner_tokenizer.encode(text, 1, 0) == source.encode(text), text
    for sample in result.report["reference"]["greedy_samples"]:
        pieces: list[str] = []
        runner = TextLLMRunner(str(bundle / "model.pte"), str(bundle / route["path"]))
        runner.generate(sample["prompt"], GenerationConfig(echo=False, max_new_tokens=12, temperature=0.0, num_bos=1),
                        pieces.append)
        assert "".join(pieces).removeprefix(" ") == sample["continuation"], (kind, pieces, sample)


@pytest.mark.slow
def test_onnxruntime_genai_as_the_readme_configures_it(spm_bundle):
    import numpy as np
    import onnxruntime_genai as og

    kind, checkpoint, result = spm_bundle
    source = TextTokenizer.from_folder(checkpoint)
    model = og.Model(str(result.bundle))
    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")
    exact = result.report["artifacts"]["onnx"]["tokenizer"]["status"] == "exact"
    strings = [s["prompt"] for s in result.report["reference"]["greedy_samples"]]
    strings += [text for _, text in HARD_STRINGS] + [dict(gate_texts(source))["chat template"]] if exact else []
    for text in strings:
        assert [int(i) for i in tokenizer.encode(text)] == source.encode(text), text
    for sample in result.report["reference"]["greedy_samples"]:
        ids = source.encode(sample["prompt"])
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 12, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        stream, pieces = tokenizer.create_stream(), []
        while not generator.is_done():
            generator.generate_next_token()
            pieces.append(stream.decode(generator.get_next_tokens()[0]))
        assert "".join(pieces).removeprefix(" ") == sample["continuation"], (kind, pieces, sample)


@pytest.mark.slow
def test_check_reruns_the_gate_on_the_published_bundle(spm_bundle):
    from cpm_mobile.exporter.bundle_check import check_bundle

    _, _, result = spm_bundle
    again = check_bundle(result.bundle)
    assert again.passed, again.report
    for target, entry in again.report["artifacts"].items():
        exported = result.report["artifacts"][target]["tokenizer"]
        assert {k: entry["tokenizer"][k] for k in ("status", "loads", "loaded_as", "tokens")} == \
               {k: exported[k] for k in ("status", "loads", "loaded_as", "tokens")}
