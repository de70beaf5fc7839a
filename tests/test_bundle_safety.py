"""No lost bundles, no leftovers, no chatter: what `export` does to the folder it writes into.

One real export (the tiny synthetic checkpoint, every target, in a subprocess so its stderr is
the user's) serves as the existing bundle the other tests try to overwrite.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cpm_mobile.cli import app
from cpm_mobile.exporter.bundle import remove_dead_work_folders
from bench.synthetic import write_synthetic_checkpoint
from cpm_mobile.recipes import load_recipe
from tests.conftest import TINY_GQA, TOKENIZER_TEXT, with_tokenizer

pytestmark = pytest.mark.slow  # whole exports (the fast inner loop, -m "not slow", leaves them out)

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def fast_recipe(folder: Path) -> Path:
    """The built-in fp32 recipe with a short check, so each export takes seconds."""
    data = load_recipe("fp32").model_dump(mode="json")
    data["max_seq_len"] = 64
    data["check"].update(prompts=data["check"]["prompts"][:1], max_new_tokens=8, heldout_windows=1, heldout_tokens=32)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tree(folder: Path) -> dict[str, tuple[str, int]]:
    """Every entry under folder: sha256 (files) and permission bits; what byte-identical means here."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        entries[path.relative_to(folder).as_posix()] = (digest, path.stat().st_mode & 0o777)
    return entries


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    work = tmp_path_factory.mktemp("safety")
    checkpoint = with_tokenizer(write_synthetic_checkpoint(work / "tiny-gqa", "minicpm4-0.5b", vocab_size=400,
                                                           **TINY_GQA), tokenizer_dir)
    heldout = work / "heldout.txt"
    heldout.write_text(TOKENIZER_TEXT)
    return {"work": work, "checkpoint": checkpoint, "heldout": heldout, "recipe": fast_recipe(work)}


def export_command(setup, out: Path, *extra: str, target: str = "onnx") -> list[str]:
    return [sys.executable, "-m", "cli", "export", "--model", str(setup["checkpoint"]), "--target", target,
            "--recipe", str(setup["recipe"]), "--out", str(out), "--name", "b", "--heldout", str(setup["heldout"]),
            *extra]


def export_args(setup, out: Path, *extra: str, target: str = "onnx") -> list[str]:
    return export_command(setup, out, *extra, target=target)[3:]


@pytest.fixture(scope="module")
def first_export(setup):
    """Every target, as a user runs it: a subprocess whose stderr is a pipe (not a terminal)."""
    out = setup["work"] / "out"
    done = subprocess.run(export_command(setup, out, target="all"), capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "80"}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "b", done


def test_success_prints_no_library_warning(first_export):
    bundle, done = first_export
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    # What remains on stderr is our own progress display's last frame, nothing else.
    assert len(lines) == 1 and "done" in lines[0], done.stderr
    assert "bundle: " in done.stdout and "Warning" not in done.stdout and "WARNING" not in done.stdout
    assert "…" not in done.stdout, done.stdout  # without a terminal the table is as wide as its numbers need


