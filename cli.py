"""cpm-mobile: the command line. Thin: parse, call the library, print."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from exporter.errors import CpmMobileError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
