"""The models and text that ship inside the package: every command works with no download."""
from __future__ import annotations

from pathlib import Path

from cpm_mobile.exporter.errors import InputError

EMBEDDED = Path(__file__).resolve().parent / "embedded"
DEFAULT_MODEL = EMBEDDED / "minicpm-tiny"
DEFAULT_SPARSE_MODEL = EMBEDDED / "blockffn-tiny"
HELDOUT_TEXT = EMBEDDED / "heldout.txt"


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file the user names (held-out or calibration text), or one line saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def read_heldout(path: Path | None) -> str:
    """The held-out text the check scores (default: the embedded one)."""
    return read_text(path or HELDOUT_TEXT, "held-out text")
