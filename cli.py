"""cpm-mobile: the command line. Thin: parse, call the library, print."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from exporter.errors import CpmMobileError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(width=max(Console().width, 120))
errors = Console(stderr=True)

ModelOption = typer.Option(None, "--model", "-m", help="Checkpoint folder (default: the embedded MiniCPM model).")


@app.callback()
def _root() -> None:
    """Export MiniCPM-family and BlockFFN checkpoints to ExecuTorch, ONNX and Core ML, checked against PyTorch."""


def _fail(error: CpmMobileError) -> None:
    errors.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(error.exit_code)


@app.command()
def inspect(
    path: Optional[Path] = typer.Argument(None, help="Checkpoint folder (default: the embedded MiniCPM model)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Family, attention, shapes, parameter count, dtype, tying, vocab and estimated artifact sizes."""
    from exporter.defaults import DEFAULT_MODEL
    from exporter.inspect import summarize

    try:
        summary = summarize(path or DEFAULT_MODEL)
    except CpmMobileError as error:
        _fail(error)
    if as_json:
        from dataclasses import asdict

        console.print_json(json.dumps(asdict(summary)))
        return
    table = Table(title="checkpoint", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for field, value in summary.rows():
        table.add_row(field, value)
    console.print(table)


HeldoutOption = typer.Option(None, "--heldout", help="Held-out text for perplexity (default: the embedded one).")
TARGET_CHOICES = ("executorch", "onnx", "coreml", "all")


def _target_list(target: str) -> list[str] | None:
    if target not in TARGET_CHOICES:
        raise typer.BadParameter(f"choose one of {', '.join(TARGET_CHOICES)}", param_hint="--target")
    return None if target == "all" else [target]


def _targets(recipe, target: str) -> list[str]:
    if target not in TARGET_CHOICES:
        raise typer.BadParameter(f"choose one of {', '.join(TARGET_CHOICES)}", param_hint="--target")
    return list(recipe.targets) if target == "all" else [target]


@contextmanager
def _progress_bar() -> Iterator[Callable[[str, float | None], None]]:
    """A rich progress line that library code drives through a plain callback."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=errors, transient=False) as bar:
        task = bar.add_task("starting", total=1.0)

        def update(description: str, fraction: float | None = None) -> None:
            bar.update(task, description=description, completed=fraction if fraction is not None else None)

        yield update


def _print_report(report: dict) -> None:
    """One row per artifact and gate: faithfulness (vs its twin) and fidelity (vs fp32)."""
    table = Table(title="check: faithfulness vs twin, fidelity vs fp32 reference")
    for column in ("target", "gate", "max rel", "SQNR", "KL", "top-1", "greedy", "ppl +/-", "result"):
        table.add_column(column, no_wrap=True)
    for target, entry in report["artifacts"].items():
        for gate in ("faithfulness", "fidelity"):
            m = entry[gate]["metrics"]
            label = target if gate == "faithfulness" else ""
            result = "[green]pass[/]" if entry[gate]["passed"] else "[red]FAIL[/]"
            if not m:
                table.add_row(label, gate, *["-"] * 6, result)
                continue
            ppl = f"{m['ppl_rel_delta']:.1e}" if "ppl" in m else "-"
            greedy = f"{m['greedy']:.3f}" + (f" ({m['greedy_ties']}t)" if m["greedy_ties"] else "")
            table.add_row(label, gate, f"{m['max_rel_logits']:.1e}", f"{m['sqnr_db']:.0f}", f"{m['kl']:.1e}",
                          f"{m['top1']:.3f}", greedy, ppl, result)
    console.print(table)
    plan = report.get("plan", {})
    if plan.get("heldout_windows"):
        console.print(f"perplexity scored on {plan['heldout_tokens'] - plan['heldout_windows']} held-out tokens "
                      f"({plan['heldout_windows']} windows)")
    for target, entry in report["artifacts"].items():
        for breach in entry["breaches"]:
            console.print(f"[red]{target}[/]: {breach}")


@app.command()
def export(
    model: Optional[Path] = ModelOption,
    target: str = typer.Option("all", "--target", "-t", help="executorch | onnx | coreml | all (the recipe's targets)."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Folder the bundle is written into."),
    recipe: str = typer.Option("fp32", "--recipe", "-r", help="Built-in recipe name or path to a recipe YAML."),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle folder name (default: <model>-<recipe>)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write the check as JUnit XML."),
    heldout: Optional[Path] = HeldoutOption,
) -> None:
    """Export a checkpoint to a checked bundle: artifacts, tokenizer, manifest.json, report.json.

    Exit 0 when every artifact passes its tolerances, 1 on a breach, 2 on bad input.
    """
    from exporter.defaults import DEFAULT_MODEL
    from exporter.pipeline import export_bundle
    from recipes import load_recipe

    try:
        loaded = load_recipe(recipe)
        selected = loaded.select(_targets(loaded, target))
        with _progress_bar() as progress:
            result = export_bundle(model or DEFAULT_MODEL, selected, out, name=name, heldout=heldout, progress=progress)
    except CpmMobileError as error:
        _fail(error)
    _print_report(result.report)
    if junit:
        from runtimes.junit import write_junit

        write_junit(result.report, junit, result.manifest["name"])
    if not result.passed:
        errors.print(f"error: check failed; bundle kept for inspection at {result.bundle}", markup=False)
        raise typer.Exit(1)
    console.print(f"bundle: {result.bundle}")


@app.command()
def check(
    bundle: Path = typer.Argument(..., help="A bundle folder written by `cpm-mobile export`."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Source checkpoint, if it moved since export."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write the result as JUnit XML."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the report as JSON."),
    heldout: Optional[Path] = HeldoutOption,
    target: str = typer.Option("all", "--target", "-t", help="executorch | onnx | coreml | all (the bundle's artifacts)."),
) -> None:
    """Check an existing bundle again against its source checkpoint. Exit 0 pass, 1 breach, 2 bad input."""
    from exporter.bundle_check import check_bundle

    try:
        with _progress_bar() as progress:
            result = check_bundle(bundle, model_path=model, heldout=heldout, targets=_target_list(target),
                                  progress=progress)
    except CpmMobileError as error:
        _fail(error)
    _print_report(result.report)
    for breach in result.report.get("bundle_breaches", []):
        console.print(f"[red]bundle[/]: {breach}")
    if junit:
        from runtimes.junit import write_junit

        write_junit(result.report, junit, bundle.name)
    if report:
        from exporter.bundle import write_json

        write_json(report, result.report)
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def sparsity(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="BlockFFN checkpoint (default: the embedded one)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text to profile (default: the embedded held-out text)."),
    out: Path = typer.Option(Path("out/sparsity"), "--out", "-o", help="Folder for sparsity.json and the PNGs."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Profile the first N tokens of the text."),
    layer: int = typer.Option(0, "--layer", help="Layer shown in expert_firing.png."),
) -> None:
    """BlockFFN token-level (TLS) and s-token chunk-level (CLS) sparsity per layer: table, JSON, PNGs."""
    from exporter.analysis.sparsity import (
        profile_sparsity, render_table, write_expert_firing_png, write_heatmap_png,
    )
    from exporter.bundle import publish, staging_folder
    from exporter.defaults import DEFAULT_SPARSE_MODEL, HELDOUT_TEXT
    from exporter.errors import InputError

    model_dir = model or DEFAULT_SPARSE_MODEL
    text_path = text or HELDOUT_TEXT
    try:
        if not text_path.is_file():
            raise InputError(text_path, "text file not found")
        passage = text_path.read_text(encoding="utf-8")
        with errors.status("profiling router activity"):
            profile = profile_sparsity(model_dir, passage, max_tokens=max_tokens)
            with staging_folder(out) as staging:
                (staging / "sparsity.json").write_text(profile.to_json())
                write_heatmap_png(profile, staging / "sparsity_heatmap.png")
                write_expert_firing_png(model_dir, passage, staging / "expert_firing.png", layer=layer)
                publish(staging, out)
    except CpmMobileError as error:
        _fail(error)
    console.print(render_table(profile))
    console.print(f"written: {out / 'sparsity.json'}, {out / 'sparsity_heatmap.png'}, {out / 'expert_firing.png'}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
