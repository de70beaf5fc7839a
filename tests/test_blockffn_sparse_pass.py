"""The blockffn_sparse pass: the dense form's numbers from only the active experts, through export.

One small BlockFFN model (MLA, 2 layers, 8 experts of 16, vocab 500) whose layer 0 router is
planted so every token fires either all experts or none: decode steps then cover both extremes
(the 'none' case takes the stand-in expert path), and layer 1 keeps a random, partial pattern.
The .pte and .onnx of the sparse copy are each exported once and checked against the DENSE
PyTorch model, the same way the pipeline checks every artifact.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cpm_mobile.exporter.targets.registry import capabilities
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models import CausalLM, ModelConfig, load_model
from bench.synthetic import write_synthetic_checkpoint
from cpm_mobile.exporter.models.ffn import BlockFFN
from bench.presets import preset_config
from cpm_mobile.exporter.passes import PASSES, apply_passes, pass_refusals
from cpm_mobile.exporter.passes.blockffn_sparse import SparseBlockFFN, blockffn_sparse
from cpm_mobile.exporter.targets.base import ArtifactInfo, ExportContext
from cpm_mobile.exporter.targets.executorch.target import ExecuTorchTarget
from cpm_mobile.exporter.targets.onnx.target import OnnxTarget
from cpm_mobile.recipes.schema import PassSpec, load_recipe
from cpm_mobile.runtimes.base import open_session
from cpm_mobile.runtimes.check import CheckPlan, Observations, compare, greedy_runs, teacher_forced_runs
from cpm_mobile.runtimes.torch_session import TorchSession
from tests.conftest import TINY_BLOCKFFN, TINY_GQA, target_spec

MAX_SEQ_LEN = 128
VOCAB = 500
SIZES = dict(TINY_BLOCKFFN, vocab_size=VOCAB)
EXPERTS, WIDTH, HIDDEN = SIZES["num_experts"], SIZES["expert_size"], SIZES["hidden_size"]
LAYERS = SIZES["num_hidden_layers"]
EAGER_MAX_ABS = 1e-5
FP32_MAX_ABS_LOGITS = 1e-4
PROMPT_LENGTHS = (1, 6, 30, 90)  # 90 + 24 generated stays inside MAX_SEQ_LEN
NEW_TOKENS = 24


# -- fixtures ------------------------------------------------------------------------------------


def _plant_all_or_none(ffn: BlockFFN) -> None:
    """Every router row the same vector: a token fires all experts (x.w > 0) or none (x.w <= 0)."""
    with torch.no_grad():
        router = ffn.router_proj.weight
        router.copy_(router[:1].expand_as(router))


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> CausalLM:
    folder = write_synthetic_checkpoint(tmp_path_factory.mktemp("blockffn") / "blockffn", "blockffn-small", **SIZES)
    model, _ = load_model(folder, max_seq_len=MAX_SEQ_LEN, dtype=torch.float32)
    _plant_all_or_none(model.layers[0].mlp)
    return model


@pytest.fixture(scope="module")
def sparse(dense) -> CausalLM:
    return blockffn_sparse(dense, {}, capabilities("executorch"))


def _random_tokens(count: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, count).tolist()


@dataclasses.dataclass
class Reference:
    plan: CheckPlan
    runs: Observations
    decode_union_sizes: list[int]  # layer 0's active-expert count in each T=1 call


@pytest.fixture(scope="module")
def reference(dense) -> Reference:
    """The dense model's greedy runs, recording layer 0's union of active experts per call."""
    plan = CheckPlan(prompts=[_random_tokens(n, seed=n) for n in PROMPT_LENGTHS], max_new_tokens=NEW_TOKENS)
    sizes: list[tuple[int, int]] = []

    def record(_module, _args, scores):
        sizes.append((scores.shape[-2], int((scores != 0).reshape(-1, EXPERTS).any(0).sum())))

    hook = dense.layers[0].mlp.router_norm.register_forward_hook(record)
    try:
        runs = greedy_runs(TorchSession(dense), plan)
    finally:
        hook.remove()
        dense.reset_cache()
    return Reference(plan, runs, [count for tokens, count in sizes if tokens == 1])


@dataclasses.dataclass
class Exported:
    info: ArtifactInfo
    folder: Path

    @property
    def entry(self) -> Path:
        return self.folder / self.info.entry

    def session(self):
        return open_session(self.folder, dataclasses.asdict(self.info))


def _export(target, dense: CausalLM, folder: Path) -> Exported:
    """The pass applied for the target, as the pipeline does, then the target's export."""
    sparse = apply_passes(dense, [PassSpec(name="blockffn_sparse")], target.name)
    exported = target.export(sparse, folder, target_spec(target.name), ExportContext(1, (2,)), lambda *args: None)
    assert exported.twin is sparse  # the artifact is checked against the sparse form it was given
    return Exported(exported.info, folder)


