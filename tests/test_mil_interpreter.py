"""The numpy MIL interpreter against torch (converted models) and coremltools (single ops).

fp32 programs must match torch to 1e-4 max abs. fp16 programs round every op output to fp16,
each rounding adding at most 2**-11 (~4.9e-4) of the magnitude it rounds; these toy models chain
about ten ops with O(1) gain, so the error is bounded by ~10 roundoffs of the output's scale:
max|got - ref| <= FP16_TOL * max|ref| with FP16_TOL = 5e-3 (measured: 4e-4..7e-4 of max|ref|).
That is ~10x above the rounding noise and far below the error of a wrong op, index or layout.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

import torch  # noqa: E402
import coremltools as ct  # noqa: E402

from cpm_mobile.runtimes.coreml import (  # noqa: E402
    SUPPORTED_OPS,
    MILInterpreter,
    UnsupportedOpError,
    load_mil_program,
)
from cpm_mobile.runtimes.coreml import mil_ops  # noqa: E402

F = torch.nn.functional
FP32_ATOL = 1e-4
FP16_TOL = 5e-3  # relative to the reference's largest magnitude, see module docstring
PRECISIONS = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}


def _export(module: torch.nn.Module, *args: torch.Tensor):
    return torch.export.export(module.eval(), args).run_decompositions({})


def _save(source, tmp_path: Path, name: str, precision: str = "fp32", **kwargs) -> Path:
    mlmodel = ct.convert(source, convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS18,
                         compute_precision=PRECISIONS[precision], **kwargs)
    path = tmp_path / f"{name}.mlpackage"
    mlmodel.save(str(path))
    return path


def _assert_close(got: np.ndarray, ref: np.ndarray, precision: str) -> None:
    assert got.shape == ref.shape
    got = got.astype(np.float32)
    error = np.abs(got - ref).max()
    if precision == "fp32":
        assert error <= FP32_ATOL
    else:
        assert error <= FP16_TOL * np.abs(ref).max()


def _only(outputs: dict[str, np.ndarray]) -> np.ndarray:
    assert len(outputs) == 1
    return next(iter(outputs.values()))


# --------------------------------------------------------------------------------------------
# (a) MLP with RMSNorm, SiLU and softmax


class RMSNormMLP(torch.nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 32, out: int = 12):
        super().__init__()
        self.norm_weight = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
        return torch.softmax(self.down(F.silu(self.up(x))) * 2.0, dim=-1)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_mlp_rmsnorm_silu_softmax(tmp_path: Path, precision: str) -> None:
    torch.manual_seed(0)
    model = RMSNormMLP().eval()
    x = torch.randn(1, 5, 16)
    interp = MILInterpreter(_save(_export(model, x), tmp_path, "mlp", precision))
    assert {"linear", "silu", "softmax", "rsqrt", "reduce_mean"} <= interp.op_types()

    got = _only(interp.predict({interp.input_names[0]: x.numpy()}))
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.dtype == (np.float16 if precision == "fp16" else np.float32)
    _assert_close(got, ref, precision)


# --------------------------------------------------------------------------------------------
# (b) embedding lookup with a vocabulary above the uint16 range

VOCAB = 73448
TOKEN_IDS = np.array([[0, 1, 4464, 65535, 65536, 70000, VOCAB - 1]], dtype=np.int32)


class Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(VOCAB, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_embedding_vocab_above_uint16(tmp_path: Path, precision: str) -> None:
    torch.manual_seed(0)
    model = Embed().eval()
    path = _save(_export(model, torch.from_numpy(TOKEN_IDS)), tmp_path, "embed", precision)
    interp = MILInterpreter(path)
    got = _only(interp.predict({interp.input_names[0]: TOKEN_IDS}))

    table = model.table.weight.detach().numpy()
    if precision == "fp16":
        table = table.astype(np.float16)
    # a gather is exact: any index truncation (e.g. to uint16) shows up as a wrong row
    np.testing.assert_array_equal(got, table[TOKEN_IDS])


def test_uint16_index_cast_wraps_like_core_ml(tmp_path: Path) -> None:
    """Negative control for (b): a program that casts ids to uint16 must come out wrong."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    table = np.random.default_rng(0).standard_normal((VOCAB, 4)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=TOKEN_IDS.shape, dtype=types.int32)],
                opset_version=ct.target.iOS18)
    def prog(ids):
        return mb.gather(x=table, indices=mb.cast(x=ids, dtype="uint16"), axis=0)

    interp = MILInterpreter(_save(prog, tmp_path, "uint16_gather"))
    got = _only(interp.predict({interp.input_names[0]: TOKEN_IDS}))
    np.testing.assert_array_equal(got, table[TOKEN_IDS % 65536])
    assert not np.array_equal(got, table[TOKEN_IDS])


