"""Sparse experts quantised: cpm_mobile::sparse_expert_ffn_int8 / _int4 and GatherBlockQuantized tables.

One small layer (8 experts of 12 units: int4 blocks of 32 along the down projection's 96 units
straddle experts) quantised by the ExecuTorch recipes' own builders, exported to .pte once per
weight format, and run by ExecuTorch against the DENSE BlockFFN holding torchao's dequantised
weights (not the op's own eager code) at T = 1 and T = 8 with routers firing some, none and all
experts; then the embedded blockffn-tiny through `export_bundle` with the int4-sparse recipe (a
shortened check), both targets: both gates pass, the files hold int4 codes, and one flipped code
in the twin fails the faithfulness gate.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from cpm_mobile.exporter.defaults import DEFAULT_SPARSE_MODEL
from cpm_mobile.exporter.kernels import ops
from cpm_mobile.exporter.kernels.fused_ffn import FusedSparseBlockFFN, QuantisedFusedSparseBlockFFN
from cpm_mobile.runtimes.kernels.loader import load_kernels
from cpm_mobile.exporter.models import load_model
from cpm_mobile.exporter.models.ffn import BlockFFN
from cpm_mobile.exporter.models.variant import derive
from cpm_mobile.exporter.pipeline import export_bundle
from cpm_mobile.exporter.targets.executorch.quant import _intx, _linear, _ternary
from cpm_mobile.exporter.targets.executorch.sparse import quantise_fused
from cpm_mobile.exporter.targets.executorch.target import emit, lower, write_program
from cpm_mobile.recipes.schema import load_recipe
from tests.conftest import short_recipe
from cpm_mobile.runtimes.base import open_session
from cpm_mobile.runtimes.check import CheckPlan, compare, greedy_runs, judge, teacher_forced_runs
from cpm_mobile.runtimes.torch_session import TorchSession
from cpm_mobile.exporter.tokenizer import TextTokenizer

HIDDEN, EXPERTS, WIDTH = 96, 8, 12
REL_MAX_ABS = 2e-6  # kernel vs dequantised dense layer, relative to the largest |output| (measured 3-4e-7)
# name -> (bits, the recipe builder for one linear: nn.Linear -> nn.Linear with a torchao weight)
FORMATS = {
    "int8": (8, lambda m: _linear(m, _intx(m.weight, 8, None, "rtn", dynamic_activations=True))),
    "int4": (4, lambda m: _linear(m, _intx(m.weight, 4, 32, "hqq", dynamic_activations=True))),  # bf16 scales
    "ternary": (4, lambda m: _linear(m, _ternary(m.weight, 32))),
}



def _layer(seed: int, all_or_none: bool) -> BlockFFN:
    torch.manual_seed(seed)
    layer = BlockFFN(HIDDEN, EXPERTS, WIDTH, 1e-5).eval()
    with torch.no_grad():
        for linear in (layer.router_proj, layer.up_proj, layer.down_proj):
            linear.weight.normal_(0, 0.3)
        if all_or_none:  # every router row the same: a token fires all experts or none
            layer.router_proj.weight.copy_(layer.router_proj.weight[:1].expand_as(layer.router_proj.weight))
    return layer


LAYERS = {"partial": _layer(0, False), "all_or_none": _layer(1, True)}


def _quantised(dense: BlockFFN, fmt: str) -> QuantisedFusedSparseBlockFFN:
    """The layer's experts quantised as the recipe does; the router kept fp32 so the .pte is all our kernel."""
    bits, build = FORMATS[fmt]
    layer = quantise_fused(FusedSparseBlockFFN(dense), build, "layer")
    layer.router_proj = dense.router_proj
    assert layer.bits == bits
    return layer


def _dequantised_dense(dense: BlockFFN, fmt: str) -> BlockFFN:
    """The dense layer with torchao's own dequantisation of its up and down weights."""
    _, build = FORMATS[fmt]
    reference = copy.deepcopy(dense)
    with torch.no_grad():
        for linear in (reference.up_proj, reference.down_proj):
            linear.weight.copy_(build(linear).weight.dequantize())
    return reference


def _inputs(tokens: int, seed: int) -> torch.Tensor:
    """Random tokens, every third one from the second on zero (a zero token fires no expert)."""
    x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))
    x[:, 1::3] = 0.0
    return x


