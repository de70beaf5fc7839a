"""`cpm-mobile generate`: the artifact itself, in its runtime, says what the report says it says.

The embedded minicpm-tiny is exported once for the module (every target, a short check), and
every test reuses that bundle.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cpm_mobile.cli import app
from cpm_mobile.exporter.defaults import DEFAULT_MODEL
from cpm_mobile.exporter.generate import (
    Chat, ChatTemplate, Sampling, TextStream, Timings, complete, decode_tokens, greedy, make_sampler,
    open_bundle_model, render_chat,
)
from cpm_mobile.exporter.pipeline import export_bundle
from cpm_mobile.exporter.tokenizer import TextTokenizer
from tests.conftest import short_recipe

pytestmark = pytest.mark.slow  # whole exports (the fast inner loop, -m "not slow", leaves them out)

runner = CliRunner()
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    recipe = short_recipe("fp32", max_seq_len=128, prompts=["The interpreter reads", "A list comprehension"],
                          max_new_tokens=NEW_TOKENS, heldout_windows=1, heldout_tokens=64)
    result = export_bundle(DEFAULT_MODEL, recipe, tmp_path_factory.mktemp("gen"), name="tiny")
    assert result.passed, result.report
    return result.bundle


@pytest.fixture(scope="module")
def tokenizer(bundle) -> TextTokenizer:
    return TextTokenizer.from_folder(bundle)


@pytest.fixture(scope="module")
def onnx_model(bundle):
    return open_bundle_model(bundle, "onnx")


@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_greedy_generate_prints_the_reports_reference_text(bundle, tokenizer, target):
    sample = json.loads((bundle / "report.json").read_text())["reference"]["greedy_samples"][0]
    result = runner.invoke(app, ["generate", str(bundle), "--target", target, "--prompt", sample["prompt"],
                                 "--max-new-tokens", str(NEW_TOKENS)])
    assert result.exit_code == 0, result.output
    assert result.stdout == sample["continuation"] + "\n"
    assert len(sample["continuation"].split()) >= 5
    stats = result.stderr.strip().splitlines()[-1]
    prompt_tokens = len(tokenizer.encode(sample["prompt"]))
    assert stats.startswith(f"prefill {prompt_tokens} tokens ") and f"decode {NEW_TOKENS - 1} tokens " in stats and "MiB" in stats
    if target == "coreml":
        from cpm_mobile.runtimes.coreml.session import coreml_available

        expected = "Core ML (CPU only)" if coreml_available() else "numpy ML Program interpreter"
        assert expected in result.stderr


def test_every_reference_prompt_in_the_library_call(bundle, tokenizer, onnx_model):
    report = json.loads((bundle / "report.json").read_text())
    for sample in report["reference"]["greedy_samples"]:
        timings = Timings()
        pieces = list(complete(onnx_model.session, tokenizer.encode(sample["prompt"]), tokenizer.tokenizer,
                               NEW_TOKENS, greedy, onnx_model.eos_ids, timings))
        assert "".join(pieces) == sample["continuation"]
        assert len(pieces) > 5  # streamed, not handed over at the end
        assert timings.decode_tokens == NEW_TOKENS - 1 and timings.decode_tokens_per_s > 0


def test_text_stream_holds_partial_utf8_pieces(tokenizer):
    text = "naïve café — “quotes” 日本語 ok"
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    stream = TextStream(tokenizer.tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert "" in pieces  # byte-level pieces of one character wait for the rest
    assert all("\ufffd" not in p for p in pieces)


# -- sampling --------------------------------------------------------------------------------------

LOGITS = np.log(np.array([0.4, 0.3, 0.2, 0.1]))


def _frequencies(sampling: Sampling, draws: int = 20000) -> np.ndarray:
    sample = make_sampler(sampling)
    return np.bincount([sample(LOGITS) for _ in range(draws)], minlength=4) / draws


def test_temperature_one_samples_the_softmax():
    np.testing.assert_allclose(_frequencies(Sampling(1.0, seed=0)), [0.4, 0.3, 0.2, 0.1], atol=0.015)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.4 < 0.5, 0.4 + 0.3 >= 0.5: tokens 0 and 1 only, renormalised to 4:3.
    np.testing.assert_allclose(_frequencies(Sampling(1.0, top_p=0.5, seed=1)), [4 / 7, 3 / 7, 0, 0], atol=0.015)
    assert set(np.flatnonzero(_frequencies(Sampling(5.0, top_p=0.01, seed=2), 500))) == {0}


@pytest.mark.parametrize("temperature", [0.25, 4.0])
def test_temperature_scales_the_logits(temperature):
    # p_i proportional to p_i ** (1 / T): [0.72, 0.23, 0.05, 0.00] at T=0.25, [0.29, 0.27, 0.24, 0.20] at T=4.
    expected = np.array([0.4, 0.3, 0.2, 0.1]) ** (1 / temperature)
    np.testing.assert_allclose(_frequencies(Sampling(temperature, seed=3)), expected / expected.sum(), atol=0.015)


def test_seeded_sampling_repeats_and_greedy_is_argmax():
    runs = [make_sampler(Sampling(1.0, 0.9, seed)) for seed in (7, 7, 8)]
    draws = [[sample(LOGITS) for _ in range(50)] for sample in runs]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert make_sampler(Sampling())(np.array([0.1, 3.0, -1.0])) == 1
    with pytest.raises(ValueError):
        Sampling(top_p=0)


# -- chat ------------------------------------------------------------------------------------------

def test_chat_template_renders_as_transformers_does(bundle, tokenizer):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a list?"},
                {"role": "assistant", "content": "A sequence."}, {"role": "user", "content": "And a tuple?"}]
    hf = AutoTokenizer.from_pretrained(str(bundle))
    template = ChatTemplate.from_folder(bundle)
    assert template.render(messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected_ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected_ids = expected_ids["input_ids"] if isinstance(expected_ids, dict) or hasattr(expected_ids, "keys") else expected_ids
    chat = Chat(open_bundle_model(bundle, "onnx").session, tokenizer.tokenizer, template, [2, 4])
    assert chat.encode(messages) == list(expected_ids)
    assert render_chat("{{ bos_token }}{{ messages[0]['content'] | tojson }}", messages[:1], bos_token="<s>") == \
        '<s>"You answer briefly."'


def test_multi_turn_reuses_the_cache_and_matches_a_fresh_run(bundle, tokenizer, onnx_model):
    template = ChatTemplate.from_folder(bundle)
    chat = Chat(onnx_model.session, tokenizer.tokenizer, template, onnx_model.eos_ids)
    first = "".join(chat.reply("What is a list?", 24))
    first_prompt = chat.last_prompt_ids
    second = "".join(chat.reply("And a tuple?", 24))
    assert chat.last_start_pos > len(first_prompt)  # only the new turn was prefilled
    assert chat.last_prompt_ids[: len(first_prompt)] == first_prompt
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == first and first
    # The same conversation from an empty cache gives the same second answer.
    onnx_model.session.reset()
    fresh = list(decode_tokens(onnx_model.session, chat.last_prompt_ids, 0, 24, greedy, onnx_model.eos_ids))
    assert tokenizer.decode(fresh) == second


def _first_seed_that_reaches_eos(model, tokenizer, template, budget):
    for seed in range(60):
        chat = Chat(model.session, tokenizer.tokenizer, template, model.eos_ids)
        ids = chat.encode([{"role": "user", "content": "Hello"}])
        model.session.reset()
        unstopped = list(decode_tokens(model.session, ids, 0, budget, make_sampler(Sampling(1.0, 0.9, seed))))
        hits = [i for i, t in enumerate(unstopped) if t in model.eos_ids]
        if hits and hits[0] < budget - 4:
            return seed, unstopped[: hits[0] + 1]
    pytest.fail("no seed in 60 reaches EOS")


def test_chat_stops_at_the_manifests_eos(bundle, tokenizer, onnx_model):
    template = ChatTemplate.from_folder(bundle)
    seed, until_eos = _first_seed_that_reaches_eos(onnx_model, tokenizer, template, 48)
    seen = []

    def recording(*args, **kwargs):
        for token in decode_tokens(*args, **kwargs):
            seen.append(token)
            yield token

    chat = Chat(onnx_model.session, tokenizer.tokenizer, template, onnx_model.eos_ids, source=recording)
    text = "".join(chat.reply("Hello", 48, make_sampler(Sampling(1.0, 0.9, seed))))
    assert seen == until_eos  # generation ended at the first EOS, not at the budget
    assert text == tokenizer.decode(until_eos[:-1])
    assert "</s>" not in text and "<|im_end|>" not in text
    # And through the command line, with the same seed, the same reply.
    result = runner.invoke(app, ["generate", str(bundle), "-t", "onnx", "--chat", "-n", "48", "--temperature", "1",
                                 "--top-p", "0.9", "--seed", str(seed)], input="Hello\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == text + "\n"
    assert f"decode {len(until_eos) - 1} tokens" in result.stderr


def test_cli_chat_is_multi_turn(bundle, tokenizer, onnx_model):
    template = ChatTemplate.from_folder(bundle)
    chat = Chat(onnx_model.session, tokenizer.tokenizer, template, onnx_model.eos_ids)
    expected = ["".join(chat.reply(message, 16)) for message in ("What is a list?", "And a tuple?")]
    result = runner.invoke(app, ["generate", str(bundle), "-t", "onnx", "--chat", "-n", "16"],
                           input="What is a list?\nAnd a tuple?\n\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(reply + "\n" for reply in expected)
    assert result.stderr.count("prefill ") == 2


@pytest.mark.parametrize("args, message", [
    ([], "--prompt TEXT or --chat"),
    (["--prompt", "x", "--chat"], "--prompt TEXT or --chat"),
    (["--prompt", "x", "--top-p", "0"], "--top-p"),
    (["--prompt", "x", "--target", "tflite"], "--target"),
])
def test_generate_usage_errors(bundle, args, message):
    result = runner.invoke(app, ["generate", str(bundle), *args])
    assert result.exit_code == 2 and message in result.output


def test_generate_bad_bundle_or_target_is_one_line(bundle, tmp_path):
    missing = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "x"])
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1 and "no such bundle folder" in missing.stderr
    (tmp_path / "one").mkdir()
    for name in ("manifest.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "one" / name).write_bytes((bundle / name).read_bytes())
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["target"] == "onnx"]
    (tmp_path / "one" / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["generate", str(tmp_path / "one"), "-t", "coreml", "--prompt", "x"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "has no coreml artifact" in result.stderr
    config = json.loads((bundle / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (tmp_path / "one" / "tokenizer_config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["generate", str(tmp_path / "one"), "--chat"], input="hi\n")
    assert result.exit_code == 2 and "has no chat_template" in result.stderr
