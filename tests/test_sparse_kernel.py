"""cpm_mobile::sparse_expert_ffn: the fused sparse-expert kernel, against the dense BlockFFN.

One small layer with an odd hidden width (the kernel's remainder loops) exported once to a .pte
and run by ExecuTorch (its default threadpool) over token counts that cover the 4-token blocks and
their remainders, routers firing some, none and all experts; then the embedded blockffn-tiny
with every FFN fused, exported once and run by our ExecuTorch session and by TextLLMRunner.
"""
from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from cpm_mobile.exporter.targets.registry import capabilities
from cpm_mobile.exporter.defaults import DEFAULT_SPARSE_MODEL
from cpm_mobile.exporter.kernels import LIBRARY, app_kernels
from cpm_mobile.exporter.kernels.fused_ffn import FusedSparseBlockFFN
from cpm_mobile.runtimes.kernels.loader import load_kernels
from cpm_mobile.exporter.kernels.ops import KERNEL
from cpm_mobile.exporter.models import load_model
from cpm_mobile.exporter.models.ffn import BlockFFN
from cpm_mobile.exporter.models.reference import greedy_generate
from cpm_mobile.exporter.passes import apply_passes
from cpm_mobile.exporter.targets.base import ExportContext
from cpm_mobile.exporter.targets.executorch.target import ExecuTorchTarget, emit, lower, write_program
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.runtimes.base import open_session
from cpm_mobile.runtimes.check import CheckPlan, compare, greedy_runs, teacher_forced_runs
from cpm_mobile.recipes.schema import PassSpec
from cpm_mobile.runtimes.torch_session import TorchSession
from tests.conftest import target_spec

pytestmark = pytest.mark.slow  # whole exports (the fast inner loop, -m "not slow", leaves them out)

HIDDEN, EXPERTS, WIDTH = 37, 8, 16
MAX_ABS = 1e-5
FP32_MAX_ABS_LOGITS = 1e-4
TOKEN_COUNTS = (1, 3, 4, 8, 13)


def _layer(seed: int) -> BlockFFN:
    torch.manual_seed(seed)
    layer = BlockFFN(HIDDEN, EXPERTS, WIDTH, 1e-5).eval()
    with torch.no_grad():
        for linear in (layer.router_proj, layer.up_proj, layer.down_proj):
            linear.weight.normal_(0, 0.3)
    return layer


def _inputs(tokens: int, seed: int) -> torch.Tensor:
    """Random tokens, with every third one zero: a zero token fires no expert (ReLU(0) = 0)."""
    x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))
    x[:, ::3] = 0.0
    return x


def _all_or_none(layer: BlockFFN) -> BlockFFN:
    """Every router row the same: a token fires all experts (x.w > 0) or none."""
    layer = copy.deepcopy(layer)
    with torch.no_grad():
        layer.router_proj.weight.copy_(layer.router_proj.weight[:1].expand_as(layer.router_proj.weight))
    return layer


LAYERS = {"partial": _layer(0), "all_or_none": _all_or_none(_layer(1))}


@pytest.fixture(scope="module")
def layer_methods(tmp_path_factory):
    """Each layer's fused form as a .pte with a dynamic token count, loaded in ExecuTorch."""
    from executorch.runtime import Runtime

    load_kernels()
    folder = tmp_path_factory.mktemp("layer")
    methods, plans = {}, {}
    for name, dense in LAYERS.items():
        seq = torch.export.Dim("T", min=1, max=32)
        with torch.no_grad():
            program = torch.export.export(FusedSparseBlockFFN(dense), (torch.zeros(1, 2, HIDDEN),),
                                          dynamic_shapes=({1: seq},), strict=False)
        executorch_program = emit(lower(program, {}))
        write_program(executorch_program, folder / f"{name}.pte")
        plans[name] = executorch_program.executorch_program.execution_plan[0]
        methods[name] = Runtime.get().load_program(folder / f"{name}.pte").load_method("forward")
    return methods, plans


@pytest.mark.parametrize("name", list(LAYERS))
def test_eager_op_matches_the_dense_layer(name):
    dense = LAYERS[name]
    fused = FusedSparseBlockFFN(dense)
    for tokens in TOKEN_COUNTS:
        x = _inputs(tokens, seed=tokens)
        with torch.no_grad():
            assert float((fused(x) - dense(x)).abs().max()) <= MAX_ABS


def test_patterns_cover_no_some_and_all_experts():
    unions = set()
    for name, dense in LAYERS.items():
        for tokens in TOKEN_COUNTS:
            with torch.no_grad():
                active = dense.router_scores(_inputs(tokens, seed=tokens)[0]) != 0  # [T, E]
            unions.update(int(row.sum()) for row in active)  # per token
            unions.add(int(active.any(0).sum()))  # per call
    assert {0, EXPERTS} <= unions and len(unions - {0, EXPERTS}) >= 3


def test_pte_runs_the_kernel_outside_the_xnnpack_router(layer_methods):
    _, plans = layer_methods
    for plan in plans.values():
        operators = [op.name for op in plan.operators]
        assert "cpm_mobile::sparse_expert_ffn" in operators
        assert not {"aten::index_select", "aten::nonzero", "aten::mm"} & set(operators)
        assert [d.id for d in plan.delegates].count("XnnpackBackend") >= 1


