"""A .pte in the ExecuTorch Python runtime (pybindings: XNNPACK delegate + portable kernels).

The program keeps its KV cache as mutable buffers, so state persists from one `forward` call to
the next. ExecuTorch has no call that clears those buffers; a freshly loaded program starts from
zeroed memory. Attention is causal over the positions a sequence has written, so after `reset()`
the old slots are invisible as long as the new sequence fills positions from 0 upwards, as every
prefill + decode does. Only a call that would read a stale slot (one left by an earlier sequence
and not yet rewritten) reloads the program and replays the calls made since the reset.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpm_mobile.exporter.contract import InputError
from cpm_mobile.runtimes.kernels.build import BuildError
from cpm_mobile.runtimes.kernels.loader import load_kernels
from cpm_mobile.runtimes.base import register_runtime

METHOD = "forward"


@functools.cache
def load_kernel_libraries() -> str | None:
    """Register the kernels an LLM .pte may need beyond the portable ones, once per process.

    The custom ops library holds llama::update_cache / custom_sdpa; the quantized kernels
    (quantized_decomposed::*) must be loaded RTLD_GLOBAL so the runtime's registry sees them; our
    own cpm_mobile::* kernels (runtimes/kernels) register once, through their idempotent loader.
    Returns why our kernels are unavailable (no C++ toolchain, say), or None.
    """
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.extension.pybindings.portable_lib as portable_lib

    quantized = Path(portable_lib.__file__).resolve().parents[2] / "lib" / "libexecutorch_kernels_quantized.so"
    if quantized.is_file():
        ctypes.CDLL(str(quantized), mode=ctypes.RTLD_GLOBAL)
    try:
        load_kernels()
    except BuildError as error:  # only programs that call cpm_mobile::* need them (see _load_forward)
        return f"cpm_mobile kernels unavailable: {error}"
    return None


def load_program(path: Path, methods: tuple[str, ...] = (METHOD,)):
    """The program at `path`, holding `methods`, or an InputError naming the file and what is wrong with it."""
    from executorch.runtime import Runtime

    if not path.is_file():
        raise InputError(path, "ExecuTorch program not found")
    load_kernel_libraries()
    try:
        program = Runtime.get().load_program(path)
    except (RuntimeError, ValueError) as error:
        raise InputError(path, f"not a valid ExecuTorch program ({error})") from error
    missing = [name for name in methods if name not in program.method_names]
    if missing:
        raise InputError(path, f"program has no {', '.join(repr(m) for m in missing)} method "
                               f"(has {sorted(program.method_names)})")
    return program


def read_constant_method(program, name: str) -> list[Any] | None:
    """A constant method's values, e.g. get_max_seq_len -> [128], get_eos_ids -> [2, 73440]; None when absent.

    A list constant comes back as one output per element, so a scalar and a one-element list look alike.
    """
    if name not in program.method_names:
        return None
    return list(program.load_method(name).execute([]))


class ExecuTorchSession:
    verified = "ExecuTorch runtime verified (XNNPACK + portable kernels)"
    runtime_name = "ExecuTorch runtime (XNNPACK + portable kernels)"

    def __init__(self, path: str | Path, max_seq_len: int | None = None):
        self.path = Path(path)
        self._program = load_program(self.path)
        declared = read_constant_method(self._program, "get_max_seq_len")
        self.max_seq_len = int(declared[0] if declared else max_seq_len or 0)
        if self.max_seq_len <= 0:
            raise InputError(self.path, "program declares no get_max_seq_len and none was given")
        self._method = self._load_forward()
        self._written = 0  # positions 0.._written-1 were written (or are still zero) since the reset
        self._stale_end = 0  # positions below this may hold an earlier sequence's keys and values
        self._calls: list[tuple[np.ndarray, int]] = []  # since the reset, to replay after a reload

    def _load_forward(self):
        try:
            return self._program.load_method(METHOD)
        except RuntimeError as error:
            unavailable = load_kernel_libraries()
            detail = f"; {unavailable}" if unavailable else ""
            raise InputError(self.path, f"cannot load '{METHOD}' (missing kernels or backend?): {error}{detail}") from error

    def reset(self) -> None:
        self._stale_end = max(self._stale_end, self._written)
        self._written = 0
        self._calls = []

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if start_pos < 0 or not 0 < tokens.size <= self.max_seq_len - start_pos:
            raise ValueError(f"{tokens.size} tokens at position {start_pos} do not fit max_seq_len={self.max_seq_len}")
        if start_pos > self._written and self._written < self._stale_end:
            self._reload_and_replay()
        logits = self._execute(tokens, start_pos)
        self._calls.append((tokens.copy(), start_pos))
        self._written = max(self._written, start_pos + tokens.size)
        return logits

    def _execute(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        inputs = (torch.from_numpy(tokens)[None], torch.tensor([start_pos], dtype=torch.int64))
        return self._method.execute(inputs)[0][0].to(torch.float32).numpy().copy()

    def _reload_and_replay(self) -> None:
        # Methods of one program share their arenas, so only a new program gives zeroed buffers.
        self._program = load_program(self.path)
        self._method = self._load_forward()
        self._stale_end = 0
        for tokens, start_pos in self._calls:
            self._execute(tokens, start_pos)


def open_executorch(bundle_dir: Path, artifact: dict[str, Any]) -> ExecuTorchSession:
    path = Path(bundle_dir) / artifact.get("entry", "model.pte")
    return ExecuTorchSession(path, artifact.get("io", {}).get("max_seq_len"))


register_runtime("executorch", open_executorch)
