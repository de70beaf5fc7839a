"""Core ML compression (coremltools.optimize.coreml): the saved program against its twin and fp32.

Twin bound. The program runs in the numpy interpreter computing in fp32 with fp16 KV states; the
twin is the eager model holding the program's own dequantised weights with the same fp16 cache
(CoreMLKVCache). Both round the same keys and values to fp16, so they differ only by fp32
summation order, amplified where a cache value sits at an fp16 rounding boundary. Measured on
minicpm-tiny (256-token windows): max abs 5e-4..1.5e-3 at logits of |z| ~ 15, SQNR 104..108 dB.
TWIN_TOLERANCES: max abs 1e-2 (7x the worst measurement), SQNR >= 70 dB. One wrong code or scale
in one layer moves logits by >= 0.076 (measured below), so a wrong kernel or a silently different
weight fails; an fp32 weight left in place of its codes fails the structural checks.

Fidelity bounds (program vs the fp32 reference on held-out text) are the recipes' proposed
defaults; the measured values on 2048 held-out tokens are in the module constants' comments.
"""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

import coremltools as ct  # noqa: E402

from tests.conftest import TINY_BLOCKFFN, target_spec  # noqa: E402
from cpm_mobile.exporter.errors import InputError  # noqa: E402
from cpm_mobile.exporter.models import load_model  # noqa: E402
from bench.synthetic import write_synthetic_checkpoint  # noqa: E402
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint  # noqa: E402
from cpm_mobile.exporter.targets.coreml.quant import (  # noqa: E402
    check_scheme,
    compress_mlmodel,
    compression_metadata,
    coreml_twin,
    expected_weight_bytes,
    stored_weights,
    weight_file_bytes,
)
from cpm_mobile.exporter.targets.base import ExportContext  # noqa: E402
from cpm_mobile.exporter.targets.registry import get_target
from cpm_mobile.exporter.sizes import predict_bytes  # noqa: E402
from cpm_mobile.exporter.targets.coreml.target import capture, convert, coreml_ready, package_size, save_package  # noqa: E402
from cpm_mobile.exporter.tokenizer import TextTokenizer  # noqa: E402
from cpm_mobile.exporter.targets.coreml.spec import CoreMLQuantization  # noqa: E402
from cpm_mobile.runtimes.check import CheckPlan, compare, greedy_runs, judge, teacher_forced_runs  # noqa: E402
from cpm_mobile.runtimes.coreml.session import CoreMLSession  # noqa: E402
from cpm_mobile.exporter.targets.coreml.structure import failed, structural_checks  # noqa: E402
from cpm_mobile.runtimes.torch_session import TorchSession  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
MAX_SEQ_LEN = 64
EMBEDDED = Path(__file__).resolve().parents[1] / "exporter" / "embedded"
TWIN_TOLERANCES = {"max_abs_logits": 1e-2, "min_sqnr_db": 70.0, "min_top1": 1.0}
SCHEMES = {
    "int8": {"scheme": "int8"},
    "int4": {"scheme": "int4"},
    # uniform palettes: k-means (the recipe default) takes ~90 s per model here; same op, same storage
    "palette4": {"scheme": "palette4", "mode": "uniform"},
    "palette2": {"scheme": "palette2", "mode": "uniform", "group_size": 4},
    "ternary": {"scheme": "ternary"},
}
OP_TYPE = {"int8": "constexpr_blockwise_shift_scale", "int4": "constexpr_blockwise_shift_scale",
           "palette4": "constexpr_lut_to_dense", "palette2": "constexpr_lut_to_dense",
           "ternary": "constexpr_lut_to_dense"}
scheme_of = TypeAdapter(CoreMLQuantization).validate_python


