"""One interface over the desktop runtimes: open an artifact, prefill, decode, read logits.

A runtime knows nothing of how its artifact was made: it reads only the bundle's manifest entry
(ArtifactInfo as a dict: files, entry, io, metadata) and the files themselves.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np


class Session(Protocol):
    """A loaded artifact with its own KV cache of max_seq_len positions."""

    max_seq_len: int
    verified: str  # what running it proves, e.g. "ExecuTorch runtime verified"

    def reset(self) -> None:
        """Forget the cache: the next call starts a new sequence at position 0."""

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        """tokens: int64 [T] placed at positions start_pos..start_pos+T-1. Returns float32 logits [T, V]."""


class RecurrentReplay:
    """A session over a model with recurrent state (linear-attention layers). Such a state cannot be
    cut back to an earlier position as a KV cache can, so going back (a rejected speculative draft, a
    chat turn that rewinds) re-runs the kept tokens from position 0: exact, since it is the same
    recurrence over the same tokens, at the cost of one prefill."""

    def __init__(self, session: Session):
        self.session = session
        self.max_seq_len = session.max_seq_len
        self.verified = session.verified
        self._tokens = np.zeros(0, dtype=np.int64)  # what the state holds, positions 0..len-1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def reset(self) -> None:
        self.session.reset()
        self._tokens = self._tokens[:0]

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if not 0 <= start_pos <= len(self._tokens):
            raise ValueError(f"start_pos {start_pos} leaves a gap: the state holds {len(self._tokens)} positions")
        if start_pos < len(self._tokens):
            kept = self._tokens[:start_pos]
            self.reset()
            if kept.size:
                self.session.forward(kept, 0)
                self._tokens = kept
        logits = self.session.forward(tokens, start_pos)
        self._tokens = np.concatenate((self._tokens, tokens))
        return logits


SessionOpener = Callable[[Path, dict[str, Any]], Session]
_OPENERS: dict[str, SessionOpener] = {}


def register_runtime(target: str, opener: SessionOpener) -> None:
    _OPENERS[target] = opener


def open_session(bundle_dir: Path, artifact: dict[str, Any]) -> Session:
    """Open the artifact described by a manifest entry, in the runtime registered for its target."""
    target = artifact["target"]
    if target not in _OPENERS:
        _import_runtime(target)
    session = _OPENERS[target](Path(bundle_dir), artifact)
    return RecurrentReplay(session) if artifact.get("io", {}).get("recurrent") else session


def _import_runtime(target: str) -> None:
    """A target's runtime is the module (or package) `cpm_mobile.runtimes.<target>`, which registers itself."""
    import importlib

    module = f"{__package__}.{target}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        raise KeyError(f"no runtime for target '{target}'") from None
    if target not in _OPENERS:
        raise KeyError(f"{module} did not register a runtime for '{target}'")
