"""ONNX target: onnxruntime vs PyTorch, genai's contract and runner, external data, no mutation."""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models import CausalLM, load_model
from bench.synthetic import write_synthetic_checkpoint
from cpm_mobile.exporter.targets.base import ArtifactInfo, ExportContext
from cpm_mobile.exporter.targets.onnx.target import OnnxTarget
from cpm_mobile.runtimes import check
from cpm_mobile.runtimes.base import open_session
from cpm_mobile.runtimes.onnx import OnnxSession, open_onnx
from cpm_mobile.runtimes.torch_session import TorchSession
from tests.conftest import TINY_BLOCKFFN, TINY_GQA, target_spec

MAX_SEQ_LEN = 128
NEW_TOKENS = 64
PROMPT_LENGTHS = (1, 3, 17, 40)  # 40 + 64 generated stays inside MAX_SEQ_LEN
FP32_MAX_ABS = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread mostly waits for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Exported:
    model: CausalLM
    before: dict[str, Any]  # the model's state captured before export...
    after: dict[str, Any]  # ...and right after (later runs of the reference fill its KV cache)
    info: ArtifactInfo
    folder: Path
    progress: list[tuple[str, float | None]]

    @property
    def artifact(self) -> dict[str, Any]:
        return dataclasses.asdict(self.info)


def _state(model: CausalLM) -> dict[str, Any]:
    return {
        "tensors": {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]},
        "ids": {name: id(t) for name, t in [*model.named_parameters(), *model.named_buffers()]},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def _export(root: Path, preset: str, overrides: dict, precision: str = "fp32", **options: Any) -> Exported:
    checkpoint = write_synthetic_checkpoint(root / "checkpoint", preset, **overrides)
    model, _ = load_model(checkpoint, max_seq_len=MAX_SEQ_LEN)
    before = _state(model)
    config = model.config
    context = ExportContext(bos_id=config.bos_token_id, eos_ids=config.eos_token_ids)
    spec = target_spec("onnx", precision=precision, options=options)
    calls: list[tuple[str, float | None]] = []
    folder = root / "bundle"
    info = OnnxTarget().export(model, folder, spec, context, lambda text, fraction: calls.append((text, fraction))).info
    return Exported(model, before, _state(model), info, folder, calls)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> Exported:
    # MiniCPM4-0.5B layout with an untied lm_head: with tied embeddings a random model just repeats
    # the last token, and equal greedy continuations would prove little.
    return _export(tmp_path_factory.mktemp("gqa"), "minicpm4-0.5b", dict(TINY_GQA, tie_word_embeddings=False))


@pytest.fixture(scope="module")
def mla(tmp_path_factory) -> Exported:
    return _export(tmp_path_factory.mktemp("mla"), "blockffn-small", TINY_BLOCKFFN)


@pytest.fixture(params=["gqa", "mla"])
def exported(request) -> Exported:
    return request.getfixturevalue(request.param)


def _plan(vocab: int, lengths=PROMPT_LENGTHS, new_tokens: int = NEW_TOKENS) -> check.CheckPlan:
    rng = np.random.default_rng(7)
    return check.CheckPlan(prompts=[[int(t) for t in rng.integers(3, vocab, n)] for n in lengths], max_new_tokens=new_tokens)


def _compare(exported: Exported, plan: check.CheckPlan, artifact: dict[str, Any] | None = None):
    reference = check.greedy_runs(TorchSession(exported.model), plan)
    session = open_onnx(exported.folder, artifact or exported.artifact, threads=1)
    return reference, check.compare(reference, check.teacher_forced_runs(session, plan, reference), plan)


