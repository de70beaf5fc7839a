"""cpm-mobile: export MiniCPM-family and BlockFFN checkpoints to ExecuTorch, ONNX and Core ML, checked against PyTorch.

Every command works out of the box on the tiny models shipped in the package.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from enum import Enum
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich import box
from rich.console import Console
from rich.live import Live
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn
from rich.segment import Segments
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from cpm_mobile.exporter.errors import CpmMobileError
from cpm_mobile.exporter.targets.registry import TARGET_NAMES

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)
console = Console()  # the terminal's own width (80 when not a terminal): _print_table widens what does not fit
errors = Console(stderr=True)

ModelOption = typer.Option(None, "--model", "-m", help="Checkpoint folder (default: the embedded minicpm-tiny).")
VerboseOption = typer.Option(False, "--verbose", "-v", help="Show the libraries' own warnings and logs.")
HeldoutOption = typer.Option(None, "--heldout", help="Text file for the perplexity check (default: the embedded held-out text).")


# The choices come from the target registry (a light module: names only).
Target = Enum("Target", {name: name for name in TARGET_NAMES}, type=str)
TargetOrAll = Enum("TargetOrAll", {**{name: name for name in TARGET_NAMES}, "all": "all"}, type=str)


def _builtin_recipes() -> list[str]:
    # Read the folder without importing recipes/ (pydantic): --help stays fast.
    folder = Path(find_spec("cpm_mobile.recipes").submodule_search_locations[0])
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _version(value: bool) -> None:
    if value:
        from cpm_mobile.exporter import __version__

        typer.echo(f"cpm-mobile {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Export MiniCPM-family and BlockFFN checkpoints to ExecuTorch, ONNX and Core ML, checked against PyTorch."""


def _fail(error: CpmMobileError) -> None:
    for line in getattr(error, "lines", None) or [str(error)]:
        errors.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(error.exit_code)


@contextmanager
def _running(verbose: bool) -> Iterator[None]:
    """A command's body: library chatter hidden unless --verbose, our errors as one line and exit code."""
    from cpm_mobile.exporter.quiet import quiet_libraries

    with quiet_libraries(verbose) as own_stderr:
        errors.file = own_stderr
        try:
            yield
        except CpmMobileError as error:
            _fail(error)
        finally:
            errors.file = None  # back to whatever sys.stderr is


def _table(title: str | None = None, **options) -> Table:
    """A compact table: one space between columns, rules under the header only. Print it with _print_table.

    Columns added with no_wrap=True hold numbers and names: _print_table never cuts or wraps them. The
    others hold free text (descriptions), which may wrap between words to fit the console.
    """
    return Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False, **options)


_LABEL_FLOOR = 4  # in a narrow terminal, a label column may shrink to this many characters (its text folds)


def _print_table(table: Table, labels: tuple[str, ...] = ()) -> None:
    """Print a table with every number and name whole, never cut with "…".

    The no_wrap columns print whole. In a terminal narrower than the table, the columns headed by `labels`
    (names such as the target and the gate) may fold, free-text columns wrap, and the numbers stay whole.
    Without a terminal (a pipe or a file, where rich assumes 80 columns), and in a terminal too narrow
    even for the numbers, the table is printed as wide as it needs: a long line beats a cut number.
    """
    out = console
    wide = out.options.update_width(10_000)
    folding = set(labels) if out.is_terminal else set()
    slack = 0  # how much narrower than their longest word the folding labels may go
    for column in table.columns:
        cells = [column.header, *column.cells] if table.show_header else list(column.cells)
        sizes = [Measurement.get(out, wide, cell) for cell in cells] or [Measurement(0, 0)]
        column.overflow = "fold"  # never "…": a word too long for a free-text column folds onto the next line
        if column.header in folding:
            column.no_wrap = False
            slack += max(0, max(size.minimum for size in sizes) - _LABEL_FLOOR)
        elif column.no_wrap:
            column.min_width = max(column.min_width or 0, max(size.maximum for size in sizes))
    whole = Measurement.get(out, wide, table).minimum  # every no_wrap column and every word whole
    if whole - slack <= out.width:
        out.print(table)
        return
    # Too wide for the console: render at the width that keeps everything whole and write the lines uncropped.
    lines = out.render_lines(table, out.options.update_width(whole), pad=False, new_lines=True)
    out.print(Segments([segment for line in lines for segment in line]), end="", crop=False)


