"""Vision-language artifacts in the desktop runtimes: encode an image slice, embed tokens, run the
LLM from embeddings.

A MultimodalSession is a Session (token ids in, logits out) that can also take embeddings, so
decoding after an image prompt is the text model's own decode. Prompt assembly (which positions
are image tokens, which slice fills them) is the caller's: see exporter/vlm_generate.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cpm_mobile.exporter.contract import (
    DECODER_METHOD, EMBEDDING_METHOD, VISION_MAX_SIDE, VISION_METHOD, VISION_SIDE_MULTIPLE, InputError,
)


def check_slice(pixels: np.ndarray, side_multiple: int, max_side: int | None) -> None:
    """A clear error for a slice the encoder was not exported for (the runtime's own is a bare code)."""
    if pixels.ndim != 3:
        raise ValueError(f"an image slice is [3, H, W], got shape {list(pixels.shape)}")
    height, width = pixels.shape[1:]
    if height % side_multiple or width % side_multiple:
        raise ValueError(f"a {height}x{width} slice: sides must be multiples of {side_multiple} px")
    if max_side is not None and max(height, width) > max_side:
        raise ValueError(f"a {height}x{width} slice is beyond the vision encoder's bound: it was exported "
                         f"for sides up to {max_side} px")


class MultimodalSession(Protocol):
    max_seq_len: int
    verified: str

    def reset(self) -> None: ...

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """One slice, float32 [3, H, W] as the bundle's preprocessing gives it -> [n, hidden]."""

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """int64 [T] -> float32 [T, hidden]."""

    def forward_embeddings(self, embeddings: np.ndarray, start_pos: int) -> np.ndarray:
        """float32 [T, hidden] at positions start_pos.. -> float32 logits [T, V]."""

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray: ...


class ExecuTorchMultimodalSession:
    """model.pte with vision_encoder / token_embedding / text_decoder in the ExecuTorch runtime.

    The LLM state lives in the program's mutable buffers. ExecuTorch cannot clear them, so a reset
    after anything was written loads the program again (zeroed buffers), the simplest exact form.
    """

    verified = "ExecuTorch runtime verified (XNNPACK + portable kernels)"
    runtime_name = "ExecuTorch runtime (XNNPACK + portable kernels)"

    def __init__(self, path: str | Path):
        from cpm_mobile.runtimes.executorch import read_constant_method

        self.path = Path(path)
        self._load()
        declared = read_constant_method(self._program, "get_max_seq_len")
        if not declared:
            raise InputError(self.path, "program declares no get_max_seq_len")
        self.max_seq_len = int(declared[0])
        self.side_multiple = int((read_constant_method(self._program, VISION_SIDE_MULTIPLE) or [1])[0])
        self.max_side = int((read_constant_method(self._program, VISION_MAX_SIDE) or [0])[0]) or None
        self._written = False

    def _load(self) -> None:
        from executorch.runtime import Runtime

        from cpm_mobile.runtimes.executorch import load_kernel_libraries

        if not self.path.is_file():
            raise InputError(self.path, "ExecuTorch program not found")
        load_kernel_libraries()
        try:
            self._program = Runtime.get().load_program(self.path)
        except (RuntimeError, ValueError) as error:
            raise InputError(self.path, f"not a valid ExecuTorch program ({error})") from error
        missing = {VISION_METHOD, EMBEDDING_METHOD, DECODER_METHOD} - set(self._program.method_names)
        if missing:
            raise InputError(self.path, f"program has no {', '.join(sorted(missing))} method")
        self._methods = {name: self._program.load_method(name)
                         for name in (VISION_METHOD, EMBEDDING_METHOD, DECODER_METHOD)}

    def reset(self) -> None:
        if self._written:
            self._load()
            self._written = False

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        check_slice(pixels, self.side_multiple, self.max_side)
        image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None]
        return self._methods[VISION_METHOD].execute((image,))[0][0].numpy().copy()

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64).reshape(1, -1))
        if not 0 < ids.shape[1] <= self.max_seq_len:
            raise ValueError(f"{ids.shape[1]} tokens do not fit max_seq_len={self.max_seq_len}")
        return self._methods[EMBEDDING_METHOD].execute((ids,))[0][0].numpy().copy()

    def forward_embeddings(self, embeddings: np.ndarray, start_pos: int) -> np.ndarray:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if start_pos < 0 or not 0 < embeddings.shape[0] <= self.max_seq_len - start_pos:
            raise ValueError(f"{embeddings.shape[0]} positions at {start_pos} do not fit max_seq_len={self.max_seq_len}")
        inputs = (torch.from_numpy(np.ascontiguousarray(embeddings))[None], torch.tensor([start_pos], dtype=torch.int64))
        self._written = True
        return self._methods[DECODER_METHOD].execute(inputs)[0][0].to(torch.float32).numpy().copy()

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        return self.forward_embeddings(self.embed(tokens), start_pos)


def open_executorch_multimodal(bundle_dir: Path, artifact: dict[str, Any]) -> ExecuTorchMultimodalSession:
    return ExecuTorchMultimodalSession(Path(bundle_dir) / artifact.get("entry", "model.pte"))
