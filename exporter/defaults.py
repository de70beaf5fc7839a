"""The models and text that ship inside the package: every command works with no download."""
from __future__ import annotations

from pathlib import Path

EMBEDDED = Path(__file__).resolve().parent / "embedded"
DEFAULT_MODEL = EMBEDDED / "minicpm-tiny"
DEFAULT_SPARSE_MODEL = EMBEDDED / "blockffn-tiny"
HELDOUT_TEXT = EMBEDDED / "heldout.txt"
