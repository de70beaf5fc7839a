"""Console tables never cut a number or a name: not in a log (stdout a pipe or a file, where rich assumes
80 columns), not at COLUMNS=60, and not in a narrow terminal (there only the labels may fold)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from cpm_mobile import cli
from cpm_mobile.cli import app

pytestmark = pytest.mark.slow  # whole exports (the fast inner loop, -m "not slow", leaves them out)

runner = CliRunner()
GATES = ("faithfulness", "fidelity")


def _metrics(**values) -> dict:
    metrics = dict(max_rel_logits=7.7e-3, sqnr_db=29.4, kl=1.04e-4, top1=0.956, greedy=0.989, greedy_ties=7,
                   ppl=45.1, ppl_rel_delta=1.6e-3)
    return {**metrics, **values}


# The case: an int4 export of a 30-layer model whose check fails, on three targets.
FAILING = {
    "artifacts": {
        target: {
            "faithfulness": {"metrics": _metrics(sqnr_db=float("inf") if target == "coreml" else 29.4), "passed": False},
            "fidelity": {"metrics": _metrics(max_rel_logits=6.4e-1, sqnr_db=4.2, kl=7.5e-1, top1=0.670, greedy=0.726,
                                             greedy_ties=13, ppl_rel_delta=6.2e-1), "passed": False},
            "breaches": ["fidelity: kl = 0.75, required <= 0.01 [max_kl]"],
        }
        for target in ("executorch", "onnx", "coreml")
    },
    "plan": {"heldout_windows": 16, "heldout_tokens": 4096},
}


def shown(metrics: dict) -> list[str]:
    """One gate's metric cells, in the formats _print_report states (what report.json holds, so rounded)."""
    greedy = f"{metrics['greedy']:.3f}" + (f" ({metrics['greedy_ties']}t)" if metrics["greedy_ties"] else "")
    ppl = f"{metrics['ppl_rel_delta']:.1e}" if "ppl" in metrics else "-"
    return [f"{metrics['max_rel_logits']:.1e}", f"{metrics['sqnr_db']:.0f}", f"{metrics['kl']:.1e}",
            f"{metrics['top1']:.3f}", greedy, ppl]


def _words(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines()]


def assert_report_whole(output: str, report: dict) -> None:
    """Each target's two rows whole, on one line each: target, gate, every metric and the verdict."""
    assert "…" not in output, output
    lines = _words(output)
    for target, entry in report["artifacts"].items():
        rows = [" ".join([gate, *shown(entry[gate]["metrics"]), "pass" if entry[gate]["passed"] else "FAIL"])
                for gate in GATES]
        first = f"{target} {rows[0]}"
        assert first in lines, (first, output)
        assert lines[lines.index(first) + 1] == rows[1], (rows[1], output)


