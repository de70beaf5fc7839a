"""The ONNX artifact in onnxruntime (CPU EP), behind the Session interface.

The graph takes the past keys/values as inputs and returns present = past + new ones; the session
holds the present arrays between calls and feeds them back as the next call's past. Linear-attention
layers (hybrid backbones) take fixed-size conv and recurrent states the same way; those cannot be cut
back to an earlier position (open_session wraps such a session in base.RecurrentReplay).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cpm_mobile.exporter.contract import InputError
from cpm_mobile.runtimes.base import register_runtime

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


class OnnxSession:
    verified = "onnxruntime verified (CPUExecutionProvider)"
    runtime_name = "onnxruntime (CPU execution provider)"

    def __init__(self, model_path: Path, io: dict[str, Any], session_options: ort.SessionOptions | None = None):
        self.names = io["names"]
        cache = io["cache"]
        self.layers = int(cache["layers"])
        self.max_seq_len = int(io["max_seq_len"])
        dtype = NUMPY_DTYPES[cache["dtype"]]
        recurrent = io.get("recurrent") or {}
        linear = set(recurrent.get("layers", ()))
        self._empty_past = {}
        self._outputs = [self.names["logits"]]
        self._attention_past: set[str] = set()
        for i in range(self.layers):
            if i in linear:
                state_names = recurrent["names"]
                self._empty_past[state_names["past_conv"] % i] = np.zeros(recurrent["conv_shape"], dtype)
                self._empty_past[state_names["past_recurrent"] % i] = np.zeros(recurrent["recurrent_shape"], dtype)
                self._outputs += [state_names["present_conv"] % i, state_names["present_recurrent"] % i]
                continue
            key, value = self.names["past_key"] % i, self.names["past_value"] % i
            self._empty_past[key] = np.zeros((1, cache["heads"], 0, cache["key_dim"]), dtype)
            value_width = cache.get("stored_value_dim") or cache["value_dim"]  # zero-padded MLA values as stored
            self._empty_past[value] = np.zeros((1, cache["heads"], 0, value_width), dtype)
            self._attention_past |= {key, value}
            self._outputs += [self.names["present_key"] % i, self.names["present_value"] % i]
        self.recurrent = bool(linear)
        self.session = _inference_session(model_path, session_options)
        # A vision-language text graph starts from inputs_embeds; a text graph from input_ids.
        self._first = self.names.get("inputs_embeds") or self.names["input_ids"]
        _check_inputs(model_path, self.session, [self._first, *self._empty_past])
        self._past: dict[str, np.ndarray] = dict(self._empty_past)
        self._length = 0

    @property
    def cached_len(self) -> int:
        return self._length

    def reset(self) -> None:
        self._past = dict(self._empty_past)
        self._length = 0

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        return self.run(np.asarray(tokens, dtype=np.int64).reshape(1, -1), start_pos)

    def run(self, first: np.ndarray, start_pos: int) -> np.ndarray:
        """One call with the graph's first input (input_ids [1, T], or inputs_embeds [1, T, hidden])."""
        tokens = first[0]
        if not 0 <= start_pos <= self.cached_len:
            raise ValueError(f"start_pos {start_pos} leaves a gap: the cache holds {self.cached_len} positions")
        end = start_pos + len(tokens)
        if end > self.max_seq_len:
            raise ValueError(f"positions up to {end} exceed max_seq_len {self.max_seq_len}")
        if self.recurrent and start_pos not in (0, self.cached_len):
            raise ValueError(f"start_pos {start_pos}: a recurrent state continues at {self.cached_len} or restarts at 0")
        if self.recurrent and start_pos == 0:
            self.reset()
        # Going back (start_pos < cached length) rewinds: the cache keeps only positions < start_pos.
        past = {name: array[:, :, :start_pos] if name in self._attention_past else array
                for name, array in self._past.items()}
        feed = {
            self._first: first,
            self.names["attention_mask"]: np.ones((1, end), dtype=np.int64),
            self.names["position_ids"]: np.arange(start_pos, end, dtype=np.int64)[None],
            **past,
        }
        logits, *presents = self.session.run(self._outputs, feed)
        self._past = dict(zip(self._empty_past, presents))
        self._length = end
        return logits[0].astype(np.float32, copy=False)


def _inference_session(model_path: Path, options: ort.SessionOptions | None) -> ort.InferenceSession:
    if not model_path.is_file():
        raise InputError(model_path, "ONNX model file not found")
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types for every load failure
        raise InputError(model_path, f"onnxruntime cannot load it ({str(exc).strip().splitlines()[0]})") from None


def _check_inputs(model_path: Path, session: ort.InferenceSession, expected: list[str]) -> None:
    present = {value.name for value in session.get_inputs()}
    missing = [name for name in expected if name not in present]
    if missing:
        raise InputError(model_path, f"graph lacks the inputs the manifest names: {', '.join(missing[:4])}")


def open_onnx(bundle_dir: Path, artifact: dict[str, Any], threads: int | None = None) -> OnnxSession:
    """The registered opener. threads: onnxruntime's intra-op threads (None: its default, one per core)."""
    bundle_dir = Path(bundle_dir)
    for name in artifact["files"]:
        if not (bundle_dir / name).is_file():
            raise InputError(bundle_dir / name, "file listed in the manifest is missing")
    options = None
    if threads is not None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
    return OnnxSession(bundle_dir / artifact["entry"], artifact["io"], options)


register_runtime("onnx", open_onnx)
