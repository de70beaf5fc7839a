"""The Core ML target: export, run (numpy interpreter off macOS) and compare with PyTorch.

Bounds. fp32 programs compute in fp32 but keep the KV cache in fp16 states (Core ML accepts no
other state type), so every key and value is rounded once (unit roundoff 2**-11 ~ 4.9e-4,
relative). On these random models the logits reach |z| ~ 20, so a few roundoffs relative to z
give up to ~1e-2; measured: 2.3e-3 (MiniCPM4 layout) and 6.0e-3 (BlockFFN/MLA), KL <= 1e-7.
FP32_TOLERANCES sets max_abs 2e-2 (the fp32 recipe's Core ML bound, 3x above the worst
measurement), KL <= 1e-5, SQNR >= 50 dB, identical top-1 and greedy continuations. A wrong op,
axis or weight moves logits by O(1) (the fault injections below measure 5 and 10).
fp16 programs (fp16 weights and activations): KL <= 1e-3 and top-1 >= 99% (measured KL 2.7e-6
and 8.4e-6, top-1 100%, max abs 1.3e-2 and 9.3e-2).
"""
from __future__ import annotations

import shutil
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import coremltools as ct  # noqa: E402

from tests.conftest import TINY_BLOCKFFN, TINY_GQA, target_spec  # noqa: E402
from cpm_mobile.exporter.errors import InputError  # noqa: E402
from cpm_mobile.exporter.models import load_model  # noqa: E402
from bench.synthetic import write_synthetic_checkpoint  # noqa: E402
from cpm_mobile.exporter.models.kv_cache import StaticKVCache  # noqa: E402
from cpm_mobile.exporter.targets.base import ExportContext  # noqa: E402
from cpm_mobile.exporter.targets.registry import get_target
from cpm_mobile.runtimes.base import open_session  # noqa: E402
from cpm_mobile.runtimes.check import CheckPlan, compare, greedy_runs, judge, teacher_forced_runs  # noqa: E402
from cpm_mobile.runtimes.coreml import SUPPORTED_OPS, UnsupportedOpError, load_mil_program  # noqa: E402
from cpm_mobile.runtimes.coreml.session import INTERPRETER_VERIFIED, CoreMLSession  # noqa: E402
from cpm_mobile.exporter.targets.coreml.structure import structural_checks  # noqa: E402
from cpm_mobile.runtimes.torch_session import TorchSession  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Function _TORCH_OPS_REGISTRY:DeprecationWarning")
MAX_SEQ_LEN = 64
FP32_TOLERANCES = {"max_abs_logits": 2e-2, "max_kl": 1e-5, "min_sqnr_db": 50, "min_top1": 1.0, "min_greedy": 1.0}
FP16_TOLERANCES = {"max_kl": 1e-3, "min_top1": 0.99}
# Token ids above 65535 (and one that aliases 4464 modulo 2**16): an index narrowed to uint16 shows.
WIDE_PROMPT = [1, 65536, 70000, 73447, 4464, 123, 9000]
LAYOUTS = {
    "minicpm4": ("minicpm4-0.5b", TINY_GQA),
    "blockffn": ("blockffn-small", TINY_BLOCKFFN),
}


