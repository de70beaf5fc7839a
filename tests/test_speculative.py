"""Speculative decoding: drafts verified in one forward call give exactly the plain greedy output.

The embedded minicpm-tiny is exported once for the module (every target, a short check); the
draft bundle is blockffn-tiny (same tokenizer, a different model, so drafts are both accepted and
rejected), exported once as .onnx only.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cpm_mobile.cli import app
from cpm_mobile.exporter.defaults import DEFAULT_MODEL, DEFAULT_SPARSE_MODEL, HELDOUT_TEXT
from cpm_mobile.exporter.generate import Chat, ChatTemplate, decode_tokens, greedy, make_sampler, open_bundle_model, Sampling
from cpm_mobile.exporter.pipeline import export_bundle
from cpm_mobile.exporter.speculative import ModelDrafter, NgramDrafter, SpeculativeDecoder, verify
from cpm_mobile.exporter.tokenizer import TextTokenizer
from tests.conftest import short_recipe

pytestmark = pytest.mark.slow  # whole exports (the fast inner loop, -m "not slow", leaves them out)

runner = CliRunner()
NEW_TOKENS = 48


def _short_recipe(name: str, targets: tuple[str, ...]):
    return short_recipe(name, targets, max_seq_len=128, prompts=["The interpreter reads"], max_new_tokens=8,
                        heldout_windows=1, heldout_tokens=32)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    result = export_bundle(DEFAULT_MODEL, _short_recipe("fp32", ("executorch", "onnx", "coreml")),
                           tmp_path_factory.mktemp("spec"), name="tiny")
    assert result.passed, result.report
    return result.bundle


@pytest.fixture(scope="module")
def draft_bundle(tmp_path_factory) -> Path:
    result = export_bundle(DEFAULT_SPARSE_MODEL, _short_recipe("fp32", ("onnx",)), tmp_path_factory.mktemp("draft"),
                           name="draft")
    assert result.passed, result.report
    return result.bundle


@pytest.fixture(scope="module")
def tokenizer(bundle) -> TextTokenizer:
    return TextTokenizer.from_folder(bundle)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Repetitive text (the Python docs), where drafts are often right: three 40-token windows."""
    ids = tokenizer.encode(HELDOUT_TEXT.read_text(encoding="utf-8")[:20000])
    return [ids[start : start + 40] for start in (0, 1500, 3000)]


def _plain(session, prompt, eos):
    session.reset()
    return list(decode_tokens(session, prompt, 0, NEW_TOKENS, greedy, eos))


def _speculative(session, prompt, eos, decoder):
    session.reset()
    return list(decoder(session, prompt, 0, NEW_TOKENS, greedy, eos))


@pytest.mark.parametrize("target", ["executorch", "onnx"])
@pytest.mark.parametrize("drafting", ["ngram", "draft"])
def test_speculative_equals_plain_greedy(bundle, draft_bundle, prompts, target, drafting):
    model = open_bundle_model(bundle, target)
    if drafting == "ngram":
        drafter = NgramDrafter()
    else:
        drafter = ModelDrafter(open_bundle_model(draft_bundle, "onnx").session)
    decoder = SpeculativeDecoder(drafter, draft_tokens=4)
    total = 0
    for prompt in prompts:
        expected = _plain(model.session, prompt, model.eos_ids)
        assert _speculative(model.session, prompt, model.eos_ids, decoder) == expected
        total += len(expected)
    stats = decoder.stats
    # Both outcomes were exercised: some drafts accepted, some rejected (then the cache was rewound).
    assert 0 < stats.accepted < stats.drafted
    # Every token after each prompt's first came from a verification call; fewer calls than tokens.
    assert stats.calls + stats.accepted == total - len(prompts)
    assert stats.calls < total - len(prompts)


def test_verify_accepts_the_greedy_prefix_and_gives_the_next_token(bundle, prompts):
    session = open_bundle_model(bundle, "onnx").session
    prompt = prompts[0]
    plain = _plain(session, prompt, ())
    for wrong_at in (0, 2, 4):  # a wrong draft at index wrong_at; 4: all four drafts right
        drafts = plain[1:5]
        if wrong_at < 4:
            drafts[wrong_at] = (drafts[wrong_at] + 1) % 4096
        session.reset()
        session.forward(np.asarray(prompt, dtype=np.int64), 0)
        result = verify(session, plain[0], drafts, len(prompt))
        assert result.accepted == plain[1 : 1 + wrong_at]
        assert result.next_token == plain[1 + wrong_at]
        # The rejected drafts' slots do not matter: decoding on from the accepted prefix gives plain's tokens.
        after = list(decode_tokens(session, [result.next_token], len(prompt) + 1 + wrong_at, 8, greedy))
        assert after == plain[2 + wrong_at : 10 + wrong_at]


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    drafter = NgramDrafter(max_ngram=3)
    assert drafter.propose([5, 1, 2, 3, 9, 8, 1, 2, 3, 7, 6, 1, 2, 3], 3) == [7, 6, 1]  # latest 3-gram match
    assert drafter.propose([4, 2, 9, 9, 1, 2], 2) == [9, 9]  # no 3-gram or 2-gram match: the 1-gram 2
    assert drafter.propose([1, 2, 3, 4], 3) == []
    assert drafter.propose([7, 7], 5) == [7]  # stops at the end of the sequence