@app.command()
def inspect(
    path: Optional[Path] = typer.Argument(None, metavar="PATH", help="Checkpoint folder (default: the embedded minicpm-tiny)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    verbose: bool = VerboseOption,
) -> None:
    """Describe a checkpoint: family, attention, shapes, parameters, dtype, tying, vocab, and the size of
    each shipped recipe's artifact per target (predicted from the shapes: no export)."""
    with _running(verbose):
        from cpm_mobile.exporter.defaults import DEFAULT_MODEL
        from cpm_mobile.exporter.inspect import summarize

        summary = summarize(path or DEFAULT_MODEL)
    if as_json:
        from dataclasses import asdict

        console.print_json(json.dumps(asdict(summary)))
        return
    table = _table("checkpoint", show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value")  # free text (wraps between words: a number or a path stays whole)
    for field, value in summary.rows():
        table.add_row(field, value)
    _print_table(table)
    sizes = _table("artifact sizes (predicted from the shapes)")
    for column in ("recipe", "target", "size", "vs fp32"):
        sizes.add_column(column, justify="right" if column in ("size", "vs fp32") else "left", no_wrap=True)
    for row in summary.size_rows():
        sizes.add_row(*row)
    _print_table(sizes, labels=("recipe", "target"))


class _Elapsed(ProgressColumn):
    """Time since the display started. Rich's own column freezes when the bar first reaches 100 %,
    and our bar is refilled once per stage (each target, then the check)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = time.monotonic()

    def render(self, task) -> Text:
        return Text(str(timedelta(seconds=int(time.monotonic() - self.started))), style="progress.elapsed")


@contextmanager
def _progress_bar() -> Iterator[Callable[[str, float | None], None]]:
    """A rich progress line that library code drives through a plain callback.

    It appears at the first update (an error found before any work shows no bar) and is
    cleared when the command fails, so the error stands alone.
    """
    # No redirect of sys.stdout/sys.stderr into the display: library output stays where quiet_libraries put it.
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Elapsed(), console=errors,
                   redirect_stdout=False, redirect_stderr=False)
    task = None

    def update(description: str, fraction: float | None = None) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=1.0)
        bar.update(task, description=description, completed=fraction)

    try:
        yield update
    except BaseException:
        if task is not None:
            bar.live.transient = True
            bar.live.stop()
        raise
    if task is not None:
        bar.stop()


def _spinner(text: str) -> Live:
    """A transient spinner line (rich's console.status, without its redirect of sys.stderr)."""
    return Live(Spinner("dots", text), console=errors, transient=True, redirect_stdout=False, redirect_stderr=False)


def _print_report(report: dict) -> None:
    """One row per artifact and gate: faithfulness (vs its twin) and fidelity (vs the fp32 reference).

    Each metric of report.json is shown whole, rounded as stated here: max_rel_logits, kl and ppl_rel_delta
    as f"{x:.1e}", sqnr_db as f"{x:.0f}", top1 and greedy as f"{x:.3f}" (greedy with " (Nt)" when N
    prompts tied). The breach lines under the table give the failing values to 6 significant digits.
    """
    table = _table("check: faithfulness vs twin, fidelity vs fp32")
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
        tokenizer = entry.get("tokenizer")  # the stock client's own tokenizer vs the checkpoint's (tokenizer_gate)
        if tokenizer is not None:
            table.add_row("", "tokenizer", *["-"] * 6, _TOKENIZER_RESULTS.get(tokenizer["status"], tokenizer["status"]))
    _print_table(table, labels=("target", "gate"))
    plan = report.get("plan", {})
    if plan.get("heldout_windows"):
        console.print(f"perplexity scored on {plan['heldout_tokens'] - plan['heldout_windows']} held-out tokens "
                      f"({plan['heldout_windows']} windows)")
    for target, entry in report["artifacts"].items():
        for breach in entry["breaches"]:  # one line each, as written (no markup: a breach may hold brackets)
            console.print(Text.assemble((target, "red"), f": {breach}"), soft_wrap=True)
    _print_tokenizer_notes(report)


_TOKENIZER_RESULTS = {"exact": "[green]pass[/]", "mismatch": "[red]FAIL[/]", "unsupported": "[yellow]unsupported[/]",
                      "no client": "n/a", "not run": "[yellow]not run[/]"}


def _print_tokenizer_notes(report: dict) -> None:
    """One line per artifact whose stock client cannot be exact on this bundle's tokenizer (the tokenizer row's
    `unsupported`), and one when the check's own tokenizer.json cannot be (a unigram model's ties)."""
    notes = []
    for target, entry in report["artifacts"].items():
        gate = entry.get("tokenizer")
        if gate is not None and gate["status"] == "unsupported":
            loaded = f" ({gate['loaded_as']})" if gate.get("loaded_as") else ""
            notes.append((target, f"tokenizer: {gate['client']} on {gate['loads']}{loaded} is unsupported for this "
                                  f"bundle: {gate['note']}"))
        elif gate is not None and gate["status"] == "not run":
            notes.append((target, f"tokenizer: {gate['note']}"))
    references = {g["reference"]["note"] for e in report["artifacts"].values() if (g := e.get("tokenizer"))
                  and g["reference"]["status"] == "unsupported"}
    notes += [("tokenizer.json", note) for note in sorted(references)]
    for where, note in notes:
        console.print(Text.assemble((where, "yellow"), f": {note}"), soft_wrap=True)


@app.command()
def export(
    model: Optional[Path] = ModelOption,
    target: list[TargetOrAll] = typer.Option([TargetOrAll.all], "--target", "-t", case_sensitive=False,
                                             help="Which artifact to build (repeat for several); all: every "
                                                  "target of the recipe."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Folder the bundle folder is written into."),
    recipe: str = typer.Option("fp32", "--recipe", "-r",
                               help=f"Built-in recipe ({', '.join(_builtin_recipes())}; see `cpm-mobile recipes`) "
                                    "or a recipe YAML file."),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle folder name (default: <model>-<recipe>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle of that name, once the new one is complete."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write the check as JUnit XML to this file."),
    heldout: Optional[Path] = HeldoutOption,
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="Text file a calibrated recipe (int4, int4-gptq, int4-mixed) calibrates on (default: the embedded held-out "
                                    "text, leaving out the windows the check measures)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build nothing: estimate each shipped recipe's quality cost on "
                                                          "the checkpoint from its eager ExecuTorch twin (and size)."),
    max_seq_len: Optional[int] = typer.Option(
        None, "--max-seq-len", help="Context length the artifacts hold (default: the recipe's); `inspect` states "
                                    "the cache memory per token."),
    verbose: bool = VerboseOption,
) -> None:
    """Export a checkpoint, check every artifact against PyTorch, and write the bundle.

    The bundle (artifacts, tokenizer, manifest.json, report.json) appears at OUT/NAME only when
    complete and checked; a bundle that fails its check is written as NAME.rejected instead.
    Exit 0 when every artifact passes, 1 when one breaches its recipe's tolerances, 2 on bad input.
    """
    with _running(verbose):
        from cpm_mobile.exporter.bundle import writable_file
        from cpm_mobile.exporter.defaults import DEFAULT_MODEL
        from cpm_mobile.exporter.pipeline import export_bundle
        from cpm_mobile.recipes import load_recipe

        loaded = load_recipe(recipe)
        if dry_run:
            _dry_run(model or DEFAULT_MODEL, recipe, loaded.name, heldout, calibration, verbose)
            return
        selected = loaded.select(list(loaded.targets) if TargetOrAll.all in target
                                 else list(dict.fromkeys(t.value for t in target)))
        if junit:
            writable_file(junit)
        with _progress_bar() as progress:
            result = export_bundle(model or DEFAULT_MODEL, selected, out, name=name, heldout=heldout,
                                   progress=progress, force=force, calibration=calibration, max_seq_len=max_seq_len)
    _print_report(result.report)
    if verbose:  # where the time went (also in manifest.json: export_cost)
        from cpm_mobile.exporter.export_cost import cost_lines

        for line in cost_lines(result.manifest["export_cost"]):
            errors.print(line, markup=False, highlight=False, style="dim", soft_wrap=True)
    if junit:
        from cpm_mobile.runtimes.junit import write_junit

        write_junit(result.report, junit, result.manifest["name"])
    if not result.passed:
        from cpm_mobile.exporter.estimate import verdict

        errors.print(f"error: check failed{verdict(result.report.get('suggestion'))}; bundle kept for inspection at "
                     f"{result.bundle}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"bundle: {result.bundle}")


def _dry_run(model: Path, recipe: str, selected: str, heldout: Optional[Path], calibration: Optional[Path],
             verbose: bool) -> None:
    from cpm_mobile.exporter.estimate import dry_run, ppl_delta_pct, vision_language_caption
    from cpm_mobile.exporter.inspect import human_size
    from cpm_mobile.recipes import recipe_names

    shipped = recipe_names()
    names = shipped + ([recipe] if recipe not in shipped else [])
    with _progress_bar() as progress:
        estimates, skipped = dry_run(model, heldout, calibration, names, progress)
    table = _table("estimated quality cost per recipe (eager ExecuTorch twins; nothing built)")
    for column in ("recipe", ".pte size", "vs fp32", "KL", "ppl +/-", "top-1", "fidelity"):
        table.add_column(column, justify="left" if column in ("recipe", "fidelity") else "right", no_wrap=True)
    for item in estimates:
        metrics = item.metrics
        table.add_row(item.recipe + (" *" if item.recipe == selected else ""), human_size(item.size_bytes),
                      f"{item.fp32_ratio:.2f}x", f"{metrics['kl']:.2e}", _signed_pct(ppl_delta_pct(metrics)),
                      f"{metrics['top1']:.3f}", "no bound stated" if not item.bounded else "pass" if item.passes
                      else f"fail: {item.breaches[0]}")
    _print_table(table, labels=("recipe",))
    caption = vision_language_caption(model)
    if caption:
        console.print(caption, markup=False, highlight=False, soft_wrap=True)
    if verbose:
        for name, why in skipped.items():
            console.print(f"{name}: not estimated: {why}", markup=False)


def _signed_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f} %"


@app.command()
def check(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="A bundle folder written by `cpm-mobile export`."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Source checkpoint, if it moved since export."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write the result as JUnit XML to this file."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the report as JSON to this file."),
    heldout: Optional[Path] = HeldoutOption,
    target: TargetOrAll = typer.Option(TargetOrAll.all, "--target", "-t", case_sensitive=False,
                                       help="Which artifact to check; all: every artifact in the bundle."),
    verbose: bool = VerboseOption,
) -> None:
    """Check an existing bundle again against its source checkpoint (and every file against its sha256).

    Exit 0 pass, 1 breach (or changed bytes), 2 bad input.
    """
    with _running(verbose):
        from cpm_mobile.exporter.bundle import writable_file
        from cpm_mobile.exporter.bundle_check import check_bundle

        for destination in (junit, report):
            if destination:
                writable_file(destination)
        with _progress_bar() as progress:
            result = check_bundle(bundle, model_path=model, heldout=heldout,
                                  targets=None if target is TargetOrAll.all else [target.value], progress=progress)
    _print_report(result.report)
    for breach in result.report.get("bundle_breaches", []):
        console.print(f"[red]bundle[/]: {breach}")
    if junit:
        from cpm_mobile.runtimes.junit import write_junit

        write_junit(result.report, junit, bundle.name)
    if report:
        from cpm_mobile.exporter.bundle import write_json

        write_json(report, result.report)
    if not result.passed:
        raise typer.Exit(1)


SPARSITY_OUTPUTS = ("sparsity.json", "sparsity_heatmap.png", "expert_firing.png")


@app.command()
def sparsity(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="BlockFFN checkpoint (default: the embedded blockffn-tiny)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text to profile (default: the embedded held-out text)."),
    out: Path = typer.Option(Path("out/sparsity"), "--out", "-o",
                             help="Folder for sparsity.json and the two PNGs (replaced as a whole)."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Profile the first N tokens of the text."),
    layer: int = typer.Option(0, "--layer", min=0, help="Layer drawn in expert_firing.png."),
    verbose: bool = VerboseOption,
) -> None:
    """BlockFFN activation sparsity per layer: token-level (TLS) and chunk-level (CLS); table, JSON, PNGs."""
    with _running(verbose):
        from cpm_mobile.exporter.analysis.sparsity import (
            profile_sparsity, render_table, write_expert_firing_png, write_heatmap_png,
        )
        from cpm_mobile.exporter.bundle import output_folder, publish, staging_folder
        from cpm_mobile.exporter.defaults import DEFAULT_SPARSE_MODEL, HELDOUT_TEXT
        from cpm_mobile.exporter.errors import InputError

        model_dir = model or DEFAULT_SPARSE_MODEL
        text_path = text or HELDOUT_TEXT
        output_folder(out, SPARSITY_OUTPUTS)
        if not text_path.is_file():
            raise InputError(text_path, "text file not found")
        passage = text_path.read_text(encoding="utf-8")
        with _spinner("profiling router activity"):
            profile = profile_sparsity(model_dir, passage, max_tokens=max_tokens)
            with staging_folder(out) as staging:
                (staging / "sparsity.json").write_text(profile.to_json())
                write_heatmap_png(profile, staging / "sparsity_heatmap.png")
                write_expert_firing_png(model_dir, passage, staging / "expert_firing.png", layer=layer)
                publish(staging, out)
    _print_table(render_table(profile))
    for name in SPARSITY_OUTPUTS:
        console.print(f"written: {out / name}", markup=False, highlight=False, soft_wrap=True)


recipes_app = typer.Typer(help="The built-in export recipes.", no_args_is_help=False, rich_markup_mode=None)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes_list(ctx: typer.Context) -> None:
    """List the built-in recipes: name, targets, one line on what each is for."""
    if ctx.invoked_subcommand is not None:
        return
    from cpm_mobile.recipes import load_recipe

    table = _table("recipes (cpm-mobile recipes show NAME for the full file)")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("targets", no_wrap=True)
    table.add_column("what it is")  # free text: wraps between words to fit
    for name in _builtin_recipes():
        recipe = load_recipe(name)
        table.add_row(name, ", ".join(recipe.targets), _first_sentence(recipe.description))
    _print_table(table, labels=("name", "targets"))


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., metavar="NAME", help="A recipe name from `cpm-mobile recipes`.")) -> None:
    """Print a built-in recipe's YAML: targets, passes, tolerances and the check's prompts."""
    from cpm_mobile.exporter.errors import InputError
    from cpm_mobile.recipes.schema import RECIPES_DIR

    path = RECIPES_DIR / f"{name}.yaml"
    if name not in _builtin_recipes():
        _fail(InputError(name, f"no such built-in recipe (built-in: {', '.join(_builtin_recipes())})"))
    typer.echo(path.read_text(encoding="utf-8"), nl=False)


def _first_sentence(text: str) -> str:
    """The description's lead: up to its first full stop or colon outside parentheses (never half a bracket)."""
    text = " ".join(text.split())
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(char, 0)
        if depth <= 0 and text.startswith((". ", ": "), i):
            return text[:i]
    return text.rstrip(".")


@app.command()
def generate(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="A bundle folder written by `cpm-mobile export`."),
    target: Optional[Target] = typer.Option(None, "--target", "-t", case_sensitive=False,
                                            help="Which artifact to run (default: the bundle's first)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue."),
    image: Optional[Path] = typer.Option(None, "--image", help="A vision-language bundle: the image goes before "
                                                                "--prompt in one user message, through the bundle's "
                                                                "chat template; only the answer is printed."),
    chat: bool = typer.Option(False, "--chat", help="Chat with the bundle's chat template: one message per line "
                                                    "on stdin, until an empty line or end of input."),
    system: Optional[str] = typer.Option(None, "--system", help="With --chat: a system message first."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Stop after this many new tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Above 0, at most 1: sample only among the most likely "
                                                     "tokens whose probabilities sum to P."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling, so a run can be repeated."),
    speculative: Optional[str] = typer.Option(None, "--speculative", metavar="ngram|draft:PATH",
                                              help="Speculative decoding (greedy only): drafts verified in one call "
                                                   "of the artifact. ngram: prompt lookup; draft:PATH: a smaller "
                                                   "bundle with the same tokenizer drafts greedily."),
    draft_tokens: Optional[int] = typer.Option(None, "--draft-tokens", "-k", min=1,
                                               help="With --speculative: drafts per verification call (default 4)."),
    compare: bool = typer.Option(False, "--compare", help="With --speculative and --prompt: decode plainly first, "
                                                          "then report the speedup and that both outputs agree."),
    verbose: bool = VerboseOption,
) -> None:
    """Generate text with a bundle's artifact in its runtime, streamed as it is produced.

    Runs the artifact itself (the .pte in ExecuTorch, the .onnx in onnxruntime, the .mlpackage in
    Core ML, or off macOS in our ML Program interpreter), stops at the model's EOS tokens, then
    prints prefill and decode tokens/s and the process's peak memory on stderr.
    """
    if (prompt is None) == (not chat):
        raise typer.BadParameter("give either --prompt TEXT or --chat", param_hint="--prompt / --chat")
    if not 0 < top_p <= 1:
        raise typer.BadParameter(f"{top_p} is not in (0, 1]", param_hint="--top-p")
    if system is not None and not chat:
        raise typer.BadParameter("--system goes with --chat", param_hint="--system")
    with _running(verbose):
        from cpm_mobile.exporter.vlm_generate import is_vision_language_bundle

        if image is not None or is_vision_language_bundle(bundle):
            if speculative:
                raise typer.BadParameter("a vision-language bundle does not take --speculative yet",
                                         param_hint="--speculative")
            _generate_with_image(bundle, target.value if target else None, image, prompt, chat, system,
                                 max_new_tokens, sampling=(temperature, top_p, seed))
            return
        from cpm_mobile.exporter.generate import (
            Chat, ChatTemplate, Sampling, Timings, complete, decode_tokens, make_sampler, open_bundle_model,
            select_artifact,
        )
        from cpm_mobile.exporter.speculative import check_speculative_options
        from cpm_mobile.exporter.tokenizer import TextTokenizer

        _, artifact = select_artifact(bundle, target.value if target else None)  # a bad bundle or target: first
        check_speculative_options(speculative, draft_tokens, compare, temperature, chat, bundle, artifact["target"])
        tokenizer = TextTokenizer.from_folder(bundle)
        template = ChatTemplate.from_folder(bundle) if chat else None
        sample = make_sampler(Sampling(temperature, top_p, seed))
        with _spinner("loading the artifact"):
            model = open_bundle_model(bundle, target.value if target else None)
        note = "" if model.passed_check is not False else "; this bundle FAILED its check"
        errors.print(f"{model.target} in {model.runtime}{note}", markup=False, highlight=False, style="dim",
                     soft_wrap=True)
        source, decoder = decode_tokens, None
        if speculative:
            from cpm_mobile.exporter.speculative import Recorded, SpeculativeDecoder, open_drafter

            with _spinner("loading the draft"):
                drafter, described = open_drafter(speculative, bundle, model.target)
            decoder = SpeculativeDecoder(drafter, draft_tokens or 4)
            source = Recorded(decoder)
            errors.print(f"speculative decoding: {described}, {decoder.draft_tokens} per call", markup=False,
                         highlight=False, style="dim", soft_wrap=True)
        if chat:
            conversation = Chat(model.session, tokenizer.tokenizer, template, model.eos_ids, system=system,
                                source=source)

            def before() -> None:
                decoder.stats = type(decoder.stats)()  # this answer's counts

            _chat(conversation, max_new_tokens, sample, before=before if decoder else None,
                  after=(lambda: _print_speculation(decoder.stats)) if decoder else None)
        else:
            timings = Timings()
            prompt_ids = tokenizer.encode(prompt)
            if len(prompt_ids) >= model.session.max_seq_len:
                from cpm_mobile.exporter.errors import InputError

                raise InputError("--prompt", f"is {len(prompt_ids)} tokens; the artifact holds "
                                 f"{model.session.max_seq_len} positions")
            plain = None
            if compare:
                plain = Recorded(decode_tokens)
                plain_timings = Timings()
                with _spinner("plain greedy decoding, for the comparison"):
                    for _ in complete(model.session, prompt_ids, tokenizer.tokenizer, max_new_tokens, sample,
                                      model.eos_ids, plain_timings, source=plain):
                        pass
            _stream(complete(model.session, prompt_ids, tokenizer.tokenizer, max_new_tokens, sample,
                             model.eos_ids, timings, source=source))
            _print_speed(timings)
            if decoder:
                _print_speculation(decoder.stats)
            if plain is not None:
                _print_comparison(plain_timings, timings, plain.tokens == source.tokens)
                if plain.tokens != source.tokens:
                    raise typer.Exit(1)


def _generate_with_image(bundle: Path, target: Optional[str], image: Optional[Path], prompt: Optional[str],
                         chat: bool, system: Optional[str], max_new_tokens: int, sampling: tuple) -> None:
    from cpm_mobile.exporter.generate import Sampling, Timings, complete, make_sampler
    from cpm_mobile.exporter.vlm_generate import ImageChat, open_image_prompt, open_vision_language

    with _spinner("loading the artifact"):
        model = open_vision_language(bundle, target)
    note = "" if model.passed_check is not False else "; this bundle FAILED its check"
    errors.print(f"{model.target} in {model.runtime}{note}", markup=False, highlight=False, style="dim", soft_wrap=True)
    sample = make_sampler(Sampling(*sampling))
    if chat:  # the image goes with the first message; later turns reuse its cached prefix
        _chat(ImageChat.about(model, image, system), max_new_tokens, sample)
        return
    session, ids = open_image_prompt(model, image, prompt)
    timings = Timings()
    _stream(complete(session, ids, model.tokenizer.tokenizer, max_new_tokens, sample, model.eos_ids, timings))
    _print_speed(timings)


def _chat(conversation, max_new_tokens: int, sample, before=None, after=None) -> None:
    """One message per line on stdin until an empty line; each answer streamed, then its speed."""
    from cpm_mobile.exporter.generate import Timings

    while True:
        errors.print("> ", end="", markup=False, highlight=False)
        line = sys.stdin.readline()
        if not line.strip():
            break
        timings = Timings()
        if before:
            before()
        _stream(conversation.reply(line.strip(), max_new_tokens, sample, timings))
        _print_speed(timings)
        if after:
            after()


def _stream(pieces: Iterator[str]) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _print_speed(timings) -> None:
    from cpm_mobile.exporter.generate import peak_memory_mib

    errors.print(
        f"prefill {timings.prefill_tokens} tokens {timings.prefill_tokens_per_s:.0f} tok/s, "
        f"decode {timings.decode_tokens} tokens {timings.decode_tokens_per_s:.0f} tok/s, "
        f"peak memory {peak_memory_mib():.0f} MiB",
        markup=False, highlight=False, style="dim", soft_wrap=True,
    )


def _print_speculation(stats) -> None:
    errors.print(
        f"speculative: {stats.calls} verification calls, {stats.accepted} of {stats.drafted} drafts accepted "
        f"({stats.acceptance_rate:.0%}), {stats.tokens_per_call:.2f} tokens per call",
        markup=False, highlight=False, style="dim", soft_wrap=True,
    )


def _print_comparison(plain, speculative, same: bool) -> None:
    ratio = speculative.decode_tokens_per_s / plain.decode_tokens_per_s
    verdict = "same tokens as plain greedy" if same else "OUTPUT DIFFERS from plain greedy"
    errors.print(
        f"plain decode {plain.decode_tokens_per_s:.0f} tok/s, speculative {speculative.decode_tokens_per_s:.0f} "
        f"tok/s: {ratio:.2f}x; {verdict}",
        markup=False, highlight=False, style="dim" if same else None, soft_wrap=True,
    )


def main() -> None:
    app(prog_name="cpm-mobile")


if __name__ == "__main__":
    sys.exit(main())