def test_fp16_program_rounds_every_op_output(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(3,), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x):
        return mb.sub(x=mb.add(x=x, y=np.float16(0.25)), y=x)

    interp = MILInterpreter(_save(prog, tmp_path, "fp16_rounding"))
    got = _only(interp.predict({interp.input_names[0]: np.array([1000, 2048, 1], np.float16)}))
    # fp16 spacing is 0.5 at 1000 and 2 at 2048: x + 0.25 rounds back to x there
    np.testing.assert_array_equal(got, np.array([0, 0, 0.25], np.float16))


# --------------------------------------------------------------------------------------------
# (c) stateful KV-cache attention (fp16 states), prefill then decode

HEADS, SEQ, HEAD_DIM, EMBED = 2, 16, 8, 16


class CachedAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(EMBED, 3 * HEADS * HEAD_DIM, bias=False)
        self.out = torch.nn.Linear(HEADS * HEAD_DIM, EMBED, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, HEADS, SEQ, HEAD_DIM, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(1, HEADS, SEQ, HEAD_DIM, dtype=torch.float16))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        steps = x.shape[1]
        q, k, v = self.qkv(x).view(1, steps, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        start = pos[0]
        self.k_cache[:, :, start:start + steps] = k.half()
        self.v_cache[:, :, start:start + steps] = v.half()
        attn = F.scaled_dot_product_attention(q, self.k_cache.float(), self.v_cache.float(),
                                              attn_mask=mask)
        return self.out(attn.transpose(1, 2).reshape(1, steps, HEADS * HEAD_DIM))


def _causal_mask(start: int, steps: int) -> np.ndarray:
    rows = start + np.arange(steps)[:, None]
    allowed = np.arange(SEQ)[None, :] <= rows
    return np.where(allowed, 0.0, -np.inf).astype(np.float32)[None, None]


def _convert_cached_attention(model: CachedAttention, tmp_path: Path) -> Path:
    example = (torch.randn(1, 2, EMBED), torch.tensor([0], dtype=torch.int32),
               torch.from_numpy(_causal_mask(0, 2)))
    traced = torch.jit.trace(model, example)
    steps = ct.RangeDim(1, SEQ)
    cache = ct.TensorType(shape=(1, HEADS, SEQ, HEAD_DIM), dtype=np.float16)
    return _save(
        traced, tmp_path, "kv_attention", "fp16",
        inputs=[ct.TensorType("x", shape=(1, steps, EMBED)),
                ct.TensorType("pos", shape=(1,), dtype=np.int32),
                ct.TensorType("mask", shape=(1, 1, steps, SEQ))],
        outputs=[ct.TensorType("y")],
        states=[ct.StateType(wrapped_type=cache, name="k_cache"),
                ct.StateType(wrapped_type=cache, name="v_cache")])


def test_stateful_kv_cache_prefill_and_decode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CachedAttention().eval()
    interp = MILInterpreter(_convert_cached_attention(model, tmp_path))
    assert interp.state_names == ["k_cache", "v_cache"]
    assert {"read_state", "coreml_update_state", "slice_update"} <= interp.op_types()
    model.k_cache.zero_()
    model.v_cache.zero_()

    state = interp.make_state()
    assert all(s.dtype == np.float16 and s.shape == (1, HEADS, SEQ, HEAD_DIM)
               for s in state.values())
    k_cache_array = state["k_cache"]
    schedule = [(0, 4), (4, 1), (5, 1), (6, 1)]  # prefill 4 tokens, then 3 decode steps
    for start, steps in schedule:
        x = torch.randn(1, steps, EMBED)
        pos = np.array([start], dtype=np.int32)
        mask = _causal_mask(start, steps)
        got = interp.predict({"x": x.numpy(), "pos": pos, "mask": mask}, state)["y"]
        with torch.no_grad():
            ref = model(x, torch.from_numpy(pos), torch.from_numpy(mask)).numpy()
        _assert_close(got, ref, "fp16")

    assert state["k_cache"] is k_cache_array  # updated in place, like MLState
    end = sum(schedule[-1])
    for name in ("k_cache", "v_cache"):
        ref_cache = getattr(model, name).detach().numpy()
        _assert_close(state[name], ref_cache.astype(np.float32), "fp16")
        assert not state[name][:, :, end:].any() and state[name][:, :, :end].any()


# --------------------------------------------------------------------------------------------
# (d) variable-length input


class PositionalSelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.positions = torch.nn.Parameter(torch.randn(16, 8))
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.shape[1]
        h = self.proj(x + self.positions[:steps])
        scores = h @ h.transpose(1, 2) / math.sqrt(8)
        return torch.softmax(scores, dim=-1) @ x


@pytest.mark.parametrize("flexibility", ["range", "enumerated"])
def test_variable_length_input(tmp_path: Path, flexibility: str) -> None:
    torch.manual_seed(0)
    model = PositionalSelfAttention().eval()
    shape = (ct.Shape((1, ct.RangeDim(1, 16), 8)) if flexibility == "range"
             else ct.EnumeratedShapes(shapes=[(1, 3, 8), (1, 7, 8)], default=(1, 3, 8)))
    traced = torch.jit.trace(model, torch.randn(1, 3, 8))
    interp = MILInterpreter(_save(traced, tmp_path, f"varlen_{flexibility}",
                                  inputs=[ct.TensorType("x", shape=shape)]))
    assert "shape" in interp.op_types()  # the length is read at run time, not baked in

    for steps in (3, 7):
        x = torch.randn(1, steps, 8)
        got = _only(interp.predict({"x": x.numpy()}))
        with torch.no_grad():
            _assert_close(got, model(x).numpy(), "fp32")
    with pytest.raises(ValueError, match="shape"):
        interp.predict({"x": np.zeros((1, 5 if flexibility == "enumerated" else 17, 8))})


def test_multifunction_package(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, steps in (("short", 2), ("long", 5)):
        path = _save(_export(model, torch.randn(1, steps, 8)), tmp_path, name)
        descriptor.add_function(str(path), src_function_name="main", target_function_name=name)
    descriptor.default_function_name = "short"
    package = tmp_path / "multi.mlpackage"
    ct.utils.save_multifunction(descriptor, str(package))

    assert set(load_mil_program(package).functions) == {"short", "long"}
    for name, steps in (("short", 2), ("long", 5)):
        interp = MILInterpreter(package, function_name=name)
        x = torch.randn(1, steps, 8)
        with torch.no_grad():
            got = _only(interp.predict({interp.input_names[0]: x.numpy()}))
            _assert_close(got, model(x).numpy(), "fp32")
    short = MILInterpreter(package, function_name="short")
    with pytest.raises(ValueError, match="shape"):
        short.predict({short.input_names[0]: np.zeros((1, 5, 8))})
    with pytest.raises(ValueError, match="no function"):
        MILInterpreter(package, function_name="main")


# --------------------------------------------------------------------------------------------
# (e) compressed weights (constexpr ops)


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(32, 64)
        self.l2 = torch.nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(F.silu(self.l1(x)))


def _compress(kind: str, mlmodel):
    import coremltools.optimize.coreml as cto

    configs = {
        "int8_per_channel": (cto.linear_quantize_weights, cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel")),
        "int4_per_block": (cto.linear_quantize_weights, cto.OpLinearQuantizerConfig(
            mode="linear", dtype="int4", granularity="per_block", block_size=8)),
        "palettize_4bit": (cto.palettize_weights, cto.OpPalettizerConfig(
            nbits=4, mode="kmeans", granularity="per_tensor")),
        "palettize_2bit_grouped": (cto.palettize_weights, cto.OpPalettizerConfig(
            nbits=2, mode="uniform", granularity="per_grouped_channel", group_size=16)),
        "prune_50": (cto.prune_weights, cto.OpMagnitudePrunerConfig(target_sparsity=0.5)),
    }
    compress, op_config = configs[kind]
    op_config.weight_threshold = 0  # the toy weights are below the default size threshold
    return compress(mlmodel, cto.OptimizationConfig(global_config=op_config))


def _reference_weight(op, original: np.ndarray) -> np.ndarray:
    """Decode one constexpr weight independently of the interpreter and sanity-check it."""
    vals = {name: np.asarray(var.val) for name, var in op.inputs.items()}
    if op.op_type == "constexpr_blockwise_shift_scale":
        data, scale = vals["data"].astype(np.float32), vals["scale"]
        block = [d // s for d, s in zip(data.shape, scale.shape)]
        scale_full = np.kron(scale, np.ones(block, dtype=np.float32))
        offset = vals.get("offset")
        offset_full = 0.0 if offset is None else np.kron(offset.astype(np.float32),
                                                         np.ones(block, dtype=np.float32))
        weight = (data - offset_full) * scale_full
        assert np.all(np.abs(weight - original) <= 0.5 * scale_full + 1e-6)  # rounding bound
        return weight
    if op.op_type == "constexpr_lut_to_dense":
        indices, lut = vals["indices"].astype(np.int64), vals["lut"]
        rows_per_group = indices.shape[0] // lut.shape[0]
        group = np.arange(indices.shape[0])[:, None] // rows_per_group
        weight = lut[group, 0, indices, 0]
        assert np.abs(weight - original).max() < 0.5 * np.ptp(original)
        return weight
    if op.op_type == "constexpr_sparse_to_dense":  # the kept weights are the original ones
        kept = vals["mask"].astype(bool)
        assert kept.mean() == 0.5 and np.abs(original[kept]).min() >= np.abs(original[~kept]).max()
        return np.where(kept, original, 0.0).astype(np.float32)
    raise AssertionError(f"unexpected constexpr op {op.op_type}")


@pytest.mark.parametrize("kind", ["int8_per_channel", "int4_per_block", "palettize_4bit",
                                  "palettize_2bit_grouped", "prune_50"])
def test_compressed_weights(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    model = TwoLayer().eval()
    x = torch.randn(3, 32)
    mlmodel = ct.convert(_export(model, x), convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS18,
                         compute_precision=ct.precision.FLOAT32)
    path = tmp_path / f"{kind}.mlpackage"
    _compress(kind, mlmodel).save(str(path))
    interp = MILInterpreter(path)

    constexprs = [op for op in load_mil_program(path).functions["main"].operations
                  if op.op_type.startswith("constexpr_")]
    assert len(constexprs) == 2  # both weights compressed, nothing folded away
    reference = TwoLayer().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer, op in zip((reference.l1, reference.l2), constexprs):
            weight = _reference_weight(op, layer.weight.numpy())
            layer.weight.copy_(torch.from_numpy(weight))
        ref = reference(x).numpy()
    got = _only(interp.predict({interp.input_names[0]: x.numpy()}))
    _assert_close(got, ref, "fp32")


class EmbedProject(torch.nn.Module):
    """A token table read by a gather and by the output projection (tied), plus one linear."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(64, 32))
        self.mix = torch.nn.Linear(32, 32, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(self.mix(F.embedding(tokens, self.table)), self.table)


def _ternary(weight: np.ndarray):
    scale = float(np.abs(weight).mean())
    codes = np.clip(np.round(weight / scale), -1, 1)
    return np.array([-scale, 0.0, scale, 0.0], dtype=weight.dtype), (codes + 1).astype(np.uint8).reshape(-1)


# What coremltools.optimize.coreml emits for the Core ML quantisation schemes (exporter/targets/coreml/quant.py).
EMITTED = {
    "int8_block32_symmetric": lambda cto: cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_block", block_size=[1, 16]),
    "int4_block16_offset": lambda cto: cto.OpLinearQuantizerConfig(
        mode="linear", dtype="int4", granularity="per_block", block_size=[1, 16]),
    "palette4_grouped_kmeans": lambda cto: cto.OpPalettizerConfig(
        nbits=4, mode="kmeans", granularity="per_grouped_channel", group_size=8, channel_axis=0),
    "palette2_grouped_uniform": lambda cto: cto.OpPalettizerConfig(
        nbits=2, mode="uniform", granularity="per_grouped_channel", group_size=4, channel_axis=0),
    "palette4_per_channel_scale": lambda cto: cto.OpPalettizerConfig(
        nbits=4, mode="uniform", granularity="per_grouped_channel", group_size=8, channel_axis=0,
        enable_per_channel_scale=True),
    "ternary_custom_palette": lambda cto: cto.OpPalettizerConfig(
        mode="custom", lut_function=_ternary, granularity="per_grouped_channel", group_size=1, channel_axis=0),
}


def _coremltools_value(op) -> np.ndarray:
    """coremltools' own value of a constexpr op (its static decompress where a palette is itself
    a constexpr output, which materialized_val_inference does not follow in coremltools 9.0)."""
    if op.op_type == "constexpr_lut_to_dense" and op.lut.val is None:
        axis = None if op.vector_axis is None else op.vector_axis.val
        return type(op).decompress(op.indices.val, _coremltools_value(op.lut.op), axis)
    return op.materialized_val_inference()


@pytest.mark.parametrize("kind,precision", [(kind, "fp32") for kind in EMITTED]
                         + [("int4_block16_offset", "fp16"), ("palette4_per_channel_scale", "fp16")])
def test_constexpr_values_equal_coremltools(tmp_path: Path, kind: str, precision: str) -> None:
    """Each decompression op of a saved compressed program evaluates to exactly coremltools' value."""
    import coremltools.optimize.coreml as cto

    torch.manual_seed(0)
    model = EmbedProject().eval()
    tokens = torch.tensor([[3, 17, 60]])
    mlmodel = ct.convert(_export(model, tokens), convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                         compute_precision=PRECISIONS[precision],
                         inputs=[ct.TensorType(name="tokens", shape=(1, 3), dtype=np.int32)])
    config = EMITTED[kind](cto)
    config.weight_threshold = 0
    compress = cto.linear_quantize_weights if kind.startswith("int") else cto.palettize_weights
    path = tmp_path / f"{kind}.mlpackage"
    compress(mlmodel, cto.OptimizationConfig(global_config=config)).save(str(path))

    interp = MILInterpreter(path)
    operations = load_mil_program(path).functions["main"].operations
    finals = [op for op in operations if op.op_type.startswith("constexpr_")
              and not any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops)]
    assert len(finals) == 2  # the tied table (gather + linear) and the mix weight
    assert {c.op_type for op in finals for c in op.outputs[0].child_ops} >= {"gather", "linear"}
    for op in finals:
        expected = _coremltools_value(op).astype(np.float32)
        np.testing.assert_array_equal(interp.constant(op.outputs[0].name), expected)
    got = _only(interp.predict({"tokens": tokens.numpy().astype(np.int32)}))
    reference = EmbedProject().eval()
    with torch.no_grad():
        by_child = {c.op_type: op for op in finals for c in op.outputs[0].child_ops}
        reference.table.copy_(torch.from_numpy(_coremltools_value(by_child["gather"]).astype(np.float32)))
        mix = next(op for op in finals if op is not by_child["gather"])
        reference.mix.weight.copy_(torch.from_numpy(_coremltools_value(mix).astype(np.float32)))
        ref = reference(tokens).numpy()
    _assert_close(got, ref, precision)


# --------------------------------------------------------------------------------------------
# (f) unsupported ops fail loudly


def test_missing_op_implementation_raises(tmp_path: Path, monkeypatch) -> None:
    model = RMSNormMLP().eval()
    path = _save(_export(model, torch.randn(1, 2, 16)), tmp_path, "mlp")
    monkeypatch.delitem(mil_ops.OPS, "silu")
    with pytest.raises(UnsupportedOpError, match=r"'silu' \(op '.+'\)") as info:
        MILInterpreter(path)
    assert info.value.op_type == "silu"


def test_unimplemented_op_in_program_raises(tmp_path: Path) -> None:
    model = torch.nn.MaxPool2d(2).eval()
    path = _save(_export(model, torch.randn(1, 4, 8, 8)), tmp_path, "pool")
    assert "max_pool" not in SUPPORTED_OPS
    with pytest.raises(UnsupportedOpError, match="'max_pool'"):
        MILInterpreter(path)


def test_conv2d_matches_torch(tmp_path: Path) -> None:
    """The vision tower's patch embedding (stride = kernel, valid padding) and a padded, strided 3x3 conv."""
    for conv, shape in [(torch.nn.Conv2d(3, 8, kernel_size=14, stride=14), (1, 3, 28, 42)),
                        (torch.nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1), (2, 4, 9, 7))]:
        x = torch.randn(*shape)
        path = _save(_export(conv.eval(), x), tmp_path, f"conv{shape[1]}")
        got = MILInterpreter(path).predict({"input": x.numpy()})
        out = np.asarray(next(iter(got.values())))
        assert np.abs(out - conv(x).detach().numpy()).max() < 1e-5


# --------------------------------------------------------------------------------------------
# single ops: numpy implementations vs coremltools' value inference or a hand-written reference

_RNG = np.random.default_rng(0)
_X = _RNG.standard_normal((2, 3, 4)).astype(np.float32)
_M = _RNG.standard_normal((2, 4, 5)).astype(np.float32)
_I32 = np.array([[3, -7], [5, 0]], dtype=np.int32)
_POS = np.abs(_X) + 0.1
_UPD = np.arange(1, 17, dtype=np.float32)


def _i(values) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def _b(values) -> np.ndarray:
    return np.array(values, dtype=bool)


def _updated(x: np.ndarray, edit) -> np.ndarray:
    out = x.copy()
    edit(out)
    return out


def _reference_cases() -> list[tuple[str, dict, np.ndarray]]:
    """Ops where coremltools has no value inference, or one that ignores a parameter
    (scatter_along_axis ignores mode, concat ignores interleave, cumsum exclusive crashes)."""
    upd = _UPD[:16].reshape(2, 2, 4)

    def scatter_add(o):
        o[:, 2, :] += upd[:, 0, :]
        o[:, 0, :] += upd[:, 1, :]

    def scatter_update(o):
        o[:, :, 3] = _UPD[:6].reshape(2, 3)
        o[:, :, 1] = _UPD[6:12].reshape(2, 3)

    def scatter_nd_add(o):
        o[1, 2] += _UPD[:4]
        o[0, 1] += _UPD[4:8]

    exclusive_reverse_cumsum = np.stack(
        [_X[..., j + 1:].sum(axis=-1) for j in range(4)], axis=-1)
    interleaved = np.empty((2, 6, 4), np.float32)
    interleaved[:, 0::2], interleaved[:, 1::2] = _X, 2 * _X
    channel = lambda v: v.reshape(1, 3, 1)  # noqa: E731
    return [
        ("gather_nd", dict(x=_X, indices=_i([[1, 2], [0, 0]])), np.stack([_X[1, 2], _X[0, 0]])),
        ("scatter", dict(data=_X, indices=_i([2, 0]), updates=upd.transpose(0, 1, 2), axis=1,
                         mode="add"), _updated(_X, scatter_add)),
        ("scatter", dict(data=_X, indices=_i([3, 1]),
                         updates=np.stack([_UPD[:6].reshape(2, 3), _UPD[6:12].reshape(2, 3)], -1),
                         axis=2, mode="update"), _updated(_X, scatter_update)),
        ("scatter_along_axis", dict(data=_X, indices=_i(np.zeros((2, 1, 4), int)),
                                    updates=np.full((2, 1, 4), 2.0, np.float32), axis=1,
                                    mode="mul"),
         _updated(_X, lambda o: o[:, 0, :].__imul__(2.0))),
        ("scatter_nd", dict(data=_X, indices=_i([[1, 2], [0, 1]]),
                            updates=_UPD[:8].reshape(2, 4), mode="add"),
         _updated(_X, scatter_nd_add)),
        ("one_hot", dict(indices=_i([1, 3, 0]), one_hot_vector_size=np.int32(4), axis=0),
         np.eye(4, dtype=np.int32)[:, [1, 3, 0]]),
        ("batch_norm", dict(x=_X, mean=_X[0, :, 0], variance=_POS[0, :, 0], gamma=_X[1, :, 1],
                            beta=_X[1, :, 2]),
         (_X - channel(_X[0, :, 0])) / np.sqrt(channel(_POS[0, :, 0]) + 1e-5)
         * channel(_X[1, :, 1]) + channel(_X[1, :, 2])),
        ("concat", dict(values=[_X, _X * 2], axis=1, interleave=True), interleaved),
        ("cumsum", dict(x=_X, axis=np.int32(2), exclusive=True, reverse=True),
         exclusive_reverse_cumsum),
    ]


def _value_inference_cases() -> list[tuple[str, dict, None]]:
    cases = [
        ("gather", dict(x=_X, indices=_i([[2, 0], [1, 1]]), axis=1)),
        ("gather", dict(x=_X, indices=_i([[0, 2], [1, 0]]), axis=2, batch_dims=1)),
        ("gather_along_axis", dict(x=_X, indices=_i(np.zeros((2, 2, 4), int) + [0, 2, 1, 0]),
                                   axis=1)),
        ("slice_by_index", dict(x=_X, begin=_i([1, 0, -1]), end=_i([2, 3, 0]),
                                stride=_i([1, 2, -1]), begin_mask=_b([False, True, False]),
                                end_mask=_b([False, False, True]),
                                squeeze_mask=_b([True, False, False]))),
        ("slice_by_size", dict(x=_X, begin=_i([0, 1, 1]), size=_i([2, -1, 2]))),
        ("slice_update", dict(x=_X, update=np.ones((2, 1, 2), np.float32), begin=_i([0, 1, 1]),
                              end=_i([2, 2, 3]))),
        ("reshape", dict(x=_X, shape=_i([0, -1, 2]))),
        ("expand_dims", dict(x=_X, axes=_i([0, -1]))),
        ("squeeze", dict(x=_X[:, :1], axes=_i([1]))),
        ("transpose", dict(x=_X, perm=_i([2, 0, 1]))),
        ("concat", dict(values=[_X, _X * 2], axis=-2)),
        ("concat", dict(values=[np.int32(3), np.int32(5)], axis=0)),
        ("split", dict(x=_X, split_sizes=_i([1, 3]), axis=-1)),
        ("stack", dict(values=[_X, _X], axis=-1)),
        ("tile", dict(x=_X, reps=_i([1, 2, 1]))),
        ("pad", dict(x=_X, pad=_i([1, 2]), mode="constant", constant_val=np.float32(3.0))),
        ("pad", dict(x=_X, pad=_i([1, 1, 2, 0]), mode="reflect")),
        ("pad", dict(x=_X, pad=_i([0, 2]), mode="replicate")),
        ("band_part", dict(x=_X, lower=np.int32(1), upper=np.int32(0))),
        ("cumsum", dict(x=_X, axis=np.int32(1))),
        ("range_1d", dict(start=np.int32(2), end=np.int32(11), step=np.int32(3))),
        ("fill", dict(shape=_i([2, 3]), value=np.float32(1.5))),
        ("topk", dict(x=_X, k=np.int32(2), axis=1)),
        ("argsort", dict(x=_X, axis=-1, ascending=True)),
        ("reduce_argmax", dict(x=_X, axis=np.int32(1), keep_dims=True)),
        ("reduce_log_sum_exp", dict(x=_X, axes=_i([0, 2]))),
        ("reduce_l2_norm", dict(x=_X, axes=_i([-1]), keep_dims=True)),
        ("reduce_prod", dict(x=_X)),
        ("layer_norm", dict(x=_X, axes=_i([1]), gamma=_X[0, :, 0], beta=_X[1, :, 0],
                            epsilon=np.float32(1e-3))),
        ("matmul", dict(x=_M, y=_X, transpose_x=True, transpose_y=True)),
        ("linear", dict(x=_X, weight=_M[0].T, bias=_M[1, 0])),
        ("gelu", dict(x=_X, mode="TANH_APPROXIMATION")),
        ("gelu", dict(x=_X, mode="EXACT")),
        ("softmax", dict(x=_X, axis=np.int32(0))),
        ("softplus", dict(x=_X * 30)),
        ("sigmoid_hard", dict(x=_X, alpha=np.float32(0.3), beta=np.float32(0.4))),
        ("clamped_relu", dict(x=_X, alpha=np.float32(0.1), beta=np.float32(0.5))),
        ("elu", dict(x=_X, alpha=np.float32(0.7))),
        ("erf", dict(x=_X)),
        ("log", dict(x=_POS, epsilon=np.float32(1e-3))),
        ("inverse", dict(x=_POS)),
        ("round", dict(x=np.array([0.5, 1.5, -0.5, 2.4], np.float32))),
        ("clip", dict(x=_X, alpha=np.float32(-0.2), beta=np.float32(0.3))),
        ("floor_div", dict(x=_I32, y=np.int32(2))),
        ("mod", dict(x=_I32, y=np.int32(3))),
        ("real_div", dict(x=_X, y=_POS)),
        ("cast", dict(x=_X * 10, dtype="int32")),
        ("cast", dict(x=_I32 * 20000, dtype="int16")),
        ("select", dict(cond=_X > 0, a=_X, b=np.float32(-1.0))),
        ("reverse", dict(x=_X, axes=_i([0, 2]))),
        ("flatten2d", dict(x=_X, axis=np.int32(2))),
        ("fill_like", dict(ref_tensor=_X, value=np.float32(2.0))),
        ("einsum", dict(values=(_X[None], _M[:1, :, None].repeat(3, axis=2)),
                        equation="nchw,nwhu->nchu")),
        ("reduce_min", dict(x=_X, axes=_i([1]))),
        ("reduce_argmin", dict(x=_X, axis=np.int32(-1))),
        ("reduce_sum_square", dict(x=_X, axes=_i([0]))),
        ("reduce_l1_norm", dict(x=_X, axes=_i([2]))),
        ("reduce_log_sum", dict(x=_POS, axes=_i([1]))),
        ("leaky_relu", dict(x=_X, alpha=np.float32(0.2))),
        ("thresholded_relu", dict(x=_X, alpha=np.float32(0.3))),
        ("scaled_tanh", dict(x=_X, alpha=np.float32(1.5), beta=np.float32(0.5))),
        ("linear_activation", dict(x=_X, alpha=np.float32(1.5), beta=np.float32(0.5))),
        ("relu6", dict(x=_X * 5)),
        ("softsign", dict(x=_X)),
        ("threshold", dict(x=_X, alpha=np.float32(0.1))),
        ("scaled_dot_product_attention", dict(query=_X, key=_X[:, :2], value=_X[:, :2],
                                              attn_mask=_b([[True, False], [True, True],
                                                            [False, True]]))),
    ]
    return [(op_type, kwargs, None) for op_type, kwargs in cases]


_OP_CASES = _value_inference_cases() + _reference_cases()


@pytest.mark.parametrize("op_type,kwargs,reference", _OP_CASES,
                         ids=[case[0] for case in _OP_CASES])
def test_single_op(op_type: str, kwargs: dict, reference: np.ndarray | None) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.types import numpy_type_to_builtin_type

    kwargs = copy.deepcopy(kwargs)  # some coremltools value inferences write into their inputs
    # with a reference, the first operand is a program input so coremltools does not try (and
    # possibly crash) to fold the op; otherwise all operands are consts and it folds them
    first_name, first_value = next(iter(kwargs.items()))
    as_input = reference is not None and isinstance(first_value, np.ndarray)
    spec = (mb.TensorSpec(shape=first_value.shape,
                          dtype=numpy_type_to_builtin_type(first_value.dtype))
            if as_input else mb.TensorSpec(shape=(1,)))
    built = []

    @mb.program(input_specs=[spec], opset_version=ct.target.iOS18)
    def prog(operand):
        built.append(getattr(mb, op_type)(**{**kwargs, **({first_name: operand} if as_input
                                                          else {})}))
        return operand

    outputs = list(built[0]) if isinstance(built[0], (list, tuple)) else [built[0]]
    op = outputs[0].op
    args = {name: ([v.val for v in var] if isinstance(var, (list, tuple)) else var.val)
            for name, var in op.inputs.items()}
    if as_input:
        args[first_name] = first_value
    before = copy.deepcopy(args)
    result = mil_ops.OPS[op_type](mil_ops.OpCall(op, args, {}))
    for name, value in before.items():  # ops must not write into their operands
        pairs = zip(args[name], value) if isinstance(value, list) else [(args[name], value)]
        for now, then in pairs:
            np.testing.assert_array_equal(np.asarray(now), np.asarray(then))
    results = result if isinstance(result, tuple) else (result,)
    expected = [reference] if reference is not None else [var.val for var in outputs]
    assert len(results) == len(expected)
    for got, want, var in zip(results, expected, outputs):
        assert want is not None, "coremltools has no value inference: give a reference"
        want = np.asarray(want)
        got = np.asarray(got).astype(want.dtype)
        assert got.shape == want.shape == tuple(var.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_supported_ops_cover_registry() -> None:
    assert SUPPORTED_OPS == frozenset(mil_ops.OPS) | mil_ops.CONTROL_FLOW  # while_loop: run by the interpreter
    assert {"linear", "matmul", "read_state", "coreml_update_state", "slice_update",
            "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense"} <= SUPPORTED_OPS
