"""ExecuTorch target: the .pte against the PyTorch reference, in our runtime and in ExecuTorch's LLM runner.

Each artifact is exported once per module: a MiniCPM4-0.5B-layout GQA model (LongRoPE, tied
embeddings, vocab 73448) with custom-op attention and with plain attention, and a BlockFFN-small
MLA model (key width 192 != value width 128) with custom-op attention.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models import load_model
from bench.synthetic import write_synthetic_checkpoint
from cpm_mobile.exporter.models.kv_cache import StaticKVCache
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.targets.base import ArtifactInfo, ExportContext
from cpm_mobile.exporter.targets.executorch.target import ExecuTorchTarget, export_ready
from cpm_mobile.runtimes.base import open_session
from cpm_mobile.runtimes.check import CheckPlan, compare, greedy_runs, teacher_forced_runs
from cpm_mobile.runtimes.executorch import ExecuTorchSession, load_program, read_constant_method
from cpm_mobile.runtimes.torch_session import TorchSession
from tests.conftest import target_spec

MAX_SEQ_LEN = 128
GQA_SIZES = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256)
# blockffn-small's head widths (qk 128 + 64 rope = 192, v 128) with a narrow, shallow body.
MLA_SIZES = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                 q_lora_rank=64, kv_lora_rank=32, num_experts=8, expert_size=32)
FP32_MAX_ABS_LOGITS = 1e-4
GREEDY_TOKENS = 64
TOKENIZER_TEXT = (
    "ExecuTorch runs PyTorch programs on phones. A program holds methods; each method is a graph of "
    "operators, and a backend such as XNNPACK may take over parts of it. The runner reads the prompt, "
    "fills the cache in one call, then decodes one token at a time until it meets an end token. "
    "Keys and values stay in buffers that live as long as the method does. Small models load fast, "
    "and quantised weights make them smaller still; the check compares every logit with the reference. "
)


@dataclasses.dataclass
class Exported:
    model: CausalLM
    info: ArtifactInfo
    folder: Path
    stages: list[tuple[str, float | None]]
    state_before: dict[str, torch.Tensor]
    state_after: dict[str, torch.Tensor]  # right after export, before any test runs the model
    caches_after: list[type]

    @property
    def artifact(self) -> dict:
        return dataclasses.asdict(self.info)

    @property
    def pte(self) -> Path:
        return self.folder / self.info.entry

    def session(self) -> ExecuTorchSession:
        return open_session(self.folder, self.artifact)


# -- fixtures ------------------------------------------------------------------------------------


def _ascii_tokenizer(folder: Path) -> Path:
    """Byte-level BPE over ASCII text only (<unk>=0, <s>=1, </s>=2): every token is whole UTF-8,
    so the runner's token_callback never receives a partial character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([TOKENIZER_TEXT] * 4, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    return _ascii_tokenizer(tmp_path_factory.mktemp("ascii-tokenizer"))


def _load(tmp_path_factory, name: str, preset: str, sizes: dict, tokenizer_folder: Path) -> CausalLM:
    from tokenizers import Tokenizer

    folder = write_synthetic_checkpoint(tmp_path_factory.mktemp(name) / name, preset, **sizes)
    model, _ = load_model(folder, max_seq_len=MAX_SEQ_LEN, dtype=torch.float32)
    # A random model's argmax falls anywhere in the vocab; the runner can only decode ids the small
    # test tokenizer knows, so the output rows above it are damped (still compared, just smaller).
    known = Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json")).get_vocab_size()
    with torch.no_grad():
        model.lm_head.weight[known:] *= 0.1
    return model


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory, tokenizer_folder) -> CausalLM:
    return _load(tmp_path_factory, "minicpm4", "minicpm4-0.5b", GQA_SIZES, tokenizer_folder)


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory, tokenizer_folder) -> CausalLM:
    return _load(tmp_path_factory, "blockffn", "blockffn-small", MLA_SIZES, tokenizer_folder)