class Layout:
    """One synthetic checkpoint: its reference model, check plan and reference observations."""

    def __init__(self, folder: Path, preset: str, overrides: dict):
        write_synthetic_checkpoint(folder / "checkpoint", preset, **overrides)
        self.model, _ = load_model(folder / "checkpoint", max_seq_len=MAX_SEQ_LEN)
        self.folder = folder
        vocab = self.model.config.vocab_size
        rng = np.random.default_rng(0)
        self.plan = CheckPlan(
            prompts=[WIDE_PROMPT, rng.integers(0, vocab, 13).tolist()],
            max_new_tokens=10,
            heldout_windows=[rng.integers(0, vocab, 32).tolist()],
        )
        self.reference = greedy_runs(TorchSession(self.model), self.plan)
        self.exports: dict[str, tuple[dict, CoreMLSession]] = {}
        self.structure: dict[str, list[dict]] = {}
        self.model_unchanged_by_export: dict[str, bool] = {}

    context = ExportContext(bos_id=1, eos_ids=(2,))

    def exported(self, precision: str) -> tuple[dict, CoreMLSession]:
        """(artifact dict, session), exported and opened once per precision."""
        if precision not in self.exports:
            out = self.folder / precision
            before = _tensors(self.model)
            spec = target_spec("coreml", precision=precision)
            info = get_target("coreml").export(self.model, out, spec, self.context, lambda *a: None).info
            after = _tensors(self.model)
            self.model_unchanged_by_export[precision] = before.keys() == after.keys() and all(
                torch.equal(before[name], after[name]) for name in before)
            artifact = asdict(info)
            self.exports[precision] = (artifact, open_session(out, artifact))
            self.structure[precision] = structural_checks(out / info.entry, self.model.config.vocab_size)
        return self.exports[precision]

    def measure(self, session) -> dict:
        return compare(self.reference, teacher_forced_runs(session, self.plan, self.reference), self.plan)


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (caches included) by name, with the cache module types in the names."""
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    caches = ",".join(type(cache).__name__ for cache in model.kv_caches)
    return {f"{name}@{caches}": tensor.detach().clone() for name, tensor in named.items()}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Layout]:
    return {name: Layout(tmp_path_factory.mktemp(name), *spec) for name, spec in LAYOUTS.items()}


@pytest.fixture(scope="module")
def minicpm4(layouts) -> Layout:
    return layouts["minicpm4"]


# -- numerics through the interpreter --------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp32_program_matches_pytorch(layouts, layout: str) -> None:
    case = layouts[layout]
    artifact, session = case.exported("fp32")
    assert session.verified == INTERPRETER_VERIFIED
    assert all(check["passed"] for check in case.structure["fp32"]), case.structure["fp32"]
    measured = case.measure(session)
    assert judge(measured, FP32_TOLERANCES) == [], measured
    assert measured["greedy_prefix_tokens"] == measured["greedy_tokens"]  # identical continuations


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp16_program_matches_pytorch(layouts, layout: str) -> None:
    case = layouts[layout]
    artifact, session = case.exported("fp16")
    assert all(check["passed"] for check in case.structure["fp16"]), case.structure["fp16"]
    measured = case.measure(session)
    assert judge(measured, FP16_TOLERANCES) == [], measured
    assert measured["max_abs_logits"] > 0  # fp16 really rounded something


# -- the artifact and its contract -------------------------------------------------------------


def test_artifact_describes_package_and_leaves_model_untouched(minicpm4) -> None:
    artifact, _ = minicpm4.exported("fp32")
    package = minicpm4.folder / "fp32" / artifact["entry"]
    assert artifact["files"] == ["model.mlpackage"] and package.is_dir()
    assert not [p for p in package.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    metadata = artifact["metadata"]
    assert metadata["deployment_target"] == "iOS18" and metadata["spec_version"] == 9
    assert metadata["compute_precision"] == "fp32" and metadata["opset"] == "CoreML8"
    assert metadata["size_bytes"] == sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    io = artifact["io"]
    assert [i["name"] for i in io["inputs"]] == ["tokens", "input_pos"]
    assert io["dynamic_dims"]["T"] == {"min": 1, "max": MAX_SEQ_LEN, "kind": "RangeDim"}
    config = minicpm4.model.config
    assert len(io["states"]) == 2 * config.num_layers
    assert {s["dtype"] for s in io["states"]} == {"float16"}
    assert io["states"][0]["shape"] == [1, config.num_kv_heads, MAX_SEQ_LEN, config.head_dim]
    # the caller's model keeps its own caches, weights and cache contents
    assert all(type(cache) is StaticKVCache for cache in minicpm4.model.kv_caches)
    assert minicpm4.model_unchanged_by_export["fp32"] and all(minicpm4.model_unchanged_by_export.values())


def test_fp16_embedding_gather_keeps_int32_indices(minicpm4) -> None:
    artifact, _ = minicpm4.exported("fp16")
    program = load_mil_program(minicpm4.folder / "fp16" / artifact["entry"])
    vocab = minicpm4.model.config.vocab_size
    embedding = [op for op in program.functions["main"].operations
                 if op.op_type == "gather" and op.x.shape[0] == vocab]
    assert len(embedding) == 1
    assert embedding[0].x.dtype == ct.converters.mil.mil.types.fp16  # an fp16 program ...
    assert embedding[0].indices.dtype == ct.converters.mil.mil.types.int32  # ... with int32 token ids


def test_export_refuses_a_model_not_in_fp32(minicpm4) -> None:
    import copy

    half = copy.deepcopy(minicpm4.model).to(torch.float16)
    with pytest.raises(InputError, match="float32"):
        get_target("coreml").export(half, minicpm4.folder / "refused", target_spec("coreml"), minicpm4.context,
                                    lambda *a: None)
    assert not (minicpm4.folder / "refused" / "model.mlpackage").exists()


def test_session_cache_positions(minicpm4) -> None:
    _, session = minicpm4.exported("fp32")
    prompt = np.array(WIDE_PROMPT)
    session.reset()
    first = session.forward(prompt, 0)
    with pytest.raises(ValueError, match="gap"):
        session.forward(prompt[:1], len(prompt) + 1)
    session.forward(prompt[:3], len(prompt))
    session.reset()  # a fresh state: the same prompt gives the same logits
    np.testing.assert_array_equal(session.forward(prompt, 0), first)
    # rewinding to position 2 rewrites slots 2.. before they are read again
    np.testing.assert_array_equal(session.forward(prompt[2:], 2), first[2:])


# -- structural checks -----------------------------------------------------------------------------


def _save_program(program, path: Path) -> Path:
    mlmodel = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                         compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                         skip_model_load=True)
    mlmodel.save(str(path))
    return path


def test_structure_flags_uint16_gather_over_large_vocab(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    vocab = 73448
    table = np.random.default_rng(0).random((vocab, 4), dtype=np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3), dtype=types.int32)], opset_version=ct.target.iOS18)
    def narrow_embedding(ids):
        return mb.gather(x=table, indices=mb.cast(x=ids, dtype="uint16"), axis=0, name="embedding")

    checks = {c["name"]: c for c in structural_checks(_save_program(narrow_embedding, tmp_path / "g.mlpackage"), vocab)}
    assert not checks["gather_indices"]["passed"]
    assert "uint16" in checks["gather_indices"]["detail"] and "73448" in checks["gather_indices"]["detail"]
    assert all(c["passed"] for name, c in checks.items() if name != "gather_indices")


def test_structure_passes_on_exported_fp16_package(minicpm4) -> None:
    artifact, session = minicpm4.exported("fp16")
    structure = minicpm4.structure["fp16"]
    names = [c["name"] for c in structure]
    assert names == ["ml_program", "spec_version", "opset", "op_allowlist", "states_fp16", "tensor_rank",
                     "gather_indices"]
    assert all(c["passed"] for c in structure), structure


def test_session_refuses_an_op_the_interpreter_cannot_run(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb

    assert "local_response_norm" not in SUPPORTED_OPS

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 3))], opset_version=ct.target.iOS18)
    def unknown(x):
        return mb.local_response_norm(x=x, size=3)

    with pytest.raises(UnsupportedOpError, match="local_response_norm"):
        CoreMLSession(_save_program(unknown, tmp_path / "u.mlpackage"), {"max_seq_len": 8, "vocab_size": 8},
                      runtime="interpreter")


# -- fault injection: the check must see a damaged package -----------------------------------------


def _copy_package(minicpm4: Layout, tmp_path: Path):
    artifact, _ = minicpm4.exported("fp32")
    package = tmp_path / "model.mlpackage"
    shutil.copytree(minicpm4.folder / "fp32" / artifact["entry"], package)
    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    spec = mlmodel.get_spec()
    operations = spec.mlProgram.functions["main"].block_specializations["CoreML8"].operations
    consts = {op.outputs[0].name: op for op in operations if op.type == "const"}
    return artifact, package, Path(mlmodel.weights_dir), spec, operations, consts


def _assert_breach(minicpm4: Layout, artifact: dict, package: Path) -> dict:
    session = CoreMLSession(package, artifact["io"])
    measured = minicpm4.measure(session)
    assert judge(measured, FP32_TOLERANCES), measured
    assert measured["max_abs_logits"] > 10 * FP32_TOLERANCES["max_abs_logits"]
    return measured


def test_flipped_weight_bytes_breach(minicpm4, tmp_path: Path) -> None:
    artifact, package, weights_dir, _, operations, consts = _copy_package(minicpm4, tmp_path)
    first_linear = next(op for op in operations if op.type == "linear")
    blob = consts[first_linear.inputs["weight"].arguments[0].name].attributes["val"].blobFileValue
    weight_file = weights_dir / "weight.bin"
    data = bytearray(weight_file.read_bytes())
    sentinel, _, _, data_offset = struct.unpack_from("<IIQQ", data, blob.offset)  # MIL blob header
    assert sentinel == 0xDEADBEEF
    for i in range(4):  # one fp32 weight of the first projection
        data[data_offset + i] ^= 0xFF
    weight_file.write_bytes(bytes(data))
    _assert_breach(minicpm4, artifact, package)


def test_changed_softmax_axis_breaches(minicpm4, tmp_path: Path) -> None:
    artifact, package, _, spec, operations, consts = _copy_package(minicpm4, tmp_path)
    softmax = next(op for op in operations if op.type == "softmax")
    axis = consts[softmax.inputs["axis"].arguments[0].name].attributes["val"].immediateValue.tensor.ints
    assert list(axis.values) == [-1]
    axis.values[:] = [1]  # over heads instead of key positions
    (package / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(spec.SerializeToString())
    _assert_breach(minicpm4, artifact, package)


# -- the cache module in PyTorch -------------------------------------------------------------------


def test_coreml_cache_equals_an_fp16_static_cache(minicpm4) -> None:
    """Same numbers as the reference cache stored in fp16: the slice update writes what index_copy_ does."""
    from torch import nn

    from cpm_mobile.exporter.targets.coreml.target import coreml_ready

    coreml_model = coreml_ready(minicpm4.model)
    fp16_model = coreml_ready(minicpm4.model)
    fp16_model.kv_caches = nn.ModuleList(
        StaticKVCache(c.k_cache.shape[1], c.k_cache.shape[3], c.v_cache.shape[3], MAX_SEQ_LEN, c.scale, torch.float16)
        for c in coreml_model.kv_caches)
    tokens = torch.tensor([WIDE_PROMPT])
    with torch.no_grad():
        for model in (coreml_model, fp16_model):
            model.reset_cache()
        for start, end in ((0, 5), (5, 6), (6, 7), (2, 4)):  # prefill, decode, decode, rewind
            got = coreml_model(tokens[:, start:end], torch.tensor([start]))
            expected = fp16_model(tokens[:, start:end], torch.tensor([start]))
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp32_program_within_1e4_of_pytorch_with_the_same_fp16_state_rounding(layouts, layout: str) -> None:
    """Isolates the fp16-state rounding: against a PyTorch reference that stores its cache in fp16
    too, the fp32 program's logits agree to ~1e-4 (measured 1.0e-4 on the BlockFFN/MLA layout, 7e-5
    on GQA). What remains is the same rounding seen from the other side: numpy and torch sum in
    different orders, and a k or v that lands a last-bit apart in fp32 can round to the adjacent
    fp16 value (2**-11 relative); how many land so depends on the CPU's kernels (4.5e-4 on an AVX-512 /
    AMX machine). Bound: 1e-3, against ~1e-2 when the states are compared with an fp32 cache and O(1)
    for any real fault."""
    from cpm_mobile.exporter.targets.coreml.target import coreml_ready

    case = layouts[layout]
    _, session = case.exported("fp32")
    rounded_reference = greedy_runs(TorchSession(coreml_ready(case.model)), case.plan)
    measured = compare(rounded_reference, teacher_forced_runs(session, case.plan, rounded_reference), case.plan)
    assert measured["max_abs_logits"] <= 1e-3, measured
    assert measured["greedy_prefix_tokens"] == measured["greedy_tokens"]
