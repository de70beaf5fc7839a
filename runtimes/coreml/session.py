"""The Core ML artifact behind the Session interface: Core ML itself on macOS, the numpy interpreter elsewhere.

On macOS the package runs in Core ML (`MLModel` on CPU only, so results do not depend on which
GPU or Neural Engine the machine has) with an `MLState` for the KV cache. Off macOS Core ML does
not exist, so the same saved program runs op by op in `MILInterpreter`; it refuses (raises) any
op it cannot run, so a passing check never skipped part of the graph. Which of the two ran is
stated in `verified`.

The package's structural checks are the Core ML target's (exporter/targets/coreml/structure.py).
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cpm_mobile.exporter.contract import InputError
from cpm_mobile.runtimes.base import register_runtime

TOKENS, INPUT_POS, LOGITS = "tokens", "input_pos", "logits"
COREML_VERIFIED = "Core ML runtime verified"
INTERPRETER_VERIFIED = "ML Program semantics verified (numpy interpreter; Core ML itself not run)"
RUNTIMES = ("coreml", "interpreter")
RUNTIME_NAMES = {"coreml": "Core ML (CPU only)",
                 "interpreter": "the numpy ML Program interpreter (Core ML itself runs only on macOS)"}


class _Runtime(Protocol):
    def make_state(self) -> Any: ...

    def predict(self, inputs: dict[str, np.ndarray], state: Any) -> dict[str, np.ndarray]: ...


class _CoreMLRuntime:
    """Core ML (macOS) through coremltools: MLModel on CPU only with an MLState."""

    def __init__(self, package_path: Path):
        import coremltools as ct

        try:
            self.model = ct.models.MLModel(str(package_path), compute_units=ct.ComputeUnit.CPU_ONLY)
        except Exception as exc:  # Core ML's compile and load errors come as several exception types
            raise InputError(package_path, f"Core ML cannot load it ({str(exc).strip().splitlines()[0]})") from None

    def make_state(self) -> Any:
        return self.model.make_state()

    def predict(self, inputs: dict[str, np.ndarray], state: Any) -> dict[str, np.ndarray]:
        return self.model.predict(inputs, state=state)


def coreml_available() -> bool:
    """Core ML runs here: macOS with coremltools' native bindings."""
    if platform.system() != "Darwin":
        return False
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False
    return True


class CoreMLSession:
    def __init__(self, package_path: Path, io: dict[str, Any], runtime: str | None = None):
        """runtime: "coreml", "interpreter", or None for Core ML where it exists, else the interpreter."""
        package_path = Path(package_path)
        if not package_path.is_dir():
            raise InputError(package_path, "Core ML package not found")
        self.max_seq_len = int(io["max_seq_len"])
        self.vocab_size = int(io["vocab_size"])
        runtime = runtime or ("coreml" if coreml_available() else "interpreter")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime '{runtime}' is not one of {', '.join(RUNTIMES)}")
        if runtime == "coreml":
            self._runtime: _Runtime = _CoreMLRuntime(package_path)
            self.verified = COREML_VERIFIED
        else:
            from cpm_mobile.runtimes.coreml.mil_interpreter import MILInterpreter

            # Raises UnsupportedOpError for any op it cannot run: no op is ever skipped.
            interpreter = MILInterpreter(package_path, function_name=io.get("function", "main"))
            self._runtime = interpreter
            self.verified = INTERPRETER_VERIFIED
        self.runtime = runtime
        self.runtime_name = RUNTIME_NAMES[runtime]
        self.reset()

    def reset(self) -> None:
        self._state = self._runtime.make_state()
        self._length = 0  # positions written since the last reset

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        end = start_pos + len(tokens)
        if not 0 <= start_pos <= self._length:
            # Slots past the written ones hold zeros that the causal mask would let it attend to.
            raise ValueError(f"start_pos {start_pos} leaves a gap: the cache holds {self._length} positions")
        if not tokens.size or end > self.max_seq_len:
            raise ValueError(f"positions {start_pos}..{end - 1} are outside 0..{self.max_seq_len - 1}")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.vocab_size - 1}")
        inputs = {TOKENS: tokens[None].astype(np.int32), INPUT_POS: np.array([start_pos], dtype=np.int32)}
        logits = self._runtime.predict(inputs, self._state)[LOGITS]
        # Going back (start_pos < length) rewinds: later slots are rewritten before they are read.
        self._length = end
        return np.asarray(logits[0], dtype=np.float32)


def open_coreml(bundle_dir: Path, artifact: dict[str, Any]) -> CoreMLSession:
    return CoreMLSession(Path(bundle_dir) / artifact["entry"], artifact["io"])


register_runtime("coreml", open_coreml)