def _snapshot(model: CausalLM) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update({f"buffer:{name}": buffer for name, buffer in model.named_buffers()})
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def _export(model: CausalLM, folder: Path, attention: str) -> Exported:
    context = ExportContext(bos_id=model.config.bos_token_id, eos_ids=model.config.eos_token_ids)
    stages: list[tuple[str, float | None]] = []
    before = _snapshot(model)
    spec = target_spec("executorch", options={"attention": attention})
    info = ExecuTorchTarget().export(model, folder, spec, context, lambda text, done: stages.append((text, done))).info
    return Exported(model, info, folder, stages, before, _snapshot(model), [type(c) for c in model.kv_caches])


@pytest.fixture(scope="module")
def gqa_custom(gqa_model, tmp_path_factory) -> Exported:
    return _export(gqa_model, tmp_path_factory.mktemp("gqa-custom"), "custom_sdpa")


@pytest.fixture(scope="module")
def gqa_plain(gqa_model, tmp_path_factory) -> Exported:
    return _export(gqa_model, tmp_path_factory.mktemp("gqa-plain"), "plain")


@pytest.fixture(scope="module")
def mla_custom(mla_model, tmp_path_factory) -> Exported:
    return _export(mla_model, tmp_path_factory.mktemp("mla-custom"), "custom_sdpa")


ARTIFACTS = ["gqa_custom", "gqa_plain", "mla_custom"]


def _torch_logits(model: CausalLM, calls: list[tuple[list[int], int]]) -> list[np.ndarray]:
    session = TorchSession(model)
    session.reset()
    return [session.forward(np.asarray(tokens, dtype=np.int64), start) for tokens, start in calls]


def _random_tokens(count: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, count).tolist()


# -- numbers against the reference ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ARTIFACTS)
def test_pte_matches_pytorch_prefill_and_greedy_decode(name, request):
    exported: Exported = request.getfixturevalue(name)
    vocab = exported.model.config.vocab_size
    # Three prompt lengths through the one dynamic-T method, each followed by 64 decode steps.
    plan = CheckPlan(prompts=[_random_tokens(n, vocab, seed=n) for n in (5, 17, 40)], max_new_tokens=GREEDY_TOKENS)
    reference = greedy_runs(TorchSession(exported.model), plan)
    measured = compare(reference, teacher_forced_runs(exported.session(), plan, reference), plan)
    assert measured["max_abs_logits"] <= FP32_MAX_ABS_LOGITS, measured
    assert measured["greedy_tokens"] == [GREEDY_TOKENS] * 3
    assert measured["greedy"] == 1.0 and measured["greedy_prefix_tokens"] == measured["greedy_tokens"], measured
    assert measured["top1"] == 1.0


@pytest.mark.parametrize("name", ["gqa_custom", "mla_custom"])
def test_chunked_prefill_and_full_window(name, request):
    exported: Exported = request.getfixturevalue(name)
    vocab = exported.model.config.vocab_size
    chunks = [(_random_tokens(9, vocab, 1), 0), (_random_tokens(23, vocab, 2), 9), (_random_tokens(1, vocab, 3), 32)]
    window = [(_random_tokens(MAX_SEQ_LEN, vocab, 4), 0)]  # T at its upper bound
    session = exported.session()
    for calls in (chunks, window):
        session.reset()
        actual = [session.forward(np.asarray(tokens), start) for tokens, start in calls]
        for ref, act in zip(_torch_logits(exported.model, calls), actual):
            assert act.shape == ref.shape
            assert np.max(np.abs(act - ref)) <= FP32_MAX_ABS_LOGITS


@pytest.mark.parametrize("model_name", ["gqa_model", "mla_model"])
def test_custom_op_cache_is_exact_in_eager(model_name, request):
    """The swapped-in cache alone (no export): same logits as the module's own attention."""
    model: CausalLM = request.getfixturevalue(model_name)
    vocab = model.config.vocab_size
    calls = [(_random_tokens(11, vocab, 10), 0), (_random_tokens(6, vocab, 11), 11), (_random_tokens(1, vocab, 12), 17)]
    reference = _torch_logits(model, calls)
    actual = _torch_logits(export_ready(model, "custom_sdpa"), calls)
    for ref, act in zip(reference, actual):
        assert np.max(np.abs(act - ref)) <= 2e-5