@pytest.fixture(scope="module")
def pte(dense, tmp_path_factory) -> Exported:
    return _export(ExecuTorchTarget(), dense, tmp_path_factory.mktemp("pte"))


@pytest.fixture(scope="module")
def onnx_artifact(dense, tmp_path_factory) -> Exported:
    return _export(OnnxTarget(), dense, tmp_path_factory.mktemp("onnx"))


def _snapshot(model: CausalLM) -> dict[str, torch.Tensor]:
    tensors = {name: t for name, t in model.named_parameters()}
    tensors.update({f"buffer:{name}": t for name, t in model.named_buffers()})
    return {name: t.detach().clone() for name, t in tensors.items()}


def _logits(model: CausalLM, calls: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    model.reset_cache()
    with torch.no_grad():
        outputs = [model(torch.tensor([tokens]), torch.tensor([start])) for tokens, start in calls]
    model.reset_cache()
    return outputs


# -- eager: the same numbers as the dense form ---------------------------------------------------


def test_whole_model_matches_dense_in_prefill_and_decode(dense, sparse):
    prompt = _random_tokens(40, seed=1)
    calls = [(prompt, 0)] + [([token], 40 + i) for i, token in enumerate(_random_tokens(12, seed=2))]
    for ref, act in zip(_logits(dense, calls), _logits(sparse, calls)):
        assert act.shape == ref.shape
        assert float((act - ref).abs().max()) <= EAGER_MAX_ABS


def _layer_pair(seed: int) -> tuple[BlockFFN, SparseBlockFFN]:
    torch.manual_seed(seed)
    ffn = BlockFFN(HIDDEN, EXPERTS, WIDTH, 1e-6)
    for parameter in ffn.parameters():
        torch.nn.init.normal_(parameter, std=HIDDEN**-0.5)
    ffn.router_norm.weight.data.add_(1.0)
    return ffn.requires_grad_(False), SparseBlockFFN(ffn)


def test_layer_matches_dense_for_partial_none_and_all_experts():
    ffn, sparse_ffn = _layer_pair(0)
    x = torch.randn(1, 9, HIDDEN)
    partial = sparse_ffn.active_experts(ffn.router_scores(x[0, :1]))
    assert 0 < len(partial) < EXPERTS  # a random router fires some experts for a token
    for tokens in (x[:, :1], x):  # decode and prefill
        assert float((sparse_ffn(tokens) - ffn(tokens)).abs().max()) <= EAGER_MAX_ABS

    _plant_all_or_none(ffn)
    sparse_ffn = SparseBlockFFN(ffn)
    fires = (x[0] @ ffn.router_proj.weight[0]) > 0
    assert fires.any() and (~fires).any()
    none_token, all_token = x[:, ~fires][:, :1], x[:, fires][:, :1]
    assert sparse_ffn.active_experts(ffn.router_scores(none_token[0])).tolist() == [0]  # the stand-in
    assert sparse_ffn.active_experts(ffn.router_scores(all_token[0])).tolist() == list(range(EXPERTS))
    assert torch.equal(sparse_ffn(none_token), torch.zeros_like(none_token))
    assert torch.equal(ffn(none_token), torch.zeros_like(none_token))
    assert float((sparse_ffn(all_token) - ffn(all_token)).abs().max()) <= EAGER_MAX_ABS
    mixed = torch.cat([none_token, all_token, none_token], dim=1)  # union over T: all experts
    assert float((sparse_ffn(mixed) - ffn(mixed)).abs().max()) <= EAGER_MAX_ABS


def test_gathers_only_the_union_of_active_experts():
    ffn, sparse_ffn = _layer_pair(1)
    x = torch.randn(2, HIDDEN)  # two tokens: a union over T, with idle experts left
    scores = ffn.router_scores(x)
    union = (scores != 0).any(0)
    assert not union.all()
    assert sparse_ffn.active_experts(scores).tolist() == torch.nonzero(union).reshape(-1).tolist()
    # An idle expert's weights do not take part: poisoning them leaves the output unchanged.
    expected = ffn(x)
    idle = int(torch.nonzero(~union)[0])
    with torch.no_grad():
        sparse_ffn.up_experts[idle] = float("nan")  # the dense module's own storage, viewed per expert
        sparse_ffn.down_experts[idle] = float("nan")
    assert torch.isnan(ffn.up_proj.weight).any()
    assert float((sparse_ffn(x) - expected).abs().max()) <= EAGER_MAX_ABS


def test_the_copy_leaves_the_input_model_untouched(tmp_path):
    folder = write_synthetic_checkpoint(tmp_path / "m", "blockffn-small", **SIZES)
    model, _ = load_model(folder, max_seq_len=32, dtype=torch.float32)
    before = _snapshot(model)
    copy = blockffn_sparse(model, {}, capabilities("onnx"))  # the gather form (executorch: tests/test_sparse_kernel.py)
    _logits(copy, [(_random_tokens(9, seed=3), 0), ([5], 9)])  # runs write the copy's own caches
    with torch.no_grad():
        copy(torch.tensor([[7, 8]]), torch.tensor([0]))  # and leave them filled
    after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(isinstance(layer.mlp, BlockFFN) for layer in model.layers)
    assert all(isinstance(layer.mlp, SparseBlockFFN) for layer in copy.layers)
    assert copy.layers is not model.layers and copy.kv_caches is not model.kv_caches
    # Weights are shared, not copied, except the experts' re-laid-out blocks.
    assert copy.embed_tokens.weight is model.embed_tokens.weight
    assert copy.layers[0].self_attn is model.layers[0].self_attn  # untouched modules are shared as they are
    assert copy.layers[0].mlp.router_proj.weight is model.layers[0].mlp.router_proj.weight
    assert copy.layers[0].mlp.up_experts.data_ptr() == model.layers[0].mlp.up_proj.weight.data_ptr()


def test_registered_and_refuses_models_without_blockffn_and_unknown_options(dense):
    assert PASSES["blockffn_sparse"].function is blockffn_sparse
    applied = apply_passes(dense, [PassSpec(name="blockffn_sparse")], "onnx")
    assert all(isinstance(layer.mlp, SparseBlockFFN) for layer in applied.layers)
    gqa = CausalLM(ModelConfig.from_hf_dict(preset_config("minicpm4-0.5b", **TINY_GQA, vocab_size=VOCAB)), 16)
    with pytest.raises(InputError, match="BlockFFN"):
        blockffn_sparse(gqa, {}, capabilities("onnx"))
    with pytest.raises(InputError, match="already"):
        blockffn_sparse(applied, {}, capabilities("onnx"))
    with pytest.raises(InputError, match="no options"):
        blockffn_sparse(dense, {"threshold": 0.1}, capabilities("onnx"))


def test_recipe_lists_only_the_targets_that_run_the_gathers():
    [refusal] = pass_refusals([PassSpec(name="blockffn_sparse")], "coreml")  # the target's own reason
    assert "non_zero" in refusal
    assert pass_refusals([PassSpec(name="blockffn_sparse")], "executorch") == []
    assert pass_refusals([PassSpec(name="blockffn_sparse")], "onnx") == []
    recipe = load_recipe("fp32-sparse")
    assert set(recipe.targets) == {"executorch", "onnx"}
    fp32 = load_recipe("fp32")
    for name, spec in recipe.targets.items():
        assert [p.name for p in spec.passes] == ["blockffn_sparse"]
        # Exact: held to the fp32 bounds against both the sparse twin and the dense reference.
        assert spec.faithfulness == fp32.targets[name].faithfulness and spec.fidelity == fp32.targets[name].fidelity


# -- exported: the artifacts match the dense reference -------------------------------------------


def test_reference_decode_covers_no_expert_and_all_experts(reference):
    assert 0 in reference.decode_union_sizes
    assert EXPERTS in reference.decode_union_sizes


@pytest.mark.slow
@pytest.mark.parametrize("artifact", ["pte", "onnx_artifact"])
def test_artifact_matches_the_dense_reference(artifact, reference, request):
    exported: Exported = request.getfixturevalue(artifact)
    measured = compare(reference.runs, teacher_forced_runs(exported.session(), reference.plan, reference.runs),
                       reference.plan)
    assert measured["max_abs_logits"] <= FP32_MAX_ABS_LOGITS, measured
    assert measured["greedy"] == 1.0 and measured["greedy_prefix_tokens"] == measured["greedy_tokens"], measured
    assert measured["greedy_tokens"] == [NEW_TOKENS] * len(PROMPT_LENGTHS)


def test_pte_runs_the_fused_expert_kernel_outside_the_delegate(pte):
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import KernelCall

    program = deserialize_pte_binary(pte.entry.read_bytes()).program
    plan = next(p for p in program.execution_plan if p.name == "forward")
    calls = [i.instr_args for chain in plan.chains for i in chain.instructions if isinstance(i.instr_args, KernelCall)]
    names = [plan.operators[call.op_index].name for call in calls]
    assert names.count("cpm_mobile::sparse_expert_ffn") == LAYERS  # one kernel call per BlockFFN layer
    assert "aten::nonzero" not in names and "aten::mm" not in names  # no gathers, no expert matmuls left
    assert pte.info.metadata["app_kernels"] == {"libcpm_mobile_kernels": ["cpm_mobile::sparse_expert_ffn.out"]}


def test_onnx_gathers_expert_rows_after_nonzero(onnx_artifact):
    graph = onnx.load(onnx_artifact.entry, load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("NonZero") == LAYERS
    expert_tables = {t.name for t in graph.initializer if list(t.dims) == [EXPERTS, HIDDEN * WIDTH]}
    assert len(expert_tables) == 2 * LAYERS
    gathers = [node for node in graph.node if node.op_type == "Gather" and node.input[0] in expert_tables]
    assert len(gathers) == 2 * LAYERS
    # No dense expert matrix is left in the graph: [E*de, H] up or [H, E*de] down.
    dense_shapes = ([EXPERTS * WIDTH, HIDDEN], [HIDDEN, EXPERTS * WIDTH])
    assert not [t.name for t in graph.initializer if list(t.dims) in dense_shapes and "mlp" in t.name]


def test_coreml_target_refuses_the_sparse_form_before_exporting(dense, tmp_path):
    from cpm_mobile.exporter.errors import InputError

    with pytest.raises(InputError, match="coreml"):
        apply_passes(dense, [PassSpec(name="blockffn_sparse")], "coreml")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("artifact", ["pte", "onnx_artifact"])
def test_artifact_size_is_the_predicted_one(artifact, dense, request):
    """The sparse form regroups the experts' weights without adding any: `cpm-mobile inspect`'s
    prediction (exporter/sizes.py, the pass applied to the shapes) holds within 10 %."""
    from cpm_mobile.exporter.sizes import predict_bytes

    exported: Exported = request.getfixturevalue(artifact)
    target = exported.info.target
    sparse = apply_passes(dense, [PassSpec(name="blockffn_sparse")], target)
    size = sum((exported.folder / name).stat().st_size for name in exported.info.files)
    assert abs(size / predict_bytes(sparse, target_spec(target)) - 1) <= 0.10, (size, predict_bytes(sparse, target_spec(target)))