def test_bundle_has_normal_permissions_and_no_build_byproducts(first_export):
    bundle, _ = first_export
    mask = os.umask(0o022)
    os.umask(mask)
    assert bundle.stat().st_mode & 0o777 == 0o777 & ~mask
    for name in ("manifest.json", "report.json"):
        assert (bundle / name).stat().st_mode & 0o777 == 0o666 & ~mask
    assert not list(bundle.rglob("executorch_debug_handle_mapping.json"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert not [f for f in manifest["files"] if "debug_handle" in f]
    assert [p.name for p in bundle.parent.iterdir()] == ["b"]


def test_existing_bundle_is_refused_before_work_and_left_byte_identical(setup, first_export):
    bundle, _ = first_export
    before = tree(bundle.parent)
    started = time.monotonic()
    result = runner.invoke(app, export_args(setup, bundle.parent))
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and str(bundle) in result.stderr and "--force" in result.stderr
    assert time.monotonic() - started < 10  # refused before loading or exporting anything
    assert tree(bundle.parent) == before


def test_force_keeps_the_old_bundle_until_the_new_one_is_complete(setup, first_export, tmp_path):
    """--force, then SIGTERM mid-export: the old bundle is untouched and nothing else is left."""
    out = tmp_path / "out"
    shutil.copytree(first_export[0], out / "b")
    before = tree(out)
    _interrupt_midway(export_command(setup, out, "--force"), out, signal.SIGTERM)
    assert tree(out) == before


def test_force_replaces_the_bundle_once_complete_and_a_killed_exports_staging_goes(setup, first_export, tmp_path):
    """SIGKILL cannot be caught: its staging stays, and the next export into the folder removes it."""
    out = tmp_path / "out"
    shutil.copytree(first_export[0], out / "b")
    old_manifest = json.loads((out / "b" / "manifest.json").read_text())
    process = subprocess.Popen(export_command(setup, out, "--force"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(out.iterdir())) < 2:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert any(p.name.startswith(".b.partial-") for p in out.iterdir())
    result = runner.invoke(app, export_args(setup, out, "--force"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "b" / "manifest.json").read_text())
    assert sorted(a["target"] for a in old_manifest["artifacts"]) == ["coreml", "executorch", "onnx"]
    assert [a["target"] for a in manifest["artifacts"]] == ["onnx"]  # the new one-target bundle, whole
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # no retired, staging or killed export's folder left


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_export_leaves_no_staging_folder(setup, tmp_path, signum):
    out = tmp_path / "out"
    code = _interrupt_midway(export_command(setup, out), out, signum)
    assert code != 0
    assert list(out.iterdir()) == []


def _interrupt_midway(command: list[str], out: Path, signum: int) -> int:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 180
    staging = []
    while time.monotonic() < deadline and not staging:
        staging = [p for p in out.iterdir() if p.name.startswith(".b.partial-")] if out.is_dir() else []
        time.sleep(0.05)
    assert staging, "the export never started"
    time.sleep(1.0)  # inside the export proper
    assert process.poll() is None, "the export finished before it could be interrupted"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert not staging[0].exists(), stderr.decode()[-2000:]
    assert "Traceback" not in stderr.decode()
    return process.returncode


def test_dead_exports_leftovers_are_removed_and_live_ones_kept(tmp_path):
    final = tmp_path / "b"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        dead_staging = tmp_path / f".b.partial-{dead.pid}-abc123"
        dead_retired = tmp_path / f".b.old-{dead.pid}-def456"
        live_staging = tmp_path / f".b.partial-{live.pid}-ghi789"  # a concurrent export's: must survive
        reused = tmp_path / f".b.partial-{live.pid}-jkl012"  # last written before that process started
        other_name = tmp_path / f".c.partial-{dead.pid}-mno345"  # another bundle's: not ours to judge
        unowned = tmp_path / ".b.partial-qidqofg8"  # an older cpm-mobile's, no owner in the name: ignored
        for folder in (dead_staging, dead_retired, live_staging, reused, other_name, unowned):
            folder.mkdir()
            (folder / "model.onnx").write_bytes(b"partial")
        an_hour_ago = time.time() - 3600
        os.utime(reused, (an_hour_ago, an_hour_ago))
        removed = remove_dead_work_folders(final)
        assert sorted(removed) == sorted([dead_staging, dead_retired, reused])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live_staging, other_name, unowned))
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("case", ["proc", "under_a_file", "out_is_a_file", "name_is_a_file", "not_a_bundle"])
def test_bad_destination_exits_2_in_one_line_before_work(setup, tmp_path, case):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    out, name = tmp_path / "out", "b"
    if case == "proc":
        out = Path("/proc/cpm-mobile-test/out")
    elif case == "under_a_file":
        out = a_file / "out"
    elif case == "out_is_a_file":
        out = a_file
    elif case == "name_is_a_file":
        out.mkdir()
        (out / "b").write_text("not a folder")
    elif case == "not_a_bundle":
        (out / "b").mkdir(parents=True)
        (out / "b" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    args = export_args(setup, out)
    args[args.index("--name") + 1] = name
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert str(out) in result.stderr
    assert result.stdout == ""
    assert tree(tmp_path) == before


def test_not_a_bundle_is_refused_even_with_force(setup, tmp_path):
    (tmp_path / "out" / "b").mkdir(parents=True)
    (tmp_path / "out" / "b" / "notes.txt").write_text("mine")
    result = runner.invoke(app, export_args(setup, tmp_path / "out", "--force"))
    assert result.exit_code == 2 and "not a cpm-mobile bundle" in result.stderr
    assert (tmp_path / "out" / "b" / "notes.txt").read_text() == "mine"


def test_unwritable_junit_and_report_exit_2_before_work(setup, first_export, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    result = runner.invoke(app, export_args(setup, tmp_path / "out", "--junit", str(a_file / "check.xml")))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and str(a_file) in result.stderr
    assert not (tmp_path / "out").exists()
    bundle = first_export[0]
    for option, destination in (("--report", a_file / "r.json"), ("--junit", tmp_path),
                                ("--report", Path("/proc/cpm-mobile-test.json"))):
        started = time.monotonic()
        result = runner.invoke(app, ["check", str(bundle), "--target", "onnx", option, str(destination),
                                     "--heldout", str(setup["heldout"])])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("case", ["under_a_file", "foreign_folder"])
def test_sparsity_refuses_a_bad_out_before_profiling(tmp_path, case):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    out = a_file / "s" if case == "under_a_file" else tmp_path / "mine"
    if case == "foreign_folder":  # replacing --out as a whole would delete this
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    before = tree(tmp_path)
    result = runner.invoke(app, ["sparsity", "--out", str(out), "--max-tokens", "64"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert tree(tmp_path) == before