def test_tokens_beyond_the_cache_are_refused(gqa_custom):
    session = gqa_custom.session()
    with pytest.raises(ValueError, match="max_seq_len"):
        session.forward(np.zeros(8, dtype=np.int64), MAX_SEQ_LEN - 4)


def test_reset_gives_an_empty_cache(gqa_custom):
    model, vocab = gqa_custom.model, gqa_custom.model.config.vocab_size
    session = gqa_custom.session()
    session.forward(np.asarray(_random_tokens(50, vocab, 5)), 0)
    session.reset()
    # Positions 0..19 are skipped: they must read as empty, not as the previous sequence's keys.
    gap = [(_random_tokens(4, vocab, 6), 20), (_random_tokens(1, vocab, 7), 24)]
    actual = [session.forward(np.asarray(tokens), start) for tokens, start in gap]
    for ref, act in zip(_torch_logits(model, gap), actual):
        assert np.max(np.abs(act - ref)) <= FP32_MAX_ABS_LOGITS
    session.reset()
    fresh = [(_random_tokens(12, vocab, 8), 0), (_random_tokens(1, vocab, 9), 12)]
    actual = [session.forward(np.asarray(tokens), start) for tokens, start in fresh]
    for ref, act in zip(_torch_logits(model, fresh), actual):
        assert np.max(np.abs(act - ref)) <= FP32_MAX_ABS_LOGITS


# -- what the artifact declares ------------------------------------------------------------------


@pytest.mark.parametrize("name", ARTIFACTS)
def test_constant_methods_hold_the_model_facts(name, request):
    exported: Exported = request.getfixturevalue(name)
    config = exported.model.config
    expected = {
        "get_max_seq_len": MAX_SEQ_LEN,
        "get_max_context_len": MAX_SEQ_LEN,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": exported.info.metadata["attention"] == "custom_sdpa",
        "get_eos_ids": list(config.eos_token_ids),
        "get_bos_id": 1,
        "get_vocab_size": config.vocab_size,
        "get_n_layers": 2,
    }
    program = load_program(exported.pte)
    as_lists = {name: value if isinstance(value, list) else [value] for name, value in expected.items()}
    assert {name: read_constant_method(program, name) for name in expected} == as_lists
    assert program.method_names == {"forward", *expected}
    assert exported.info.metadata["constant_methods"] == expected


def test_eos_ids_of_minicpm4_are_both_declared(gqa_custom):
    assert read_constant_method(load_program(gqa_custom.pte), "get_eos_ids") == [2, 73440]