def test_chat_turns_with_speculation_match_plain(bundle, tokenizer):
    model = open_bundle_model(bundle, "onnx")
    template = ChatTemplate.from_folder(bundle)
    messages = ("What is a list? A list is a list.", "And a tuple?")
    plain = Chat(model.session, tokenizer.tokenizer, template, model.eos_ids)
    expected = ["".join(plain.reply(m, 32)) for m in messages]
    decoder = SpeculativeDecoder(NgramDrafter(), 4)
    chat = Chat(model.session, tokenizer.tokenizer, template, model.eos_ids, source=decoder)
    assert ["".join(chat.reply(m, 32)) for m in messages] == expected
    assert chat.last_start_pos > 0 and decoder.stats.calls > 0


# -- rewinds: a forward at an earlier position after a longer one -------------------------------

@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml", "torch"])
def test_forward_at_an_earlier_position_reads_no_stale_entry(bundle, prompts, target):
    if target == "torch":
        from cpm_mobile.exporter.models import load_model
        from cpm_mobile.runtimes.torch_session import TorchSession

        session = TorchSession(load_model(DEFAULT_MODEL, max_seq_len=128)[0].eval())
    else:
        session = open_bundle_model(bundle, target).session
    first, other = prompts[0][:24], prompts[1][:6]
    session.reset()
    session.forward(np.asarray(first, dtype=np.int64), 0)  # positions 0..23
    rewound = session.forward(np.asarray(other, dtype=np.int64), 10)  # 10..15 rewritten; 16..23 stale
    step = session.forward(np.asarray([other[0]], dtype=np.int64), 16)
    session.reset()
    fresh = session.forward(np.asarray(first[:10] + other, dtype=np.int64), 0)
    fresh_step = session.forward(np.asarray([other[0]], dtype=np.int64), 16)
    atol = 1e-4 if target != "coreml" else 5e-3  # Core ML's fp16 cache
    np.testing.assert_allclose(rewound, fresh[10:], atol=atol, rtol=0)
    np.testing.assert_allclose(step, fresh_step, atol=atol, rtol=0)
    # The stale slots held other keys: reading them would have changed these logits.
    session.reset()
    session.forward(np.asarray(first, dtype=np.int64), 0)
    assert np.abs(session.forward(np.asarray([other[0]], dtype=np.int64), 24) - fresh_step).max() > 1e-2


# -- the command line ------------------------------------------------------------------------------

def _heldout_prompt() -> str:
    return HELDOUT_TEXT.read_text(encoding="utf-8")[:300]


@pytest.mark.parametrize("target", ["executorch", "onnx"])
def test_cli_speculative_ngram_prints_the_plain_text_and_the_speedup(bundle, tokenizer, target):
    prompt = _heldout_prompt()
    plain = runner.invoke(app, ["generate", str(bundle), "-t", target, "--prompt", prompt, "-n", "40"])
    assert plain.exit_code == 0, plain.output
    result = runner.invoke(app, ["generate", str(bundle), "-t", target, "--prompt", prompt, "-n", "40",
                                 "--speculative", "ngram", "--draft-tokens", "5", "--compare"])
    assert result.exit_code == 0, result.output
    assert result.stdout == plain.stdout
    assert "5 per call" in result.stderr and "drafts accepted" in result.stderr
    assert "same tokens as plain greedy" in result.stderr and "x;" in result.stderr
    assert "decode 39 tokens" in result.stderr


def test_cli_speculative_draft_bundle(bundle, draft_bundle):
    prompt = _heldout_prompt()
    plain = runner.invoke(app, ["generate", str(bundle), "-t", "executorch", "--prompt", prompt, "-n", "40"])
    result = runner.invoke(app, ["generate", str(bundle), "-t", "executorch", "--prompt", prompt, "-n", "40",
                                 "--speculative", f"draft:{draft_bundle}"])
    assert result.exit_code == 0, result.output
    assert result.stdout == plain.stdout
    assert f"drafts from {draft_bundle} (onnx in" in result.stderr and "4 per call" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--draft-tokens", "3"], "--draft-tokens: goes with --speculative"),
    (["--compare"], "--compare: goes with --speculative"),
    (["--speculative", "medusa"], "--speculative: 'medusa' is neither ngram nor draft:PATH"),
    (["--speculative", "draft:"], "--speculative: 'draft:' is neither ngram nor draft:PATH"),
    (["--speculative", "ngram", "--temperature", "0.7"], "exact for greedy decoding only"),
])
def test_bad_speculative_flags_are_one_line(bundle, args, message):
    result = runner.invoke(app, ["generate", str(bundle), "--prompt", "x", *args])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert result.stdout == ""


def test_bad_draft_bundles_are_one_line(bundle, draft_bundle, tmp_path):
    result = runner.invoke(app, ["generate", str(bundle), "--prompt", "x", "--speculative", f"draft:{tmp_path / 'no'}"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "no such bundle folder" in result.stderr
    other = tmp_path / "other"
    shutil.copytree(draft_bundle, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped: not the same tokens
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = runner.invoke(app, ["generate", str(bundle), "--prompt", "x", "--speculative", f"draft:{other}"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {other}: draft bundle's tokenizer differs")
    result = runner.invoke(app, ["generate", str(bundle), "--chat", "--speculative", "ngram", "--compare"], input="hi\n")
    assert result.exit_code == 2 and "--compare: goes with --prompt, not --chat" in result.stderr


def test_speculative_refuses_sampling_in_the_library(bundle, prompts):
    session = open_bundle_model(bundle, "onnx").session
    decoder = SpeculativeDecoder(NgramDrafter(), 4)
    with pytest.raises(ValueError, match="greedy decoding only"):
        next(decoder(session, prompts[0], 0, 8, make_sampler(Sampling(1.0, seed=0))))