def _console(monkeypatch, name: str = "console", **options) -> io.StringIO:
    buffer = io.StringIO()
    monkeypatch.setattr(cli, name, Console(file=buffer, color_system=None, **options))
    return buffer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The embedded model exported to ONNX with the fp32 recipe (a shorter check plan: seconds, not a minute),
    stdout captured: not a terminal, 80 columns."""
    from cpm_mobile.recipes.schema import RECIPES_DIR

    out = tmp_path_factory.mktemp("export")
    recipe = yaml.safe_load((RECIPES_DIR / "fp32.yaml").read_text(encoding="utf-8"))
    recipe["check"].update(heldout_windows=4, max_new_tokens=16)
    (out / "fp32.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "console", Console(width=80, force_terminal=False, color_system=None))
        result = runner.invoke(app, ["export", "--target", "onnx", "--recipe", str(out / "fp32.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    bundle = out / "minicpm-tiny-fp32"
    return bundle, result.stdout


def test_export_prints_every_metric_whole(exported):
    bundle, stdout = exported
    report = json.loads((bundle / "report.json").read_text())
    assert report["artifacts"] and all(report["artifacts"][t][g]["metrics"] for t in report["artifacts"] for g in GATES)
    assert_report_whole(stdout, report)


def test_check_into_a_pipe_at_60_columns_prints_every_metric_whole(exported, tmp_path):
    """As CI runs it: a real process, stdout a pipe, COLUMNS=60."""
    bundle, _ = exported
    written = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "-m", "cpm_mobile.cli", "check", str(bundle), "--report", str(written)],
                            env={**os.environ, "COLUMNS": "60"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stderr
    assert_report_whole(result.stdout, json.loads(written.read_text()))


@pytest.mark.parametrize("width", [40, 60, 80])
def test_failing_check_in_a_narrow_log(monkeypatch, width):
    buffer = _console(monkeypatch, width=width, force_terminal=False)
    cli._print_report(FAILING)
    output = buffer.getvalue()
    assert_report_whole(output, FAILING)
    for target in FAILING["artifacts"]:  # the breach lines: one line each, brackets kept
        assert f"{target}: fidelity: kl = 0.75, required <= 0.01 [max_kl]" in output.splitlines()


@pytest.mark.parametrize("width", [40, 60, 76])
def test_a_narrow_terminal_folds_the_labels_never_the_numbers(monkeypatch, width):
    buffer = _console(monkeypatch, width=width, force_terminal=True)
    cli._print_report(FAILING)
    output = buffer.getvalue()
    assert "…" not in output
    lines = _words(output)
    for entry in FAILING["artifacts"].values():
        for gate in GATES:
            numbers = " ".join([*shown(entry[gate]["metrics"]), "FAIL"])
            assert any(line.endswith(numbers) for line in lines), (numbers, output)
    if width == 76:  # wide enough for the numbers: the labels fold so that the table fits the terminal
        assert max(len(line) for line in output.splitlines()) <= width
        assert "executorch" not in output.split("check:")[1].split("perplexity")[0]


@pytest.mark.parametrize("width", [40, 80])
def test_recipes_keep_names_and_targets_whole(monkeypatch, width):
    from cpm_mobile.recipes import load_recipe, recipe_names

    monkeypatch.setattr(cli, "console", Console(width=width, force_terminal=False, color_system=None))
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    lines = _words(result.stdout)
    words = result.stdout.split()
    for name in recipe_names():
        recipe = load_recipe(name)
        assert any(line.startswith(f"{name} {', '.join(recipe.targets)}") for line in lines), (name, result.stdout)
        lead = cli._first_sentence(recipe.description)
        assert lead.count("(") == lead.count(")")  # never half a parenthesis
        for word in lead.split():  # the description wraps between words only
            assert word in words, (word, result.stdout)
    if width == 80:
        assert max(len(line) for line in result.stdout.splitlines()) <= 80  # only the descriptions wrap to fit


@pytest.mark.parametrize("width", [40, 80])
def test_inspect_keeps_every_value_whole(monkeypatch, width):
    from cpm_mobile.exporter.defaults import DEFAULT_MODEL
    from cpm_mobile.exporter.inspect import summarize

    summary = summarize(DEFAULT_MODEL)
    monkeypatch.setattr(cli, "console", Console(width=width, force_terminal=False, color_system=None))
    result = runner.invoke(app, ["inspect"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    lines, words = _words(result.stdout), result.stdout.split()
    for field, value in summary.rows():
        assert any(line.startswith(field) for line in lines), (field, result.stdout)
        for word in value.split():
            assert word in words, (word, result.stdout)
    for row in summary.size_rows():
        assert " ".join(" ".join(row).split()) in lines, (row, result.stdout)


def test_generate_stats_are_one_whole_line(monkeypatch):
    buffer = _console(monkeypatch, "errors", width=30, force_terminal=False)
    timings = SimpleNamespace(prefill_tokens=123456, prefill_tokens_per_s=98765.4, decode_tokens=4321,
                              decode_tokens_per_s=1234.5)
    cli._print_speed(timings)
    line, = buffer.getvalue().splitlines()
    assert line.startswith("prefill 123456 tokens 98765 tok/s, decode 4321 tokens 1234 tok/s, peak memory ")


BENCH_ROWS = [
    {"model": "minicpm4-0.5b (synthetic)", "runtime": runtime, "recipe": recipe, "decode_tok_per_s": 1234.56,
     "decode_speedup": 12.345, "prefill_tok_per_s": 98765.4, "prefill_speedup": 0.987, "peak_rss_mb": 4321.0,
     "size_mb": 1234.5}
    for runtime, recipe in (("executorch", "int4-sparse"), ("llama.cpp", "Q4_0"), ("coreml", "coreml-palette4"))
]


@pytest.mark.parametrize("terminal", [False, True])
def test_bench_table_keeps_names_and_numbers_whole(monkeypatch, tmp_path, terminal):
    from bench import run

    buffer = io.StringIO()
    monkeypatch.setattr(run, "console", Console(file=buffer, width=60, force_terminal=terminal, color_system=None))
    monkeypatch.setattr(run, "_plot", lambda rows, path: None)
    run.write_outputs(BENCH_ROWS, {}, [{"model": "m", "runtime": "r", "recipe": "x", "reason": "a [long] reason " * 8}],
                      tmp_path)
    output = buffer.getvalue()
    assert "…" not in output
    lines = _words(output.replace("│", " ").replace("┃", " "))
    for r in BENCH_ROWS:
        numbers = (f"{r['decode_tok_per_s']:.1f} {r['decode_speedup']:.2f} {r['prefill_tok_per_s']:.0f} "
                   f"{r['prefill_speedup']:.2f} {r['peak_rss_mb']:.0f} {r['size_mb']:.1f}")
        if terminal:
            assert any(line.endswith(numbers) for line in lines), output
        else:
            assert f"{r['model']} {r['runtime']} {r['recipe']} {numbers}" in lines, output
    assert "not measured: m r x: " + ("a [long] reason " * 8).strip() in lines


def test_bench_quality_prints_whole_markdown_lines(monkeypatch, tmp_path):
    from bench import quality

    buffer = io.StringIO()
    monkeypatch.setattr(quality, "console", Console(file=buffer, width=40, force_terminal=False, color_system=None))
    monkeypatch.setattr(quality, "_plot", lambda rows, path: None)
    rows = [{"model": "minicpm-tiny", "recipe": "coreml-palette4", "runtime": "llama.cpp rounding (eager)",
             "size_mb": 1.234, "kl": 1.23e-4, "ppl_rel_delta": 0.0123, "top1": 0.987, "sqnr_db": 23.45,
             "faithfulness": "pass", "fidelity": "FAIL"}]
    quality.write_outputs(rows, tmp_path)
    assert buffer.getvalue().splitlines() == (tmp_path / "quality.md").read_text().splitlines()