@pytest.mark.parametrize("name, attention, value_padding", [
    ("gqa_custom", "custom_sdpa", None),
    ("gqa_plain", "plain", None),
    ("mla_custom", "custom_sdpa", {"from": 128, "to": 192}),
])
def test_artifact_info_describes_the_file(name, attention, value_padding, request):
    exported: Exported = request.getfixturevalue(name)
    info = exported.info
    assert (info.target, info.files, info.entry) == ("executorch", ["model.pte"], "model.pte")
    assert sorted(p.name for p in exported.folder.iterdir()) == ["model.pte"]  # no temporary left behind
    assert info.metadata["size_bytes"] == exported.pte.stat().st_size
    assert info.metadata["backend"] == "xnnpack"
    assert info.metadata["precision"] == "fp32"
    assert info.metadata["attention"] == attention
    assert info.metadata.get("value_padding") == value_padding
    custom_kernels = {"llama::update_cache.out", "llama::custom_sdpa.out"}
    assert (custom_kernels <= set(info.metadata["kernels"])) == (attention == "custom_sdpa")
    assert info.metadata["delegates"].get("XnnpackBackend", 0) >= 1
    assert info.io["method"] == "forward"
    assert [i["name"] for i in info.io["inputs"]] == ["tokens", "input_pos"]
    assert info.io["outputs"][0]["shape"] == [1, "T", exported.model.config.vocab_size]
    assert info.io["dynamic_dims"] == {"T": {"min": 1, "max": MAX_SEQ_LEN}}
    cache = info.io["cache"]
    assert cache["kind"] == "mutable_buffers"
    config = exported.model.config
    assert (cache["layers"], cache["max_seq_len"], cache["heads"]) == (2, MAX_SEQ_LEN, config.cache_heads)
    assert (cache["key_dim"], cache["value_dim"]) == (config.k_head_dim, config.value_head_dim)
    stages = [text.split(":")[0] for text, _ in exported.stages]
    assert stages[:4] == ["export", "lower", "to_executorch", "save"]
    fractions = [done for _, done in exported.stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    json.dumps(dataclasses.asdict(info))  # goes into manifest.json as it is


@pytest.mark.parametrize("name", ["gqa_custom", "mla_custom"])
def test_export_leaves_the_callers_model_unchanged(name, request):
    exported: Exported = request.getfixturevalue(name)
    after = exported.state_after
    assert after.keys() == exported.state_before.keys()
    for key, before in exported.state_before.items():
        assert torch.equal(after[key], before), key
    assert exported.caches_after == [StaticKVCache] * 2


def test_a_model_not_in_fp32_is_an_input_error(gqa_model, tmp_path):
    half = copy.deepcopy(gqa_model).to(torch.float16)
    with pytest.raises(InputError, match="fp32|float32"):
        ExecuTorchTarget().export(half, tmp_path, target_spec("executorch"), ExportContext(1, (2,)), lambda *_: None)
    assert not any(tmp_path.iterdir())


# -- the runtime's errors ------------------------------------------------------------------------


def test_missing_or_invalid_program_is_an_input_error(tmp_path):
    artifact = {"target": "executorch", "files": ["model.pte"], "entry": "model.pte", "io": {}, "metadata": {}}
    with pytest.raises(InputError, match="not found"):
        open_session(tmp_path, artifact)
    (tmp_path / "model.pte").write_bytes(b"not a flatbuffer" * 64)
    with pytest.raises(InputError, match="not a valid ExecuTorch program"):
        open_session(tmp_path, artifact)


def test_session_says_what_it_verified(gqa_custom):
    session = gqa_custom.session()
    assert session.verified == "ExecuTorch runtime verified (XNNPACK + portable kernels)"
    assert session.max_seq_len == MAX_SEQ_LEN


# -- ExecuTorch's own LLM runner -----------------------------------------------------------------


def _torch_greedy(model: CausalLM, prompt: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    session = TorchSession(model)
    session.reset()
    logits = session.forward(np.asarray(prompt, dtype=np.int64), 0)
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        generated.append(int(logits[-1].argmax()))
        if generated[-1] in stop_ids:
            break
        logits = session.forward(np.asarray(generated[-1:], dtype=np.int64), len(prompt) + len(generated) - 1)
    return generated


@pytest.mark.parametrize("name", ["gqa_custom", "mla_custom"])
def test_llm_runner_generates_the_reference_text(name, request, tokenizer_folder):
    from tokenizers import Tokenizer

    from cpm_mobile.runtimes.executorch import load_kernel_libraries

    load_kernel_libraries()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    exported: Exported = request.getfixturevalue(name)
    tokenizer = Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json"))
    # The runner's tokenizer.json path ignores GenerationConfig.num_bos: BOS comes from the text.
    prompt = "<s>The runner reads the prompt"
    prompt_ids = tokenizer.encode(prompt).ids
    assert prompt_ids[0] == 1
    max_new_tokens = 24
    stop_ids = set(exported.model.config.eos_token_ids)
    generated = _torch_greedy(exported.model, prompt_ids, max_new_tokens, stop_ids)
    assert max(generated) < tokenizer.get_vocab_size(), "fixture: reference left the tokenizer's range"
    expected = tokenizer.decode([t for t in generated if t not in stop_ids], skip_special_tokens=False)
    assert len(set(generated)) > 1 or name == "gqa_custom"  # tied random embeddings may repeat

    pieces: list[str] = []
    runner = TextLLMRunner(str(exported.pte), str(tokenizer_folder))
    config = GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0)
    runner.generate(prompt, config, pieces.append)
    assert "".join(pieces) == expected