# Not re-run at other thread counts: resetting ExecuTorch's threadpool from Python
# (_unsafe_reset_threadpool) raced with XNNPACK in one loaded run and killed the process (SIGFPE).
@pytest.mark.parametrize("name", list(LAYERS))
def test_pte_matches_the_dense_layer(layer_methods, name):
    methods, _ = layer_methods
    for tokens in TOKEN_COUNTS:
        x = _inputs(tokens, seed=100 + tokens)
        out = methods[name].execute([x])[0]
        with torch.no_grad():
            expected = LAYERS[name](x)
        assert out.shape == expected.shape
        assert float((out - expected).abs().max()) <= MAX_ABS, (name, tokens)


def test_pass_gives_executorch_the_fused_form_sharing_the_dense_weights(tmp_path):
    from bench.synthetic import write_synthetic_checkpoint
    from cpm_mobile.exporter.passes.blockffn_sparse import blockffn_sparse
    from tests.conftest import TINY_BLOCKFFN

    folder = write_synthetic_checkpoint(tmp_path / "m", "blockffn-small", **dict(TINY_BLOCKFFN, vocab_size=300))
    model, _ = load_model(folder, max_seq_len=32, dtype=torch.float32)
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    fused = blockffn_sparse(model, {}, capabilities("executorch"))
    with torch.no_grad():
        tokens = torch.tensor([[5, 9, 17, 3]])
        model.reset_cache()
        assert float((fused(tokens, torch.tensor([0])) - model(tokens, torch.tensor([0]))).abs().max()) <= MAX_ABS
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert all(isinstance(layer.mlp, BlockFFN) for layer in model.layers)
    for source, layer in zip(model.layers, fused.layers):
        assert isinstance(layer.mlp, FusedSparseBlockFFN)
        assert layer.mlp.router_proj is source.mlp.router_proj and layer.mlp.up_weight is source.mlp.up_proj.weight
        assert torch.equal(layer.mlp.down_rows, source.mlp.down_proj.weight.t())


def test_loader_registers_the_library_once():
    from executorch.extension.pybindings import portable_lib

    path = load_kernels()
    assert load_kernels.__wrapped__() == path  # a second load finds the kernel registered and loads nothing
    assert portable_lib._get_operator_names().count(KERNEL) == 1
    assert app_kernels(["aten::mm.out", KERNEL]) == {LIBRARY: [KERNEL]}


# -- the embedded BlockFFN model, every FFN fused -----------------------------------------------

MAX_SEQ_LEN = 128
PROMPTS = ["The interpreter reads", "A list comprehension builds"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_bundle(tmp_path_factory):
    """The blockffn_sparse pass for the executorch target (the fused form), exported by the target."""
    dense, _ = load_model(DEFAULT_SPARSE_MODEL, max_seq_len=MAX_SEQ_LEN, dtype=torch.float32)
    sparse = apply_passes(dense, [PassSpec(name="blockffn_sparse")], "executorch")
    assert all(isinstance(layer.mlp, FusedSparseBlockFFN) for layer in sparse.layers)
    config = dense.config
    folder = tmp_path_factory.mktemp("fused-model")
    context = ExportContext(config.bos_token_id, tuple(config.eos_token_ids))
    info = ExecuTorchTarget().export(sparse, folder, target_spec("executorch"), context).info
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_SPARSE_MODEL / name, folder / name)
    return dense, folder, info


def test_model_pte_names_the_kernel_library_the_app_must_link(model_bundle):
    _, _, info = model_bundle
    assert info.metadata["app_kernels"] == {LIBRARY: [KERNEL]}


def test_model_pte_matches_the_dense_model(model_bundle):
    import dataclasses

    dense, folder, info = model_bundle
    tokenizer = TextTokenizer.from_folder(DEFAULT_SPARSE_MODEL)
    plan = CheckPlan(prompts=[tokenizer.encode(p) for p in PROMPTS], max_new_tokens=NEW_TOKENS)
    reference = greedy_runs(TorchSession(dense), plan)
    session = open_session(folder, dataclasses.asdict(info))
    measured = compare(reference, teacher_forced_runs(session, plan, reference), plan)
    assert measured["max_abs_logits"] <= FP32_MAX_ABS_LOGITS, measured
    assert measured["greedy_tokens"] == [NEW_TOKENS] * len(PROMPTS), measured
    assert measured["greedy"] == 1.0 and measured["greedy_prefix_tokens"] == measured["greedy_tokens"], measured


def test_text_llm_runner_generates_the_dense_models_text(model_bundle):
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from cpm_mobile.runtimes.executorch import load_kernel_libraries

    dense, folder, _ = model_bundle
    assert load_kernel_libraries() is None
    tokenizer = TextTokenizer.from_folder(folder)
    text = PROMPTS[0]
    generated = greedy_generate(dense, tokenizer.encode(text), 32, stop_ids=dense.config.eos_token_ids).generated
    eos = set(dense.config.eos_token_ids)
    expected = tokenizer.tokenizer.decode([t for t in generated if t not in eos], skip_special_tokens=False)
    pieces: list[str] = []
    runner = TextLLMRunner(str(folder / "model.pte"), str(folder))
    runner.generate("<s>" + text, GenerationConfig(echo=False, max_new_tokens=32, temperature=0.0), pieces.append)
    assert "".join(pieces) == expected and len(expected.split()) >= 5
