"""Weight-only linears in ExecuTorch: our kernels (cpm_mobile::linear_q8x4 / linear_q4x4) against their eager
form, the tile layout, and a whole quantised model whose .pte matches its twin to fp32 rounding.

XNNPACK rounds a quantised linear's activations to int8 per token, which makes the twin statistical and
costs several times llama.cpp Q8_0's KL on real models; with `activations: fp32` the .pte keeps fp32
activations and the twin is deterministic: tight bounds at any depth, stored tiles checked byte for byte.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from torch import nn
from executorch.runtime import Runtime
from torch.export import Dim

from cpm_mobile.exporter.kernels import ops
from cpm_mobile.exporter.kernels.weight_only import WeightOnlyLinear
from cpm_mobile.exporter.models import load_model
from cpm_mobile.exporter.defaults import DEFAULT_MODEL
from cpm_mobile.exporter.targets.executorch import target as et
from cpm_mobile.exporter.targets.executorch.exact import stored_weight_faults
from cpm_mobile.exporter.targets.executorch.quant import expected_size_bytes, quantize_for_executorch
from cpm_mobile.exporter.targets.executorch.spec import ExecuTorchQuantization
from cpm_mobile.runtimes import metrics
from cpm_mobile.runtimes.executorch import ExecuTorchSession, load_kernel_libraries

MAX_SEQ_LEN = 64


def scheme(**fields):
    return TypeAdapter(ExecuTorchQuantization).validate_python(fields)


def random_codes(bits: int, rows: int, columns: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    low, high = (-127, 128) if bits == 8 else (-8, 8)
    codes = torch.randint(low, high, (rows, columns), generator=generator, dtype=torch.int8)
    scales = (torch.rand(rows, columns // 32, generator=generator) * 0.02 + 1e-3).to(ops.SCALE_DTYPES[bits]).float()
    return codes, scales


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [4, 37])
def test_tiles_round_trip_and_hold_rows_past_n_as_zero_codes(bits, rows):
    codes, scales = random_codes(bits, rows, 96)
    packed = ops.pack_tiles(bits, codes, scales)
    assert packed.shape == (-(-rows // 4), 3, ops.tile_bytes(bits)) and packed.dtype == torch.uint8
    assert ops.tile_bytes(bits) == {8: 136, 4: 72}[bits]  # 8 bits: Q8_0's 34 bytes per 32 weights, x 4 rows
    back, back_scales = ops.unpack_tiles(bits, packed, rows)
    assert torch.equal(back, codes) and torch.equal(back_scales.float(), scales)
    padded, _ = ops.unpack_tiles(bits, packed, packed.shape[0] * 4)
    assert not padded[rows:].any()


def test_tiles_refuse_scales_their_dtype_cannot_hold_exactly():
    codes, _ = random_codes(4, 8, 64)
    with pytest.raises(ValueError, match="bf16|bfloat16"):
        ops.pack_tiles(4, codes, torch.full((8, 2), 0.1))  # 0.1 is not a bf16 value
    with pytest.raises(ValueError, match="one scale per 32"):
        ops.pack_tiles(8, codes, torch.ones(8, 1))


class _Wrap(nn.Module):
    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def _program(module: nn.Module, columns: int):
    example = (torch.randn(1, 3, columns),)
    program = torch.export.export(_Wrap(module), example, dynamic_shapes=({1: Dim("T", min=1, max=96)},),
                                  strict=False)
    return et.emit(et.lower(program, {}))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows, columns", [(37, 96), (260, 512)])
def test_the_kernel_computes_its_eager_form_to_fp32_rounding(bits, rows, columns, tmp_path):
    """Decode (one token), prefill (6-token register tiles and a remainder) and rows past the last full tile."""
    codes, scales = random_codes(bits, rows, columns, seed=rows)
    module = WeightOnlyLinear(codes, scales, bits, bias=torch.randn(rows))
    path = tmp_path / "linear.pte"
    program = _program(module, columns)
    et.write_program(program, path)
    load_kernel_libraries()
    method = Runtime.get().load_program(path).load_method("forward")
    for tokens in (1, 5, 13, 64):
        x = torch.randn(1, tokens, columns)
        got = method.execute([x])[0]
        exact = (x.double() @ module.dequantised().double().T + module.bias.double())
        eager = module(x)
        scale = exact.abs().max()
        assert (got.double() - exact).abs().max() / scale < 2e-6, tokens
        assert (eager.double() - exact).abs().max() / scale < 2e-6, tokens
    assert ops.KERNELS_LINEAR[bits] in et.program_contents(program)["kernels"]


@pytest.fixture(scope="module")
def embedded_model():
    model, _ = load_model(DEFAULT_MODEL, max_seq_len=MAX_SEQ_LEN, dtype=torch.float32)
    return model


def _heldout_tokens(model, count: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(3, model.config.vocab_size, count, dtype=np.int64)


def _eager(model, tokens: np.ndarray) -> np.ndarray:
    model.reset_cache()
    with torch.no_grad():
        return model(torch.from_numpy(tokens[None]), torch.tensor([0]))[0].numpy()


def test_every_linear_becomes_a_weight_only_linear_on_q8_0s_grid(embedded_model):
    variant = quantize_for_executorch(embedded_model, scheme(scheme="int8", activations="fp32"))
    linears = {name: m for name, m in variant.named_modules() if isinstance(m, WeightOnlyLinear)}
    sources = {name for name, m in embedded_model.named_modules() if isinstance(m, nn.Linear)}
    assert set(linears) == sources  # the body and the lm_head
    up = linears["layers.0.mlp.up_proj"]
    codes, scales = up.codes_and_scales()
    weight = dict(embedded_model.named_parameters())["layers.0.mlp.up_proj.weight"].detach()
    blocks = weight.reshape(weight.shape[0], -1, 32)
    # torchao's symmetric round to nearest per block of 32 (Q8_0's grid; its scale max|w| / 127.5 where
    # Q8_0's is max|w| / 127), the scale stored as fp16 as Q8_0's and the codes rounded on that scale
    assert scales.dtype == torch.float16
    scales = scales.float()
    assert torch.allclose(scales, blocks.abs().amax(-1) / 127.5, rtol=2.0**-11)
    error = (codes.reshape(blocks.shape).float() * scales[..., None] - blocks).abs()
    # every code the nearest on its block's grid; a block's largest weight may clip at 127 once its scale is
    # rounded down to fp16 (by at most 127.5 x 2**-11 steps)
    inside = (blocks / scales[..., None]).abs() < 127
    assert (error[inside] <= 0.5001 * scales[..., None].expand_as(error)[inside]).all()
    assert (error <= (0.5 + 128 * 2.0**-11) * scales[..., None]).all()
    assert not any(isinstance(m, nn.Linear) for m in variant.modules())
    # the source is untouched
    assert isinstance(dict(embedded_model.named_modules())["layers.0.mlp.up_proj"], nn.Linear)


def test_weight_only_int8_is_closer_to_fp32_than_xnnpacks_8da8w(embedded_model):
    """The quality the kernel buys, measured on the eager twins (each is what its .pte computes)."""
    tokens = _heldout_tokens(embedded_model)
    reference = _eager(embedded_model, tokens)
    weight_only = _eager(quantize_for_executorch(embedded_model, scheme(scheme="int8", activations="fp32")), tokens)
    dynamic = _eager(quantize_for_executorch(embedded_model, scheme(scheme="int8")), tokens)
    kl_weight_only, kl_dynamic = metrics.mean_kl_divergence(reference, weight_only), metrics.mean_kl_divergence(reference, dynamic)
    assert kl_weight_only < kl_dynamic / 2, (kl_weight_only, kl_dynamic)


@pytest.mark.slow
@pytest.mark.parametrize("fields", [{"scheme": "int8", "activations": "fp32"},
                                    {"scheme": "int4", "activations": "fp32", "lm_head": "int4"}])
def test_weight_only_pte_matches_its_twin_to_fp32_rounding_and_its_tiles_are_checked(embedded_model, fields,
                                                                                     tmp_path):
    variant = quantize_for_executorch(embedded_model, scheme(**fields))
    path = tmp_path / "model.pte"
    program = et.capture(et.export_ready(variant, et.ATTENTION_CUSTOM), MAX_SEQ_LEN)
    et.write_program(et.emit(et.lower(program, {"get_max_seq_len": MAX_SEQ_LEN})), path)
    tokens = _heldout_tokens(embedded_model)
    session = ExecuTorchSession(path)
    got = np.concatenate([session.forward(tokens[:40], 0)] + [session.forward(tokens[i:i + 1], i) for i in range(40, 48)])
    twin = _eager(variant, tokens)
    assert metrics.sqnr_db(twin, got) > 100  # deterministic: only the summation order differs
    assert abs(path.stat().st_size / expected_size_bytes(variant) - 1) < 0.10
    assert stored_weight_faults(path, variant) == []
    # A twin whose codes differ in one byte from the program's: named, whatever the logits say.
    wrong = quantize_for_executorch(embedded_model, scheme(**fields))
    module = dict(wrong.named_modules())["layers.2.mlp.down_proj"]
    module.packed[0, 0, -1] ^= 0x01
    faults = stored_weight_faults(path, wrong)
    assert len(faults) == 1 and "layers.2.mlp.down_proj" in faults[0]


def test_weight_only_refuses_other_blocks_and_the_fused_sparse_experts():
    from pydantic import ValidationError

    from cpm_mobile.exporter.errors import InputError
    from cpm_mobile.exporter.passes.blockffn_sparse import blockffn_sparse
    from cpm_mobile.exporter.targets.executorch.spec import CAPABILITIES

    blockffn, _ = load_model(DEFAULT_MODEL.parent / "blockffn-tiny", max_seq_len=MAX_SEQ_LEN, dtype=torch.float32)
    fused = blockffn_sparse(blockffn, {}, CAPABILITIES)
    with pytest.raises(InputError, match="quantization.activations: fp32 .* fused sparse experts"):
        quantize_for_executorch(fused, scheme(scheme="int8", activations="fp32"))

    with pytest.raises(ValidationError, match="group_size 32"):
        scheme(scheme="int8", activations="fp32", group_size=64)
    with pytest.raises(ValidationError, match="group_size 32"):
        scheme(scheme="int4", activations="fp32", group_size=64)
    with pytest.raises(ValidationError, match="per output channel"):
        scheme(scheme="int8", group_size=32)
    assert scheme(scheme="int8", activations="fp32").group_size == 32