class Case:
    """One model converted once to an fp32-compute program; compressed per scheme on demand."""

    def __init__(self, model, folder: Path, prompts: list[list[int]]):
        self.model = model.eval()
        self.folder = folder
        self.mlmodel = convert(capture(coreml_ready(self.model), MAX_SEQ_LEN), MAX_SEQ_LEN, target_spec("coreml"))
        self.fp32_size = save_package(self.mlmodel, folder / "fp32.mlpackage")
        self.plan = CheckPlan(prompts=prompts, max_new_tokens=6, heldout_windows=[])
        self.reference = greedy_runs(TorchSession(self.model), self.plan)
        self._compressed: dict[str, tuple] = {}

    def compressed(self, name: str, scheme: dict):
        if name not in self._compressed:
            quantization = scheme_of(scheme)
            check_scheme(self.model, quantization)
            mlmodel = compress_mlmodel(self.mlmodel, quantization)
            package = self.folder / f"{name}.mlpackage"
            save_package(mlmodel, package)
            metadata = compression_metadata(mlmodel, quantization, self.model, "fp32")
            self._compressed[name] = (quantization, mlmodel, package, metadata)
        return self._compressed[name]

    def session(self, package: Path, metadata: dict) -> CoreMLSession:
        io = {"max_seq_len": MAX_SEQ_LEN, "vocab_size": self.model.config.vocab_size}
        return CoreMLSession(package, io, runtime="interpreter")

    def structure(self, package: Path, metadata: dict) -> list[dict]:
        return structural_checks(package, self.model.config.vocab_size, compression=metadata)

    def against(self, reference_model, session) -> dict:
        reference = greedy_runs(TorchSession(reference_model), self.plan)
        return compare(reference, teacher_forced_runs(session, self.plan, reference), self.plan)