CASES = [(tokens, 100 * tokens + seed) for tokens in (1, 8) for seed in range(6)]  # (T, seed) of each call


@pytest.fixture(scope="module")
def methods(tmp_path_factory):
    """(format, layer) -> the quantised layer's .pte loaded in ExecuTorch, and its plan's operators."""
    from executorch.runtime import Runtime

    load_kernels()
    folder = tmp_path_factory.mktemp("layers")
    loaded = {}
    for fmt in FORMATS:
        for name, dense in LAYERS.items():
            seq = torch.export.Dim("T", min=1, max=16)
            with torch.no_grad():
                program = torch.export.export(_quantised(dense, fmt), (torch.zeros(1, 2, HIDDEN),),
                                              dynamic_shapes=({1: seq},), strict=False)
            executorch_program = emit(lower(program, {}))
            path = folder / f"{fmt}-{name}.pte"
            write_program(executorch_program, path)
            operators = [op.name for op in executorch_program.executorch_program.execution_plan[0].operators]
            loaded[fmt, name] = (Runtime.get().load_program(path).load_method("forward"), operators, path)
    return loaded


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_codes_are_the_dense_quantisers(fmt):
    dense = LAYERS["partial"]
    layer = _quantised(dense, fmt)
    up, down = layer.dequantised()
    reference = _dequantised_dense(dense, fmt)
    assert torch.equal(up, reference.up_proj.weight) and torch.equal(down, reference.down_proj.weight.t())
    assert not torch.equal(up, dense.up_proj.weight)  # and they are quantised
    codes = {"up": layer.up_codes, "down": layer.down_codes}
    if fmt == "int8":
        assert {t.dtype for t in codes.values()} == {torch.int8}
        assert layer.up_scales.dtype == layer.down_scales.dtype == torch.float32
        assert layer.up_scales.shape == (EXPERTS * WIDTH,) and layer.down_scales.shape == (HIDDEN,)
    else:  # two codes per byte, bf16 block scales (what XNNPACK stores for 4-bit)
        assert all(t.dtype == torch.uint8 and t.shape == (EXPERTS * WIDTH, HIDDEN // 2) for t in codes.values())
        assert layer.up_scales.dtype == layer.down_scales.dtype == torch.bfloat16
        assert layer.up_scales.shape == (EXPERTS * WIDTH, HIDDEN // 32)
        assert layer.down_scales.shape == (EXPERTS * WIDTH // 32, HIDDEN)
        unpacked = ops.unpack_int4(layer.up_codes)
        assert torch.equal(ops.pack_int4(unpacked), layer.up_codes)
        assert int(unpacked.min()) >= -8 and int(unpacked.max()) <= 7


def test_patterns_cover_no_some_and_all_experts():
    """The kernel test's calls: T = 1 calls firing no, some and all experts; T = 8 calls mixing them."""
    per_token, per_call = set(), set()
    for dense in LAYERS.values():
        for tokens, seed in CASES:
            with torch.no_grad():
                active = dense.router_scores(_inputs(tokens, seed)[0]) != 0
            per_token.update(int(row.sum()) for row in active)
            per_call.add((tokens, int(active.any(0).sum())))
    assert {0, EXPERTS} <= per_token and len(per_token - {0, EXPERTS}) >= 2
    assert {(1, 0), (1, EXPERTS), (8, EXPERTS)} <= per_call and any(0 < n < EXPERTS for t, n in per_call if t == 1)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_kernel_matches_the_dequantised_dense_layer(methods, fmt, name):
    method, operators, _ = methods[fmt, name]
    assert f"cpm_mobile::{ops.QUANTISED_OPS[FORMATS[fmt][0]]}" in operators
    assert not {"aten::mm", "aten::index_select", "aten::nonzero"} & set(operators)
    reference = _dequantised_dense(LAYERS[name], fmt)
    for tokens, seed in CASES:
        x = _inputs(tokens, seed)
        out = method.execute([x])[0]
        with torch.no_grad():
            expected = reference(x)
        scale = max(float(expected.abs().max()), 1.0)
        assert out.shape == expected.shape
        assert float((out - expected).abs().max()) <= REL_MAX_ABS * scale, (fmt, name, tokens, seed)


def test_layer_files_hold_the_codes_as_stored(methods):
    """int8 .pte minus int4 .pte = the bytes of their codes and scales (1 byte per int8 weight, half
    a byte per int4 weight, fp32 vs bf16 scales): the files really carry 8 and 4 bits per weight."""
    weights = 2 * EXPERTS * WIDTH * HIDDEN

    def stored(fmt):
        return sum(b.numel() * b.element_size() for b in _quantised(LAYERS["partial"], fmt).buffers())

    assert stored("int8") == weights + 4 * (EXPERTS * WIDTH + HIDDEN)
    assert stored("int4") == weights // 2 + 2 * 2 * EXPERTS * WIDTH * HIDDEN // 32
    sizes = {fmt: methods[fmt, "partial"][2].stat().st_size for fmt in ("int8", "int4")}
    assert abs((sizes["int8"] - sizes["int4"]) - (stored("int8") - stored("int4"))) <= 256  # tensor alignment


# -- the embedded blockffn-tiny through the pipeline, both targets ---------------------------------


@pytest.fixture(scope="module")
def bundle(embedded_bundle):
    # One prompt, 24 new tokens, 2 x 128 held-out tokens (conftest.BUNDLE_PLANS); shared with tests/test_recheck.py.
    return embedded_bundle("blockffn-tiny", "int4-sparse")  # its readers' node ids name no model: grouped here


@pytest.mark.slow  # reads the shared int4-sparse bundle (a whole export)
@pytest.mark.xdist_group("embedded_bundles")  # shares conftest.embedded_bundle (blockffn-tiny's)
@pytest.mark.xdist_group("blockffn_bundles")
def test_embedded_int4_sparse_passes_both_gates(bundle):
    assert bundle.passed, bundle.report
    results = bundle.report["artifacts"]
    assert set(results) == {"executorch", "onnx"}
    for result in results.values():
        assert result["faithfulness"]["passed"] and result["fidelity"]["passed"], result


@pytest.mark.slow  # reads the shared int4-sparse bundle (a whole export)
@pytest.mark.xdist_group("embedded_bundles")  # shares conftest.embedded_bundle (blockffn-tiny's)
@pytest.mark.xdist_group("blockffn_bundles")
def test_embedded_files_store_int4_expert_codes(bundle):
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.scalar_type import ScalarType

    model, _ = load_model(DEFAULT_SPARSE_MODEL, max_seq_len=32)
    config = model.config
    units, hidden, layers = config.num_experts * config.expert_size, config.hidden_size, config.num_layers
    artifacts = {a["target"]: a for a in bundle.manifest["artifacts"]}
    assert artifacts["executorch"]["metadata"]["app_kernels"] == {
        "libcpm_mobile_kernels": ["cpm_mobile::sparse_expert_ffn_int4.out"]}
    program = deserialize_pte_binary((bundle.bundle / "model.pte").read_bytes()).program
    plan = next(p for p in program.execution_plan if p.name == "forward")
    tensors = [value.val for value in plan.values if type(value.val).__name__ == "Tensor"]
    packed = [t for t in tensors if list(t.sizes) == [units, hidden // 2] and ScalarType(t.scalar_type) == ScalarType.BYTE]
    fp32_experts = [t for t in tensors if list(t.sizes) == [units, hidden] and ScalarType(t.scalar_type) == ScalarType.FLOAT]
    assert len(packed) == 2 * layers and not fp32_experts

    graph = onnx.load(bundle.bundle / "model.onnx", load_external_data=False).graph
    tables = {t.name: t for t in graph.initializer if "_experts" in t.name}
    row = config.expert_size * hidden
    codes = [t for name, t in tables.items() if name.endswith("_Q4")]
    assert len(codes) == 2 * layers
    assert all(t.data_type == onnx.TensorProto.UINT8 and list(t.dims) == [config.num_experts, row // 2] for t in codes)
    assert not [name for name, t in tables.items() if t.data_type == onnx.TensorProto.FLOAT and list(t.dims)
                == [config.num_experts, row]]  # no fp32 expert table left
    ops_ = [node.op_type for node in graph.node]
    assert ops_.count("GatherBlockQuantized") == 2 * layers + 1  # the expert tables and the embedding


def _flip_one_code(twin, tokens: list[int]):
    """The twin with one 4-bit code moved by half its range (its sign bit flipped): in the last
    layer, the up code that contributes most to the unit that contributes most on these tokens."""
    mlp = twin.layers[-1].mlp
    captured = []
    hook = mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, mlp.hidden_size)))
    try:
        TorchSession(twin).forward(np.asarray(tokens), 0)
    finally:
        hook.remove()
    x = captured[0]
    with torch.no_grad():
        up, down = mlp.dequantised()
        scores = mlp.router_scores(x).repeat_interleave(mlp.expert_size, dim=1)
        inner = torch.nn.functional.silu(x @ up.t()) * scores  # [T, units]
        unit = int((inner.abs().mean(0) * down.norm(dim=1)).argmax())
        k = int((x * up[unit]).abs().mean(0).argmax())
    assert float(inner[:, unit].abs().max()) > 0  # the unit is active on these tokens
    codes = mlp.up_codes.clone()
    chunk, offset = divmod(k, ops.INT4_CHUNK)
    byte = chunk * ops.INT4_CHUNK // 2 + offset % (ops.INT4_CHUNK // 2)
    codes[unit, byte] ^= 0x08 if offset < ops.INT4_CHUNK // 2 else 0x80
    flipped = copy.copy(mlp)
    flipped._buffers = dict(mlp._buffers, up_codes=codes)
    assert int((ops.unpack_int4(codes) != ops.unpack_int4(mlp.up_codes)).sum()) == 1
    return derive(twin, {f"layers.{len(twin.layers) - 1}.mlp": flipped})


@pytest.mark.slow  # reads the shared int4-sparse bundle (a whole export)
@pytest.mark.xdist_group("embedded_bundles")  # shares conftest.embedded_bundle (blockffn-tiny's)
@pytest.mark.xdist_group("blockffn_bundles")
def test_one_flipped_code_fails_the_twin_gate(bundle):
    from cpm_mobile.exporter.targets.registry import get_target

    recipe = load_recipe("int4-sparse")
    spec = recipe.targets["executorch"]
    reference, _ = load_model(DEFAULT_SPARSE_MODEL, max_seq_len=recipe.max_seq_len)
    from cpm_mobile.exporter.passes import apply_passes

    artifact = next(a for a in bundle.manifest["artifacts"] if a["target"] == "executorch")
    twin, _ = get_target("executorch").twin(apply_passes(reference, spec.passes, "executorch"), spec, bundle.bundle,
                                            artifact)
    prompt = TextTokenizer.from_folder(DEFAULT_SPARSE_MODEL).encode(recipe.check.prompts[0])
    plan = CheckPlan(prompts=[prompt], max_new_tokens=16)
    session = open_session(bundle.bundle, artifact)
    tolerances = spec.faithfulness.model_dump()
    for candidate, should_pass in ((twin, True), (_flip_one_code(twin, prompt), False)):
        expected = greedy_runs(TorchSession(candidate), plan)
        measured = compare(expected, teacher_forced_runs(session, plan, expected), plan, spec.faithfulness.tie_margin_rel)
        assert (not judge(measured, tolerances)) == should_pass, measured


@pytest.mark.slow  # reads the shared int4-sparse bundle (a whole export)
@pytest.mark.xdist_group("embedded_bundles")  # shares conftest.embedded_bundle (blockffn-tiny's)
@pytest.mark.xdist_group("blockffn_bundles")
def test_embedded_sizes_are_the_predicted_ones(bundle):
    """The shapes-only prediction `cpm-mobile inspect` prints holds for the quantised sparse forms too."""
    from cpm_mobile.exporter.sizes import recipe_sizes
    from cpm_mobile.exporter.models.loader import load_checkpoint

    checkpoint = load_checkpoint(DEFAULT_SPARSE_MODEL)
    predicted = {row.target: row.bytes for row in recipe_sizes(checkpoint.config, checkpoint.tied, ["int4-sparse"])}
    files = {a["target"]: a["files"] for a in bundle.manifest["artifacts"]}
    for target in ("executorch", "onnx"):
        written = sum((bundle.bundle / name).stat().st_size for name in files[target] if name != "genai_config.json")
        assert abs(written / predicted[target] - 1) <= 0.10, (target, written, predicted[target])
