"""The export command end to end: bundle contents, atomicity, exit codes, re-check, tamper detection."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cpm_mobile.cli import app
from cpm_mobile.exporter.bundle import sha256_file
from bench.synthetic import write_synthetic_checkpoint
from cpm_mobile.recipes import load_recipe
from tests.conftest import TINY_GQA, TOKENIZER_TEXT, with_tokenizer

pytestmark = pytest.mark.slow  # whole exports (the fast inner loop, -m "not slow", leaves them out)

runner = CliRunner()


def _fast_recipe(tmp_path: Path, **changes) -> Path:
    """The built-in fp32 recipe with a shorter check, so the test stays quick."""
    data = load_recipe("fp32").model_dump(mode="json")
    data["max_seq_len"] = 64
    data["check"].update(max_new_tokens=16, heldout_windows=1, heldout_tokens=48)
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text(TOKENIZER_TEXT)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    folder = write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gqa", "minicpm4-0.5b",
                                        vocab_size=400, **TINY_GQA)
    return with_tokenizer(folder, tokenizer_dir)


@pytest.fixture(scope="module")
def bundle(checkpoint, heldout, tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--target", "onnx",
                                 "--recipe", str(_fast_recipe(work)), "--out", str(work / "out"), "--name", "b",
                                 "--heldout", str(heldout), "--verbose"])
    assert result.exit_code == 0, result.output
    (work / "export.log").write_text(result.output)  # for the --verbose test below
    return work / "out" / "b"


def test_bundle_holds_artifact_tokenizer_manifest_report(bundle):
    names = {p.name for p in bundle.iterdir()}
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
            "manifest.json", "report.json"} <= names
    manifest = json.loads((bundle / "manifest.json").read_text())
    hashed = set(manifest["files"])
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert hashed == on_disk
    for relative, digest in manifest["files"].items():
        assert sha256_file(bundle / relative) == digest
    assert manifest["tool"]["torch"].startswith("2.13.0") and manifest["tool"]["onnxruntime"]
    assert [a["target"] for a in manifest["artifacts"]] == ["onnx"]
    assert manifest["artifacts"][0]["io"]  # the I/O contract travels with the bundle
    report = json.loads((bundle / "report.json").read_text())
    entry = report["artifacts"]["onnx"]
    assert report["passed"] and entry["passed"]
    for gate in ("faithfulness", "fidelity"):
        assert entry[gate]["passed"] and entry[gate]["metrics"]["max_abs_logits"] <= 1e-4
        assert entry[gate]["metrics"]["greedy"] == 1.0
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_manifest_and_verbose_state_where_the_export_time_went(bundle):
    cost = json.loads((bundle / "manifest.json").read_text())["export_cost"]
    stages = {entry["stage"]: entry["seconds"] for entry in cost["stages"]}
    assert {"load checkpoint", "onnx: exporting graph (torch.export + dynamo)", "check: PyTorch reference",
            "check: onnx", "check: the apps' tokenizers"} <= set(stages), list(stages)
    assert all(seconds >= 0 for seconds in stages.values())
    assert 0.8 * cost["seconds"] <= sum(stages.values()) <= cost["seconds"]  # the stages cover the export
    assert stages["onnx: exporting graph (torch.export + dynamo)"] > 0.1
    assert 200 < cost["peak_rss_mib"] < 8000
    assert [e["peak_rss_mib"] for e in cost["stages"]] == sorted(e["peak_rss_mib"] for e in cost["stages"])
    assert cost["stages"][-1]["peak_rss_mib"] <= cost["peak_rss_mib"]
    log = (bundle.parents[1] / "export.log").read_text()
    # Stages under 0.05 s are left out of the printout (check: onnx takes ~0.1 s on this tiny model).
    assert "% " in log and "onnx: exporting graph" in log and "peak resident memory" in log


def test_stage_clock_sums_repeated_stages_and_forwards_progress(monkeypatch):
    from cpm_mobile.exporter import export_cost

    now = iter([0.0, 1.0, 3.0, 4.0, 10.5])
    monkeypatch.setattr(export_cost.time, "perf_counter", lambda: next(now))
    peaks = iter([100.0, 250.0, 250.0])
    monkeypatch.setattr(export_cost, "_peak_mib", lambda: next(peaks))
    seen = []
    clock = export_cost.StageClock(lambda description, fraction=None: seen.append(description))  # starts at 0
    clock("calibrate: gptq layer 1/2", 0.0)  # 1.0
    clock("calibrate: gptq layer 2/2", 0.5)  # same stage
    clock("lower", None)  # 3.0: calibrate took 2
    clock("lower", 0.5)
    clock("done", 1.0)  # 4.0: lower took 1
    cost = clock.cost()  # 10.5: the total
    assert [e["stage"] for e in cost["stages"]] == ["calibrate: gptq layer", "lower"]
    assert [e["seconds"] for e in cost["stages"]] == [2.0, 1.0]
    assert [e["peak_rss_mib"] for e in cost["stages"]] == [100.0, 250.0] and cost["peak_rss_mib"] == 250.0
    assert cost["seconds"] == 10.5
    assert seen == ["calibrate: gptq layer 1/2", "calibrate: gptq layer 2/2", "lower", "lower", "done"]


def test_check_passes_again_and_writes_junit(bundle, heldout, tmp_path):
    junit = tmp_path / "check.xml"
    result = runner.invoke(app, ["check", str(bundle), "--junit", str(junit), "--heldout", str(heldout)])
    assert result.exit_code == 0, result.output
    xml = junit.read_text()
    assert 'tests="3"' in xml and 'failures="0"' in xml  # one case per gate: faithfulness, fidelity, tokenizer
    assert 'name="tokenizer:model.onnx"' in xml


def test_flipped_weight_bytes_fail_the_check_with_exit_1(bundle, heldout, tmp_path):
    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(bundle, tampered)
    onnx_file = tampered / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0x40 for b in data[middle : middle + 4096])
    onnx_file.write_bytes(bytes(data))
    report_path = tmp_path / "report.json"
    result = runner.invoke(app, ["check", str(tampered), "--report", str(report_path), "--heldout", str(heldout)])
    assert result.exit_code == 1, result.output
    breaches = json.loads(report_path.read_text())["artifacts"]["onnx"]["breaches"]
    assert any("sha256 differs" in b for b in breaches)
    assert any(b.startswith(("faithfulness: max_rel_logits", "faithfulness: sqnr_db", "faithfulness: kl"))
               for b in breaches), breaches


def test_missing_file_exits_2_naming_it(bundle, heldout, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "tokenizer.json").unlink()
    result = runner.invoke(app, ["check", str(broken), "--heldout", str(heldout)])
    assert result.exit_code == 2
    assert str(broken / "tokenizer.json") in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.output


def test_not_a_bundle_exits_2(tmp_path):
    result = runner.invoke(app, ["check", str(tmp_path)])
    assert result.exit_code == 2 and "manifest.json not found" in result.stderr


def test_tolerance_breach_exits_1_and_publishes_only_a_rejected_folder(checkpoint, heldout, tmp_path):
    recipe = load_recipe("fp32").model_dump(mode="json")
    recipe["targets"]["onnx"]["fidelity"]["min_sqnr_db"] = 1000.0  # above the metric's ceiling: cannot pass
    recipe_path = _fast_recipe(tmp_path, targets={"onnx": recipe["targets"]["onnx"]})
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--target", "onnx",
                                 "--recipe", str(recipe_path), "--out", str(tmp_path / "out"), "--name", "b",
                                 "--heldout", str(heldout)])
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "out" / "b").exists()
    rejected = tmp_path / "out" / "b.rejected"
    assert json.loads((rejected / "report.json").read_text())["passed"] is False


def test_bad_recipe_exits_2_naming_the_file(checkpoint, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**load_recipe("fp32").model_dump(mode="json"), "max_sq_len": 64}))
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--recipe", str(path), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert str(path) in result.stderr and "max_sq_len" in result.stderr


def test_checkpoint_without_tokenizer_exits_2(tmp_path):
    folder = write_synthetic_checkpoint(tmp_path / "m", "minicpm4-0.5b", vocab_size=400, **TINY_GQA)
    result = runner.invoke(app, ["export", "--model", str(folder), "--target", "onnx", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "tokenizer.json not found" in result.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_sigint_during_export_leaves_nothing_behind(checkpoint, heldout, tmp_path):
    out = tmp_path / "out"
    # A longer check than the other tests' keeps the export busy for seconds after its artifact is written.
    recipe = _fast_recipe(tmp_path, max_seq_len=256)
    data = yaml.safe_load(recipe.read_text())
    data["check"].update(max_new_tokens=96, heldout_windows=4, heldout_tokens=192)
    recipe.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "cli", "export", "--model", str(checkpoint), "--target", "onnx",
               "--recipe", str(recipe), "--out", str(out), "--name", "b", "--heldout", str(heldout)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])

    def staged_files() -> list[Path]:
        try:  # the folder may be renamed or removed while it is listed
            staging = [p for p in out.iterdir() if p.name.startswith(".b.partial-")] if out.exists() else []
            return [f for folder in staging for f in folder.rglob("*") if f.is_file()]
        except OSError:
            return []

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None and not staged_files():
        time.sleep(0.02)
    assert process.poll() is None and staged_files(), "the export never wrote into its staging folder"
    process.send_signal(signal.SIGINT)  # mid-export: the artifact is being written or checked
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0, stderr.decode()[-2000:]
    assert list(out.iterdir()) == [], (list(out.iterdir()), stderr.decode()[-2000:])


def test_published_files_get_the_users_default_modes(tmp_path):
    from cpm_mobile.exporter.bundle import publish, staging_folder
    final = tmp_path / "b"
    mask = os.umask(0o022)
    try:
        with staging_folder(final) as staging:
            (staging / "pkg").mkdir(mode=0o700)
            for name in ("grid.safetensors", "pkg/weights.bin"):  # as safetensors and mkstemp leave them
                (staging / name).write_bytes(b"x")
                os.chmod(staging / name, 0o600)
            publish(staging, final)
    finally:
        os.umask(mask)
    assert {p.relative_to(final).as_posix(): p.stat().st_mode & 0o777 for p in final.rglob("*")} == {
        "pkg": 0o755, "grid.safetensors": 0o644, "pkg/weights.bin": 0o644}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed interrupt itself
def test_an_interrupt_a_finaliser_swallowed_still_stops_the_bundle(tmp_path):
    """Python raises a signal's exception in whatever runs next; in a weakref callback or __del__ it is printed
    and dropped (torch.export runs many). The export must still stop, and publish nothing."""
    import gc
    import weakref

    from cpm_mobile.exporter.bundle import interruptible, publish, staging_folder

    class Cached:
        pass

    final = tmp_path / "b"
    stages = []
    progress = interruptible(lambda description, fraction=None: stages.append(description))
    with pytest.raises(KeyboardInterrupt):
        with staging_folder(final) as staging:
            (staging / "model.onnx").write_bytes(b"x")
            entry = Cached()
            signalled = weakref.ref(entry, lambda _: os.kill(os.getpid(), signal.SIGINT))  # the interrupt lands in it
            del entry
            gc.collect()
            assert signalled() is None
            progress("next stage")
            publish(staging, final)
    assert stages == [] and list(tmp_path.iterdir()) == []


def test_signals_during_publish_are_held_until_the_bundle_is_in_place(tmp_path):
    from cpm_mobile.exporter.bundle import publish, staging_folder
    final = tmp_path / "b"
    final.mkdir()
    (final / "old.txt").write_text("old")
    pool = threading.Thread(target=time.sleep, args=(1.0,))  # another thread, as onnxruntime's pools are
    pool.start()
    renames = []
    real_replace = os.replace

    def replace_then_interrupt(source, destination):
        renames.append(Path(destination).name)
        real_replace(source, destination)
        if len(renames) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # between the old bundle's retirement and the new one's rename

    with pytest.raises(KeyboardInterrupt):
        with staging_folder(final) as staging:
            (staging / "new.txt").write_text("new")
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(os, "replace", replace_then_interrupt)
                publish(staging, final)
    pool.join()
    assert len(renames) == 2 and (final / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_all_targets_in_one_bundle_then_check_again(checkpoint, heldout, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--target", "all",
                                 "--recipe", str(_fast_recipe(tmp_path)), "--out", str(out), "--name", "all",
                                 "--heldout", str(heldout)])
    assert result.exit_code == 0, result.output
    bundle = out / "all"
    assert {"model.pte", "model.onnx", "model.mlpackage", "genai_config.json"} <= {p.name for p in bundle.iterdir()}
    report = json.loads((bundle / "report.json").read_text())
    assert set(report["artifacts"]) == {"executorch", "onnx", "coreml"}
    verified = {t: e["verified"] for t, e in report["artifacts"].items()}
    assert verified["coreml"].startswith(("ML Program semantics verified", "Core ML runtime verified"))
    assert verified["executorch"].startswith("ExecuTorch runtime verified")
    for target in ("executorch", "onnx"):
        assert report["artifacts"][target]["fidelity"]["metrics"]["max_abs_logits"] <= 1e-4
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert any(name.startswith("model.mlpackage/") for name in manifest["files"])  # package contents hashed
    again = runner.invoke(app, ["check", str(bundle), "--target", "coreml", "--heldout", str(heldout)])
    assert again.exit_code == 0, again.output
