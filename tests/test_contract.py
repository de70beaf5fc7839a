"""The bundle contract (exporter/contract.py): manifest.json and report.json as typed models.

Fast: dicts shaped like what today's export writes, no export.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpm_mobile.exporter import contract
from cpm_mobile.exporter.contract import (
    FORMAT_VERSION, MANIFEST_SCHEMA_FILE, ArtifactEntry, CacheContract, IOContract, Manifest, Report,
    manifest_json_schema, normalise_io, read_manifest, read_report,
)
from cpm_mobile.exporter.errors import InputError

SHA = "ab" * 32
TOLERANCES = {"max_abs_logits": None, "max_rel_logits": 2e-05, "min_sqnr_db": 80.0, "max_kl": 1e-07,
              "min_top1": 0.99, "min_greedy": 1.0, "tie_margin_rel": 0.0001, "max_ppl_rel_delta": 0.0001}


# -- format 1 shapes, as the targets write them today ----------------------------------------------


def executorch_io(with_kind: bool = True) -> dict:
    cache = {"kind": "mutable_buffers", "layout": "[1, max_seq_len, heads, dim]", "layers": 4, "heads": 2,
             "key_dim": 48, "value_dim": 48, "stored_value_dim": 48, "max_seq_len": 256, "dtype": "float32"}
    if not with_kind:
        del cache["kind"]
    return {
        "method": "forward",
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "T"]},
                   {"name": "input_pos", "dtype": "int64", "shape": [1], "meaning": "position of tokens[0, 0]"}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "T", 4096]}],
        "dynamic_dims": {"T": {"min": 1, "max": 256}},
        "max_seq_len": 256,
        "constraint": "input_pos + T <= max_seq_len",
        "kv_cache": cache,
    }


def onnx_io(value_dim: int = 48, model_value_dim: int = 48) -> dict:
    def tensor(name, length, dim):
        return {"name": name, "dtype": "float32", "shape": [1, 2, length, dim]}

    inputs = [{"name": "input_ids", "dtype": "int64", "shape": [1, "sequence_length"]},
              {"name": "attention_mask", "dtype": "int64", "shape": [1, "total_sequence_length"]},
              {"name": "position_ids", "dtype": "int64", "shape": [1, "sequence_length"]}]
    outputs = [{"name": "logits", "dtype": "float32", "shape": [1, "sequence_length", 4096]}]
    for i in range(4):
        inputs += [tensor(f"past_key_values.{i}.key", "past_sequence_length", 48),
                   tensor(f"past_key_values.{i}.value", "past_sequence_length", value_dim)]
        outputs += [tensor(f"present.{i}.key", "total_sequence_length", 48),
                    tensor(f"present.{i}.value", "total_sequence_length", value_dim)]
    return {
        "inputs": inputs,
        "outputs": outputs,
        "names": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                  "past_key": "past_key_values.%d.key", "past_value": "past_key_values.%d.value",
                  "logits": "logits", "present_key": "present.%d.key", "present_value": "present.%d.value"},
        "cache": {"form": "past_present", "layers": 4, "heads": 2, "key_dim": 48, "value_dim": value_dim,
                  "model_value_dim": model_value_dim, "dtype": "float32"},
        "vocab_size": 4096,
        "max_seq_len": 256,
    }


def coreml_io() -> dict:
    states = [{"name": f"kv_caches_{i}_{kv}_cache", "dtype": "float16", "shape": [1, 2, 256, 48]}
              for i in range(4) for kv in "kv"]
    return {
        "function": "main",
        "inputs": [{"name": "tokens", "dtype": "int32", "shape": [1, "T"]},
                   {"name": "input_pos", "dtype": "int32", "shape": [1], "meaning": "position of tokens[0, 0]"}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "T", 4096]}],
        "states": states,
        "dynamic_dims": {"T": {"min": 1, "max": 256, "kind": "RangeDim"}},
        "max_seq_len": 256,
        "vocab_size": 4096,
        "constraint": "input_pos + T <= max_seq_len",
        "kv_cache": {"form": "coreml_states", "layers": 4, "heads": 2, "key_dim": 48, "value_dim": 48,
                     "max_seq_len": 256, "dtype": "float16",
                     "names": {"key": "kv_caches_%d_k_cache", "value": "kv_caches_%d_v_cache"}},
    }


ARTIFACTS = {
    "executorch": lambda: {"target": "executorch", "files": ["model.pte"], "entry": "model.pte", "io": executorch_io(),
                           "metadata": {"backend": "xnnpack", "size_bytes": 11771264, "quantization": None,
                                        "delegates": {"XnnpackBackend": 19}}},
    "onnx": lambda: {"target": "onnx", "files": ["model.onnx", "genai_config.json"], "entry": "model.onnx",
                     "io": onnx_io(), "metadata": {"opset": 20, "precision": "fp32", "value_padding": 0}},
    "coreml": lambda: {"target": "coreml", "files": ["model.mlpackage"], "entry": "model.mlpackage",
                       "io": coreml_io(), "metadata": {"format": "mlprogram", "functions": ["main"]}},
}


def manifest_v1(*targets: str) -> dict:
    targets = targets or tuple(ARTIFACTS)
    return {
        "format": "cpm-mobile-bundle/1",
        "name": "minicpm-tiny-fp32",
        "created": "2026-12-06T17:47:20+00:00",
        "recipe": {"name": "fp32", "max_seq_len": 256, "targets": {t: {"precision": "fp32"} for t in targets}},
        "source": {"path": "/models/minicpm-tiny", "sha256": SHA, "family": "minicpm",
                   "dtypes_on_disk": ["bfloat16"], "weight_grid": None},
        "model": {"vocab_size": 4096, "max_seq_len": 256, "num_layers": 4, "bos_id": 1, "eos_ids": [2, 4],
                  "contract": "forward(tokens int64[1,T], input_pos int64[1]) -> logits float32[1,T,V]"},
        "tool": {"python": "3.11.7", "cpm-mobile": "0.1.0", "torch": "2.13.0+cpu", "coremltools": "not installed"},
        "artifacts": [ARTIFACTS[t]() for t in targets],
        "tokenizer": ["generation_config.json", "tokenizer.json", "tokenizer_config.json"],
        "files": {"model.pte": SHA, "tokenizer.json": SHA, "model.mlpackage/Manifest.json": SHA},
    }


def gate(against: str, **metrics) -> dict:
    return {"against": against,
            "metrics": {"max_abs_logits": 1.4e-05, "sqnr_db": 127.5, "greedy_flips": [], "top1": 1.0,
                        "greedy_steps": 192, "greedy_tokens": [64, 64, 64], **metrics},
            "tolerances": dict(TOLERANCES), "breaches": [], "passed": True}


def report_v1(*targets: str) -> dict:
    targets = targets or tuple(ARTIFACTS)
    return {
        "passed": True,
        "artifacts": {t: {"entry": ARTIFACTS[t]()["entry"], "verified": "verified", "precision": "fp32",
                          "quantization": None, "faithfulness": gate("eager fp32 model"),
                          "fidelity": gate("fp32 reference", ppl_rel_delta="nan", kl="inf"),
                          "breaches": [], "failed_gates": [], "passed": True} for t in targets},
        "reference": {"runtime": "PyTorch eager", "greedy_samples": [{"prompt": "The", "continuation": " end"}],
                      "host": "Linux"},
        "plan": {"prompts": 1, "max_new_tokens": 64, "stop_ids": [2, 4], "heldout_windows": 16,
                 "heldout_tokens": 4096},
    }


def write_bundle(folder: Path, manifest=None, report=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if manifest is not None:
        (folder / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    if report is not None:
        (folder / "report.json").write_text(report if isinstance(report, str) else json.dumps(report))
    return folder


def one_line(exc: InputError) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


# -- the one cache vocabulary ----------------------------------------------------------------------


@pytest.mark.parametrize("target, io, kind", [
    ("executorch", executorch_io(), "mutable_buffers"),
    ("executorch", executorch_io(with_kind=False), "mutable_buffers"),
    ("onnx", onnx_io(), "past_present"),
    ("coreml", coreml_io(), "coreml_states"),
])
def test_normalise_io_gives_one_vocabulary(target, io, kind):
    before = copy.deepcopy(io)
    normal = normalise_io(target, io)
    assert io == before  # the input is not modified
    assert "kv_cache" not in normal and "form" not in normal["cache"] and "model_value_dim" not in normal["cache"]
    assert normal["cache"]["kind"] == kind
    assert normal["cache"]["max_seq_len"] == 256
    assert normalise_io(target, normal) == normal  # idempotent
    contract_ = IOContract.model_validate(normal)
    assert isinstance(contract_.cache, CacheContract) and contract_.cache.kind == kind
    assert contract_.cache.stored_value_width == 48
    # Everything but the cache is kept as the target wrote it.
    assert {k: v for k, v in normal.items() if k != "cache"} == \
        {k: v for k, v in io.items() if k not in ("cache", "kv_cache")}


def test_onnx_padded_values_become_stored_value_dim():
    cache = normalise_io("onnx", onnx_io(value_dim=48, model_value_dim=32))["cache"]
    assert cache["value_dim"] == 32 and cache["stored_value_dim"] == 48  # as ExecuTorch says it
    assert CacheContract.model_validate(cache).stored_value_width == 48


def test_normalise_io_refuses_an_ambiguous_cache():
    io = executorch_io()
    io["cache"] = io["kv_cache"]
    with pytest.raises(ValueError, match="both"):
        normalise_io("executorch", io)
    io = onnx_io()
    io["cache"]["kind"] = "mutable_buffers"
    with pytest.raises(ValueError, match="kind 'mutable_buffers' and form 'past_present'"):
        normalise_io("onnx", io)


def test_io_contract_requires_a_typed_cache_and_allows_target_detail():
    io = normalise_io("onnx", onnx_io())
    io["genai_detail"] = {"x": 1}
    assert IOContract.model_validate(io).model_dump()["genai_detail"] == {"x": 1}
    del io["cache"]
    with pytest.raises(ValueError, match="cache"):
        IOContract.model_validate(io)
    with pytest.raises(ValueError, match="normalise_io"):
        IOContract.model_validate(coreml_io())  # format 1 words need normalise_io


# -- manifest round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", list(ARTIFACTS))
def test_format_1_manifest_round_trips_per_target(tmp_path, target):
    old = manifest_v1(target)
    manifest = read_manifest(write_bundle(tmp_path / "b", old))
    assert manifest.format_version == FORMAT_VERSION and manifest.upgraded_from == 1
    assert manifest.targets == [target]
    artifact = manifest.artifact(target)
    assert isinstance(artifact, ArtifactEntry)
    assert artifact.io.cache.kind == contract.TARGET_CACHE_KINDS[target]
    dumped = manifest.dump()
    assert dumped["format_version"] == FORMAT_VERSION and dumped["format"] == f"cpm-mobile-bundle/{FORMAT_VERSION}"
    # Nothing but the format and the io's cache wording changes.
    for key in old:
        if key not in ("format", "artifacts"):
            assert dumped[key] == old[key], key
    (new_artifact,), (old_artifact,) = dumped["artifacts"], old["artifacts"]
    assert new_artifact["io"] == normalise_io(target, old_artifact["io"])
    assert {k: v for k, v in new_artifact.items() if k != "io"} == {k: v for k, v in old_artifact.items() if k != "io"}
    # A written format 2 manifest reads back the same, no longer an upgrade.
    again = read_manifest(write_bundle(tmp_path / "again", json.loads(json.dumps(dumped))))
    assert again.upgraded_from is None and again.dump() == dumped


def test_manifest_with_all_three_targets(tmp_path):
    manifest = Manifest.model_validate(manifest_v1())
    assert manifest.targets == ["executorch", "onnx", "coreml"]
    assert manifest.artifact("onnx").io.names["past_key"] == "past_key_values.%d.key"
    assert manifest.artifact("coreml").io.cache.names == {"key": "kv_caches_%d_k_cache",
                                                           "value": "kv_caches_%d_v_cache"}
    assert manifest.artifact("executorch").io.method == "forward"
    # Optional fields a target does not use stay out of the JSON rather than appearing as null.
    dumped = manifest.dump()["artifacts"]
    assert "function" not in dumped[0]["io"] and "method" not in dumped[2]["io"]
    assert "layout" not in dumped[1]["io"]["cache"] and "meaning" not in dumped[1]["io"]["inputs"][0]
    # ... while meaningful nulls stay.
    assert manifest.dump()["source"]["weight_grid"] is None
    assert dumped[0]["metadata"]["quantization"] is None
    with pytest.raises(KeyError, match="no tflite artifact"):
        manifest.artifact("tflite")


def test_manifest_refuses_a_repeated_target_and_a_stray_entry():
    data = manifest_v1("onnx", "onnx")
    with pytest.raises(ValueError, match="more than one artifact for target onnx"):
        Manifest.model_validate(data)
    data = manifest_v1("onnx")
    data["artifacts"][0]["entry"] = "other.onnx"
    with pytest.raises(ValueError, match="entry 'other.onnx' is not one of its files"):
        Manifest.model_validate(data)


# -- refusals, each one line naming the file -------------------------------------------------------


def test_newer_format_is_refused_in_one_line(tmp_path):
    data = Manifest.model_validate(manifest_v1("onnx")).dump()
    data["format_version"] = FORMAT_VERSION + 1
    data["format"] = f"cpm-mobile-bundle/{FORMAT_VERSION + 1}"
    data["artifacts"][0]["io"]["cache"]["kind"] = "something_new"  # a newer format may say anything
    bundle = write_bundle(tmp_path / "b", data, {**report_v1("onnx"), "format_version": FORMAT_VERSION + 1})
    with pytest.raises(InputError) as caught:
        read_manifest(bundle)
    assert caught.value.path == bundle / "manifest.json"
    assert caught.value.problem == (f"bundle format {FORMAT_VERSION + 1} is newer than this cpm-mobile reads "
                                    f"({FORMAT_VERSION}); upgrade cpm-mobile")
    one_line(caught.value)
    with pytest.raises(InputError, match="is newer than this cpm-mobile reads"):
        read_report(bundle)


def test_missing_folder_and_files_are_refused(tmp_path):
    with pytest.raises(InputError) as caught:
        read_manifest(tmp_path / "nowhere")
    assert caught.value.path == tmp_path / "nowhere" and caught.value.problem == "no such bundle folder"
    bundle = write_bundle(tmp_path / "empty")
    with pytest.raises(InputError) as caught:
        read_manifest(bundle)
    assert caught.value.path == bundle / "manifest.json"
    assert caught.value.problem == "manifest.json not found: not a cpm-mobile bundle"
    with pytest.raises(InputError) as caught:
        read_report(bundle)
    assert caught.value.path == bundle / "report.json"


@pytest.mark.parametrize("text, problem", [
    ('{"format": "cpm-mobile-bundle/1", ', "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_broken_json_is_refused_naming_the_file(tmp_path, text, problem):
    bundle = tmp_path / "b"
    bundle.mkdir()
    path = bundle / "manifest.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError) as caught:
        read_manifest(bundle)
    assert caught.value.path == path and caught.value.problem.startswith(problem)
    assert str(path) in one_line(caught.value)


def test_wrong_cache_kind_is_refused_naming_the_field(tmp_path):
    data = Manifest.model_validate(manifest_v1()).dump()
    data["artifacts"][1]["io"]["cache"]["kind"] = "paged"
    with pytest.raises(InputError) as caught:
        read_manifest(write_bundle(tmp_path / "b", data))
    problem = one_line(caught.value).split(": ", 1)[1]
    assert problem.startswith("artifacts.1.io.cache.kind: ")
    assert "'paged'" in problem and "past_present" in problem


@pytest.mark.parametrize("edit, where", [
    (lambda m: m["source"].pop("sha256"), "source.sha256: Field required"),
    (lambda m: m["source"].update(sha256="nope"), "source.sha256: "),
    (lambda m: m.update(files={"model.pte": "short"}), "files: model.pte: not a sha256"),
    (lambda m: m["model"].update(num_layers="four"), "model.num_layers: "),
    (lambda m: m["artifacts"][0]["io"]["kv_cache"].update(heads=0), "artifacts.0.io.cache.heads: "),
    (lambda m: m.update(format="something-else/1"), "format_version missing"),
    (lambda m: m.update(surprise=1), "surprise: unknown key"),
    (lambda m: m.update(format_version="2"), "format_version: Input should be a valid integer"),
    (lambda m: m.update(format_version=2, format="cpm-mobile-bundle/1"), "format 'cpm-mobile-bundle/1' disagrees"),
    (lambda m: m.update(tokenizer=5), "tokenizer: "),
    (lambda m: m["artifacts"][0]["io"]["inputs"][0].update(shape=[1.5]), "artifacts.0.io.inputs.0.shape.0: "),
])
def test_invalid_manifests_are_refused_in_one_line(tmp_path, edit, where):
    data = manifest_v1()
    edit(data)
    with pytest.raises(InputError) as caught:
        read_manifest(write_bundle(tmp_path / "b", data))
    assert caught.value.path == tmp_path / "b" / "manifest.json"
    assert one_line(caught.value).split(": ", 1)[1].startswith(where)


# -- report ----------------------------------------------------------------------------------------


def test_report_reads_and_round_trips_with_non_finite_metrics(tmp_path):
    old = report_v1()
    report = read_report(write_bundle(tmp_path / "b", report=old))
    assert report.format_version == FORMAT_VERSION and report.passed and report.bundle_breaches == []
    assert list(report.artifacts) == ["executorch", "onnx", "coreml"]
    fidelity = report.artifacts["onnx"].fidelity
    assert fidelity.metrics["ppl_rel_delta"] == "nan" and fidelity.tolerances["max_abs_logits"] is None
    dumped = report.dump()
    assert dumped == {**old, "format_version": FORMAT_VERSION, "bundle_breaches": []}
    json.dumps(dumped, allow_nan=False)  # strict JSON
    assert Report.model_validate(dumped).dump() == dumped


def test_report_keeps_non_finite_floats_as_strings_and_forward_fields():
    data = report_v1("coreml")
    data["artifacts"]["coreml"]["fidelity"]["metrics"]["kl"] = float("inf")
    data["artifacts"]["coreml"]["faithfulness"]["tolerances"]["min_sqnr_db"] = float("-inf")
    data["artifacts"]["coreml"]["tokenizer"] = {"passed": True}  # a gate a later version adds
    data["bundle_breaches"] = ["genai_config.json: sha256 differs from manifest.json"]
    dumped = Report.model_validate(data).dump()
    coreml = dumped["artifacts"]["coreml"]
    assert coreml["fidelity"]["metrics"]["kl"] == "inf"
    assert coreml["faithfulness"]["tolerances"]["min_sqnr_db"] == "-inf"
    assert coreml["tokenizer"] == {"passed": True}
    assert dumped["bundle_breaches"] == data["bundle_breaches"]
    json.dumps(dumped, allow_nan=False)


def test_invalid_report_names_the_field(tmp_path):
    data = report_v1()
    del data["artifacts"]["onnx"]["fidelity"]["passed"]
    with pytest.raises(InputError) as caught:
        read_report(write_bundle(tmp_path / "b", report=data))
    assert caught.value.path == tmp_path / "b" / "report.json"
    assert caught.value.problem == "artifacts.onnx.fidelity.passed: Field required"


# -- what it imports, and its schema ---------------------------------------------------------------


def test_contract_imports_neither_torch_nor_numpy():
    code = ("import sys; import cpm_mobile.exporter.contract; "
            "print(sorted(m for m in ('torch', 'numpy', 'onnx', 'coremltools') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_manifest_json_schema():
    schema = manifest_json_schema()
    assert MANIFEST_SCHEMA_FILE == "manifest.schema.json"
    assert schema["$id"] and "manifest" in schema["title"]
    assert {"format_version", "name", "created", "recipe", "source", "model", "tool", "artifacts", "tokenizer",
            "files"} <= set(schema["required"])
    json.dumps(schema)
    import jsonschema  # a test dependency (pyproject [test]): the schema is checked by a real validator
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    dumped = Manifest.model_validate(manifest_v1()).dump()
    validator.validate(dumped)
    bad = copy.deepcopy(dumped)
    bad["artifacts"][0]["io"]["cache"]["kind"] = "paged"
    assert not validator.is_valid(bad)
    assert not validator.is_valid({k: v for k, v in dumped.items() if k != "format_version"})