def test_onnxruntime_matches_pytorch(exported: Exported):
    plan = _plan(exported.model.config.vocab_size)
    reference, metrics = _compare(exported, plan)

    assert metrics["max_abs_logits"] <= FP32_MAX_ABS
    assert metrics["greedy_prefix_tokens"] == [NEW_TOKENS] * len(PROMPT_LENGTHS)
    assert metrics["top1"] == 1.0
    # The continuations are varied text, not one repeated token.
    assert all(len(set(run.generated)) > NEW_TOKENS // 2 for run in reference.runs)


def test_registered_runtime_opens_the_bundle(gqa: Exported):
    session = open_session(gqa.folder, gqa.artifact)
    assert isinstance(session, OnnxSession) and session.max_seq_len == MAX_SEQ_LEN
    assert session.verified == "onnxruntime verified (CPUExecutionProvider)"


def test_session_rewinds_and_resets(gqa: Exported):
    session = open_onnx(gqa.folder, gqa.artifact, threads=1)
    tokens = np.array([5, 900, 17, 4000, 23, 61], dtype=np.int64)
    whole = session.forward(tokens, 0)
    session.forward(np.array([77, 78], dtype=np.int64), 6)
    # Back to position 4: the cache keeps positions 0..3 and the rows match the one-shot prefill.
    np.testing.assert_allclose(session.forward(tokens[4:], 4), whole[4:], atol=1e-5)
    with pytest.raises(ValueError, match="gap"):
        session.forward(tokens[:1], 10)
    with pytest.raises(ValueError, match="max_seq_len"):
        session.forward(np.zeros(MAX_SEQ_LEN, dtype=np.int64), 1)
    session.reset()
    np.testing.assert_allclose(session.forward(tokens[:3], 0), whole[:3], atol=1e-5)


def test_graph_has_genai_names_and_opset(exported: Exported):
    graph_model = onnx.load(exported.folder / "model.onnx", load_external_data=False)
    onnx.checker.check_model(graph_model, full_check=True)
    layers = exported.model.config.num_layers
    opset = {entry.domain: entry.version for entry in graph_model.opset_import}[""]
    assert opset >= 20 and exported.info.metadata["opset"] == opset

    def shapes(values):
        return {
            v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values
        }

    inputs, outputs = shapes(graph_model.graph.input), shapes(graph_model.graph.output)
    cache = exported.info.io["cache"]
    heads, key_dim = cache["heads"], cache["key_dim"]
    value_dim = cache.get("stored_value_dim") or cache["value_dim"]  # the graph's width: zero-padded for MLA
    float32, int64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    expected_inputs = {
        "input_ids": (int64, [1, "sequence_length"]),
        "attention_mask": (int64, [1, "total_sequence_length"]),
        "position_ids": (int64, [1, "sequence_length"]),
    }
    expected_outputs = {"logits": (float32, [1, "sequence_length", exported.model.config.vocab_size])}
    for i in range(layers):
        expected_inputs[f"past_key_values.{i}.key"] = (float32, [1, heads, "past_sequence_length", key_dim])
        expected_inputs[f"past_key_values.{i}.value"] = (float32, [1, heads, "past_sequence_length", value_dim])
        expected_outputs[f"present.{i}.key"] = (float32, [1, heads, "total_sequence_length", key_dim])
        expected_outputs[f"present.{i}.value"] = (float32, [1, heads, "total_sequence_length", value_dim])
    assert inputs == expected_inputs and list(inputs) == list(expected_inputs)
    assert outputs == expected_outputs and list(outputs) == list(expected_outputs)
    # The manifest's I/O contract says the same.
    assert [(v["name"], v["shape"]) for v in exported.info.io["inputs"]] == [(k, s) for k, (_, s) in expected_inputs.items()]

    genai = json.loads((exported.folder / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert genai["model"]["type"] == "llama" and genai["search"]["past_present_share_buffer"] is False
    assert decoder["filename"] == "model.onnx" and genai["model"]["context_length"] == MAX_SEQ_LEN
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (layers, heads, key_dim)
    assert genai["model"]["vocab_size"] == exported.model.config.vocab_size
    names = decoder["inputs"] | decoder["outputs"]
    for role in ("input_ids", "attention_mask", "position_ids", "logits"):
        assert names[role] in inputs | outputs
    for pattern in ("past_key_names", "past_value_names", "present_key_names", "present_value_names"):
        assert all(names[pattern] % i in inputs | outputs for i in range(layers))


def test_mla_values_are_padded_to_the_key_width_for_genai(mla: Exported):
    config = mla.model.config
    cache = mla.info.io["cache"]
    assert config.k_head_dim != config.value_head_dim
    assert cache["key_dim"] == cache["stored_value_dim"] == config.k_head_dim
    assert cache["value_dim"] == config.value_head_dim
    assert mla.info.metadata["value_padding"] == config.k_head_dim - config.value_head_dim


def test_unpadded_mla_runs_but_says_genai_is_unsupported(tmp_path):
    exported = _export(tmp_path, "blockffn-small", TINY_BLOCKFFN, pad_mla_values=False)
    config = exported.model.config

    assert exported.info.io["cache"]["value_dim"] == config.value_head_dim != config.k_head_dim
    assert "genai_config.json" not in exported.info.files and not (exported.folder / "genai_config.json").exists()
    assert exported.info.metadata["genai_config"] is None
    assert exported.info.metadata["genai"].startswith("not supported")
    _, metrics = _compare(exported, _plan(config.vocab_size, lengths=(9,), new_tokens=8))
    assert metrics["max_abs_logits"] <= FP32_MAX_ABS


def _write_tokenizer(folder: Path) -> None:
    """A byte-level BPE of 300 tokens, <s>=1 and </s>=2 as in MiniCPM."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world, tiny tests"] * 20, trainer)
    assert (tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")) == (1, 2)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_onnxruntime_genai_generates_the_pytorch_tokens(exported: Exported, tmp_path):
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    folder = tmp_path / "genai"
    shutil.copytree(exported.folder, folder)
    _write_tokenizer(folder)
    model = og.Model(str(folder))
    text = "hello world, the quick brown fox"
    prompt = [int(t) for t in og.Tokenizer(model).encode(text)]
    assert prompt == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids

    new_tokens = 48
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    prefill_logits = np.asarray(generator.get_output("logits"))[0]
    while not generator.is_done():
        generator.generate_next_token()
    generated = [int(t) for t in generator.get_sequence(0)][len(prompt) :]

    plan = check.CheckPlan(prompts=[prompt], max_new_tokens=new_tokens, stop_ids=exported.model.config.eos_token_ids)
    reference = check.greedy_runs(TorchSession(exported.model), plan).runs[0]
    assert generated == reference.generated
    assert len(set(generated)) > new_tokens // 2
    np.testing.assert_allclose(prefill_logits, reference.logits[: len(prompt)], atol=FP32_MAX_ABS, rtol=0)


def test_external_data_below_threshold_and_stale_data_removed(tmp_path):
    # The real MiniCPM4 layout (tied embeddings) with the threshold forced down to 1 byte.
    exported = _export(tmp_path, "minicpm4-0.5b", TINY_GQA, external_data_threshold_bytes=1)
    folder = exported.folder

    assert exported.info.metadata["external_data"] is True
    assert exported.info.files == ["model.onnx", "model.onnx.data", "genai_config.json"]
    data_size, graph_size = (folder / "model.onnx.data").stat().st_size, (folder / "model.onnx").stat().st_size
    embedding_bytes = exported.model.embed_tokens.weight.numel() * 4
    assert data_size >= embedding_bytes and graph_size < embedding_bytes // 10
    assert exported.info.metadata["size_bytes"] == data_size + graph_size + (folder / "genai_config.json").stat().st_size
    assert sorted(p.name for p in folder.iterdir()) == sorted(exported.info.files)  # no staging leftovers
    _, metrics = _compare(exported, _plan(exported.model.config.vocab_size, lengths=(9,), new_tokens=16))
    assert metrics["max_abs_logits"] <= FP32_MAX_ABS

    # Exported again with the default threshold: one file, and the old weights file is gone.
    info = OnnxTarget().export(exported.model, folder, target_spec("onnx"), ExportContext(1, (2,)), lambda *_: None).info
    assert info.metadata["external_data"] is False and info.files == ["model.onnx", "genai_config.json"]
    assert not (folder / "model.onnx.data").exists()
    assert (folder / "model.onnx").stat().st_size >= embedding_bytes


def test_fp16_export_runs_and_keeps_the_model_fp32(tmp_path):
    exported = _export(tmp_path, "minicpm4-0.5b", dict(TINY_GQA, tie_word_embeddings=False), precision="fp16")

    assert exported.info.io["cache"]["dtype"] == "float16" and exported.info.metadata["precision"] == "fp16"
    assert exported.model.embed_tokens.weight.dtype == torch.float32
    _assert_unchanged(exported)
    _, metrics = _compare(exported, _plan(exported.model.config.vocab_size, lengths=(9,), new_tokens=16))
    assert metrics["max_abs_logits"] <= 0.05 and metrics["top1"] >= 0.9


def _assert_unchanged(exported: Exported) -> None:
    before, after = exported.before, exported.after
    assert after["ids"] == before["ids"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    for name, tensor in before["tensors"].items():
        assert after["tensors"][name].dtype == tensor.dtype and torch.equal(after["tensors"][name], tensor), name


def test_export_leaves_the_callers_model_unchanged(exported: Exported):
    _assert_unchanged(exported)


def test_progress_runs_from_zero_to_one(gqa: Exported):
    fractions = [fraction for _, fraction in gqa.progress]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    assert not any(text.startswith("onnx") for text, _ in gqa.progress)  # the pipeline prefixes the target's name


def test_missing_or_invalid_model_is_an_input_error(gqa: Exported, tmp_path):
    with pytest.raises(InputError, match="missing"):
        open_session(tmp_path, gqa.artifact)
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf")
    (tmp_path / "genai_config.json").write_text("{}")
    with pytest.raises(InputError, match="onnxruntime cannot load") as raised:
        open_session(tmp_path, gqa.artifact)
    assert raised.value.path == tmp_path / "model.onnx"