def _state(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def minicpm(tmp_path_factory) -> Case:
    model = build_model(load_checkpoint(EMBEDDED / "minicpm-tiny"), max_seq_len=MAX_SEQ_LEN)
    tokenizer = TextTokenizer.from_folder(EMBEDDED / "minicpm-tiny")
    text = (EMBEDDED / "heldout.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text[:4000])
    return Case(model, tmp_path_factory.mktemp("minicpm"), [ids[:24], ids[100:112]])


# -- schemes -----------------------------------------------------------------------------------------


def test_scheme_fields_are_validated() -> None:
    with pytest.raises(ValidationError, match="palette4"):
        scheme_of({"scheme": "int3"})
    with pytest.raises(ValidationError, match="group_size"):
        scheme_of({"scheme": "int4", "group_size": 0})
    with pytest.raises(ValidationError, match="mode"):
        scheme_of({"scheme": "palette2", "mode": "median"})
    with pytest.raises(ValidationError, match="extra"):
        scheme_of({"scheme": "int8", "bits": 6})
    assert scheme_of({"scheme": "int4"}).group_size == 32


def test_scheme_the_model_cannot_carry_is_refused_up_front(minicpm: Case) -> None:
    with pytest.raises(InputError, match=r"quantization\.group_size: 40 does not divide the 192 input columns"):
        check_scheme(minicpm.model, scheme_of({"scheme": "int4", "group_size": 40}))
    with pytest.raises(InputError, match=r"quantization\.group_size: 7 does not divide the 192 output channels"):
        check_scheme(minicpm.model, scheme_of({"scheme": "palette4", "group_size": 7}))
    with pytest.raises(InputError, match=r"quantization\.lm_head: the lm_head is tied"):
        check_scheme(minicpm.model, scheme_of({"scheme": "int4", "embedding": "int8", "lm_head": "scheme"}))
    with pytest.raises(InputError, match=r"quantization\.group_size"):  # the program is checked too
        compress_mlmodel(minicpm.mlmodel, scheme_of({"scheme": "int8", "group_size": 40}))


# -- program vs twin, structure ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEMES))
def test_compressed_program_matches_its_twin(minicpm: Case, name: str) -> None:
    before = _state(minicpm.model)
    quantization, mlmodel, package, metadata = minicpm.compressed(name, SCHEMES[name])
    twin = coreml_twin(minicpm.model, mlmodel)
    after = _state(minicpm.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    session = minicpm.session(package, metadata)
    structure = minicpm.structure(package, metadata)
    assert failed(structure) == [], structure
    assert OP_TYPE[name] in metadata["op_types"]
    measured = minicpm.against(twin, session)
    assert judge(measured, TWIN_TOLERANCES) == [], measured

    # The twin really holds quantised weights, tied ones still tied, and differs from fp32.
    q_proj = twin.layers[0].self_attn.q_proj.weight.detach().numpy()
    source = minicpm.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert twin.lm_head.weight.data_ptr() == twin.embed_tokens.weight.data_ptr()  # still tied
    assert not np.array_equal(q_proj, source)
    if name == "palette2":
        assert len(np.unique(q_proj[:4])) <= 4  # one 2-bit palette per group of 4 rows
    if name == "ternary":  # {-s, 0, +s} per output channel, s = mean |W| of the row
        row = source[0]
        assert set(np.unique(q_proj[0])) <= {np.float32(-np.abs(row).mean()), 0.0, np.float32(np.abs(row).mean())}
    if name == "int4":
        codes = q_proj[0, :32]
        assert len(np.unique(codes)) <= 16


def test_compressed_sizes_follow_the_formula(minicpm: Case) -> None:
    """weight.bin within 10 % of params x bits / 8 + scales + unquantised tensors; smaller than fp32 by the bits."""
    fp32 = weight_file_bytes(minicpm.folder / "fp32.mlpackage")
    for name in ("int8", "int4", "ternary"):
        quantization, _, package, _ = minicpm.compressed(name, SCHEMES[name])
        size = weight_file_bytes(package)
        formula = expected_weight_bytes(minicpm.model, quantization, "fp32")
        assert abs(size / formula - 1) <= 0.10, (name, size, formula)
    int4 = weight_file_bytes(minicpm.compressed("int4", SCHEMES["int4"])[2])
    int8 = weight_file_bytes(minicpm.compressed("int8", SCHEMES["int8"])[2])
    assert int4 < int8 < 0.35 * fp32  # int8 blocks of 32: 8 + 1 bit per weight (fp32 scales)
    # the whole package (program, weights, manifest) as `cpm-mobile inspect` predicts it (exporter/sizes.py)
    for name in SCHEMES:
        quantization, _, package, _ = minicpm.compressed(name, SCHEMES[name])
        predicted = predict_bytes(minicpm.model, target_spec("coreml", quantization=quantization.model_dump()))
        assert abs(package_size(package) / predicted - 1) <= 0.10, (name, package_size(package), predicted)


def test_structure_refuses_an_uncompressed_program(minicpm: Case) -> None:
    _, _, _, metadata = minicpm.compressed("int4", SCHEMES["int4"])
    checks = structural_checks(minicpm.folder / "fp32.mlpackage", minicpm.model.config.vocab_size,
                               compression=metadata)
    names = {line.split(":")[0] for line in failed(checks)}
    assert names == {"compression_ops", "weights_compressed", "storage_dtypes", "weight_file_size"}


def _blob(package: Path, op_type: str, contains: str, argument: str) -> tuple[Path, int]:
    """(weight.bin, data offset) of one input blob of the first `op_type` op whose output name has `contains`."""
    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    operations = mlmodel.get_spec().mlProgram.functions["main"].block_specializations["CoreML8"].operations
    op = next(op for op in operations if op.type == op_type and contains in op.outputs[0].name)
    blob = op.inputs[argument].arguments[0].value.blobFileValue  # constexpr inputs are stored inline
    weight_file = Path(mlmodel.weights_dir) / "weight.bin"
    sentinel, _, _, data_offset = struct.unpack_from("<IIQQ", weight_file.read_bytes(), blob.offset)
    assert sentinel == 0xDEADBEEF  # MIL blob header
    return weight_file, data_offset


@pytest.mark.parametrize("what", ["codes", "scale"])
def test_one_wrong_code_or_scale_fails_the_twin_bound(minicpm: Case, tmp_path: Path, what: str) -> None:
    _, mlmodel, package, metadata = minicpm.compressed("int4", SCHEMES["int4"])
    twin = coreml_twin(minicpm.model, mlmodel)
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(package, broken)
    weight_file, offset = _blob(broken, "constexpr_blockwise_shift_scale", "layers_0_self_attn_q_proj",
                                "data" if what == "codes" else "scale")
    data = bytearray(weight_file.read_bytes())
    if what == "codes":
        data[offset] ^= 0x88  # two int4 codes of row 0 move by 8 steps
    else:
        (scale,) = struct.unpack_from("<f", data, offset)
        struct.pack_into("<f", data, offset, -scale)  # one block of 32 weights changes sign
    weight_file.write_bytes(bytes(data))
    measured = minicpm.against(twin, minicpm.session(broken, metadata))
    assert judge(measured, TWIN_TOLERANCES), measured
    # measured: two codes 0.076, one scale > 0.1; the twin noise is 1.5e-3 at most
    assert measured["max_abs_logits"] > 5 * TWIN_TOLERANCES["max_abs_logits"]


# -- fidelity vs fp32 -------------------------------------------------------------------------------


FIDELITY = {  # recipe defaults proposed from the 2048-token measurements (see the report)
    "int8": {"max_kl": 1e-3, "min_top1": 0.95},
    "int4": {"max_kl": 3e-2, "min_top1": 0.85},
}


@pytest.mark.parametrize("name", list(FIDELITY))
def test_fidelity_against_fp32(minicpm: Case, name: str) -> None:
    _, _, package, metadata = minicpm.compressed(name, SCHEMES[name])
    measured = compare(minicpm.reference, teacher_forced_runs(minicpm.session(package, metadata), minicpm.plan,
                                                              minicpm.reference), minicpm.plan)
    assert judge(measured, FIDELITY[name]) == [], measured
    assert measured["kl"] > 0  # the weights really changed


# -- an untied MLA layout ---------------------------------------------------------------------------


def test_untied_mla_blockffn_int4(tmp_path: Path) -> None:
    folder = write_synthetic_checkpoint(tmp_path / "checkpoint", "blockffn-small", **TINY_BLOCKFFN, vocab_size=2048)
    model, _ = load_model(folder, max_seq_len=MAX_SEQ_LEN)
    assert model.lm_head.weight is not model.embed_tokens.weight
    rng = np.random.default_rng(0)
    case = Case(model, tmp_path, [rng.integers(0, 2048, 13).tolist()])
    quantization, mlmodel, package, metadata = case.compressed("int4", {"scheme": "int4", "lm_head": "scheme"})
    weights = stored_weights(mlmodel)
    compressed = {name for name, w in weights.items() if w.compressed}
    assert {"embed_tokens_weight", "lm_head_weight"} <= compressed
    assert all(w.compressed for w in weights.values() if w.value.ndim == 2)
    twin = coreml_twin(model, mlmodel)
    assert twin.lm_head.weight.data_ptr() != twin.embed_tokens.weight.data_ptr()
    session = case.session(package, metadata)
    structure = case.structure(package, metadata)
    assert failed(structure) == [], structure
    assert set(metadata["storage_dtypes"]) == {"int4", "int8"}  # lm_head int4, embedding int8
    measured = case.against(twin, session)
    assert judge(measured, TWIN_TOLERANCES) == [], measured


# -- through the target ------------------------------------------------------------------------------


def test_target_exports_the_compressed_program_and_its_twin(minicpm: Case, tmp_path: Path) -> None:
    from dataclasses import asdict

    from cpm_mobile.runtimes.base import open_session

    spec = target_spec("coreml", quantization={"scheme": "int4"})
    exported = get_target("coreml").export(minicpm.model, tmp_path, spec, ExportContext(bos_id=1, eos_ids=(2,)))
    artifact = asdict(exported.info)
    compression = artifact["metadata"]["compression"]
    assert compression["storage_dtypes"] == ["int4", "int8"] and compression["compressed_weights"] == 29
    session = open_session(tmp_path, artifact)
    structure = structural_checks(tmp_path / artifact["entry"], minicpm.model.config.vocab_size, compression=compression)
    assert failed(structure) == [] and len(structure) == 11, structure
    assert get_target("coreml").structure(tmp_path, artifact, exported.twin) == []
    measured = minicpm.against(exported.twin, session)
    assert judge(measured, TWIN_TOLERANCES) == [], measured
    with pytest.raises(InputError, match=r"quantization\.group_size"):
        get_target("coreml").export(minicpm.model, tmp_path / "bad", target_spec(
            "coreml", quantization={"scheme": "int4", "group_size": 40}), ExportContext(bos_id=1, eos_ids=(2,)))
