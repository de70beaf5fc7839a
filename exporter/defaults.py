"""The models and text that ship inside the package: every command works with no download."""
from __future__ import annotations

from pathlib import Path

from cpm_mobile.exporter.errors import InputError

EMBEDDED = Path(__file__).resolve().parent / "embedded"
DEFAULT_MODEL = EMBEDDED / "minicpm-tiny"
DEFAULT_SPARSE_MODEL = EMBEDDED / "blockffn-tiny"
HELDOUT_TEXT = EMBEDDED / "heldout.txt"


def read_heldout(path: Path | None) -> str:
    """The held-out text the check scores (default: the embedded one)."""
    path = Path(path or HELDOUT_TEXT)
    if not path.is_file():
        raise InputError(path, "held-out text not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"held-out text is not UTF-8 ({exc.reason} at byte {exc.start})") from None
