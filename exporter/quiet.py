"""Quiet by default: library chatter hidden unless the user asks for it (--verbose).

An export imports torch, torchao, ExecuTorch, onnxscript and coremltools, and each talks on
its own channel: Python warnings (FutureWarning, UserWarning), loggers (coremltools' version
notices, torch's "W1201 ..." lines), tqdm bars (coremltools' conversion passes) and C++ code
writing straight to file descriptor 2 (ExecuTorch's cpuinfo probe). None of it is something the
user can act on, so `quiet_libraries` silences all four for the duration of a command, and puts
everything back afterwards. Errors (logging.ERROR and above) and our own output still show.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator, TextIO


@contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[TextIO]:
    """Silence the libraries for the block; yields the stream the program's own stderr output must use."""
    if verbose:
        yield sys.stderr
        return
    previous_tqdm = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it when a bar is created (coremltools' pass bars)
    previous_disable = logging.root.manager.disable
    # logging.disable wins over any level a library sets on its own logger after import.
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A library that adds its own "always" filter still ends in showwarning: drop it there too.
        warnings.showwarning = lambda *args, **kwargs: None
        try:
            with _stderr_silenced() as ours:
                yield ours
        finally:
            logging.disable(previous_disable)
            if previous_tqdm is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = previous_tqdm


@contextmanager
def _stderr_silenced() -> Iterator[TextIO]:
    """sys.stderr and file descriptor 2 both to /dev/null; the program's own output gets the real stream.

    Both, because C++ code writes to fd 2 directly and ExecuTorch's pybindings route their log
    through Python's sys.stderr. What we print ourselves (progress, errors) goes to the yielded
    stream: a duplicate of the original fd 2, or the original sys.stderr when that is not a file
    (a test runner's capture). Tracebacks print after the block, to the restored sys.stderr.
    """
    original = sys.stderr
    try:
        original_fd = original.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        original_fd = None
    try:
        original.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):
        saved = None  # no fd 2 (an embedded interpreter): only sys.stderr moves
    ours: TextIO = original
    if saved is not None and original_fd == 2:
        ours = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(original, "encoding", None) or "utf-8",
                         errors="backslashreplace")
    devnull_stream = open(os.devnull, "w", encoding="utf-8")
    try:
        if saved is not None:
            os.dup2(devnull_stream.fileno(), 2)
        sys.stderr = devnull_stream
        yield ours
    finally:
        sys.stderr = original
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        devnull_stream.close()
        if ours is not original:
            ours.close()
