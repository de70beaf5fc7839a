"""Vision-language artifacts in the desktop runtimes: encode an image slice, embed tokens, run the
LLM from embeddings.

A MultimodalSession is a Session (token ids in, logits out) that can also take embeddings, so
decoding after an image prompt is the text model's own decode. An image prompt's token ids hold
one run of image tokens per slice (runtimes/image_slicing.py lays them out); `prompt_embeddings`
puts each slice's vision-encoder output on its run and every other position's token embedding
elsewhere, as transformers' MiniCPM-V forward does. `ImagePrompts` makes such a session a plain
Session for the check: a registered image prompt prefilled at position 0 gets its images.
"""
from __future__ import annotations

from collections.abc import Sequence
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


class _ArtifactHalves:
    """What every format's session shares: the checks before its runtime is called (a clear error where the
    runtime would return a bare code), and tokens run as their embeddings. A format supplies _encode (one slice,
    float32 [1, 3, H, W]), _embed (int64 [1, T]) and forward_embeddings."""

    max_seq_len: int
    side_multiple: int
    max_side: int | None

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        check_slice(pixels, self.side_multiple, self.max_side)
        return np.asarray(self._encode(np.ascontiguousarray(pixels, dtype=np.float32)[None]), dtype=np.float32)

    def encode_images(self, slices: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Several slices of one shape (a grid's): one call where the format takes a batch (_encode_batch), else
        one call each, as the MultimodalRunner encodes them."""
        for pixels in slices:
            check_slice(pixels, self.side_multiple, self.max_side)
        if len({p.shape for p in slices}) != 1:
            raise ValueError("a batch of slices must share one shape")
        batch = getattr(self, "_encode_batch", None)
        if batch is None:
            return [self.encode_image(pixels) for pixels in slices]
        stacked = np.ascontiguousarray(np.stack(slices), dtype=np.float32)
        return list(np.asarray(batch(stacked), dtype=np.float32))

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        if not 0 < ids.shape[1] <= self.max_seq_len:
            raise ValueError(f"{ids.shape[1]} tokens do not fit max_seq_len={self.max_seq_len}")
        return np.asarray(self._embed(ids), dtype=np.float32)

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        return self.forward_embeddings(self.embed(tokens), start_pos)


class ExecuTorchMultimodalSession(_ArtifactHalves):
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
        from cpm_mobile.runtimes.executorch import load_program

        methods = (VISION_METHOD, EMBEDDING_METHOD, DECODER_METHOD)
        self._program = load_program(self.path, methods)
        self._methods = {name: self._program.load_method(name) for name in methods}

    def reset(self) -> None:
        if self._written:
            self._load()
            self._written = False

    def _encode(self, image: np.ndarray) -> np.ndarray:
        return self._methods[VISION_METHOD].execute((torch.from_numpy(image),))[0][0].numpy().copy()

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self._methods[EMBEDDING_METHOD].execute((torch.from_numpy(ids),))[0][0].numpy().copy()

    def forward_embeddings(self, embeddings: np.ndarray, start_pos: int) -> np.ndarray:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if start_pos < 0 or not 0 < embeddings.shape[0] <= self.max_seq_len - start_pos:
            raise ValueError(f"{embeddings.shape[0]} positions at {start_pos} do not fit max_seq_len={self.max_seq_len}")
        inputs = (torch.from_numpy(np.ascontiguousarray(embeddings))[None], torch.tensor([start_pos], dtype=torch.int64))
        self._written = True
        return self._methods[DECODER_METHOD].execute(inputs)[0][0].to(torch.float32).numpy().copy()


def open_executorch_multimodal(bundle_dir: Path, artifact: dict[str, Any]) -> ExecuTorchMultimodalSession:
    return ExecuTorchMultimodalSession(Path(bundle_dir) / artifact.get("entry", "model.pte"))


class OnnxMultimodalSession(_ArtifactHalves):
    """vision.onnx / embedding.onnx / model.onnx (from inputs_embeds) in onnxruntime; the text graph's
    past/present state is held by the runtime's OnnxSession."""

    runtime_name = "onnxruntime (CPU execution provider)"

    def __init__(self, bundle_dir: Path, artifact: dict[str, Any]):
        from cpm_mobile.runtimes.onnx import OnnxSession, _inference_session

        metadata = artifact["metadata"]
        self.text = OnnxSession(bundle_dir / artifact["entry"], artifact["io"])
        self.verified = self.text.verified
        self.max_seq_len = self.text.max_seq_len
        self._vision = _inference_session(bundle_dir / metadata["vision_model"], None)
        self._embedding = _inference_session(bundle_dir / metadata["embedding_model"], None)
        vision = metadata["vision_input"]
        self.side_multiple, self.max_side = int(vision["side_multiple"]), int(vision["max_side"])

    def reset(self) -> None:
        self.text.reset()

    def _encode(self, image: np.ndarray) -> np.ndarray:
        return self._encode_batch(image)[0]

    def _encode_batch(self, images: np.ndarray) -> np.ndarray:
        """vision.onnx takes a batch of equal-shape slices (BlueLM-V's batched slice encoding)."""
        return self._vision.run(None, {self._vision.get_inputs()[0].name: images})[0]

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self._embedding.run(None, {self._embedding.get_inputs()[0].name: ids})[0][0]

    def forward_embeddings(self, embeddings: np.ndarray, start_pos: int) -> np.ndarray:
        return self.text.run(np.ascontiguousarray(embeddings, dtype=np.float32)[None], start_pos)


class CoreMLMultimodalSession(_ArtifactHalves):
    """vision / embedding / text_decoder .mlpackage in Core ML where it runs (macOS), else in our ML Program
    interpreter (runtimes/coreml), as the text Core ML session; the decoder's states are one MLState."""

    def __init__(self, bundle_dir: Path, artifact: dict[str, Any]):
        from cpm_mobile.runtimes.coreml.session import (
            COREML_VERIFIED, INTERPRETER_VERIFIED, RUNTIME_NAMES, _CoreMLRuntime, coreml_available,
        )

        native = coreml_available()
        if native:
            open_package = _CoreMLRuntime
        else:
            from cpm_mobile.runtimes.coreml.mil_interpreter import MILInterpreter as open_package
        metadata, io = artifact["metadata"], artifact["io"]
        for name in artifact["files"]:
            if not (bundle_dir / name).is_dir():
                raise InputError(bundle_dir / name, "Core ML package not found")
        self._decoder = open_package(bundle_dir / artifact["entry"])
        self._embedding = open_package(bundle_dir / metadata["embedding_model"])
        self._vision = open_package(bundle_dir / metadata["vision_model"])
        self.verified = COREML_VERIFIED if native else INTERPRETER_VERIFIED
        self.runtime_name = RUNTIME_NAMES["coreml" if native else "interpreter"]
        self.max_seq_len = int(io["max_seq_len"])
        self._embeddings_name, self._tokens_name = io["inputs"][0]["name"], "tokens"
        vision = metadata["vision_input"]
        self._pixels_name, self._features_name = vision["name"], vision["output"]
        self.side_multiple, self.max_side = int(vision["side_multiple"]), int(vision["max_side"])
        self.reset()

    def reset(self) -> None:
        self._state = self._decoder.make_state()

    def _encode(self, image: np.ndarray) -> np.ndarray:
        return self._vision.predict({self._pixels_name: image}, None)[self._features_name][0]

    def _embed(self, ids: np.ndarray) -> np.ndarray:  # Core ML takes no int64 inputs
        return self._embedding.predict({self._tokens_name: ids.astype(np.int32)}, None)[self._embeddings_name][0]

    def forward_embeddings(self, embeddings: np.ndarray, start_pos: int) -> np.ndarray:
        inputs = {self._embeddings_name: np.ascontiguousarray(embeddings, dtype=np.float32)[None],
                  "input_pos": np.array([start_pos], dtype=np.int32)}
        return np.asarray(self._decoder.predict(inputs, self._state)["logits"][0], dtype=np.float32)


MULTIMODAL_RUNTIMES = {"executorch": open_executorch_multimodal, "onnx": OnnxMultimodalSession,
                       "coreml": CoreMLMultimodalSession}


def open_multimodal_session(bundle_dir: str | Path, artifact: dict[str, Any]) -> MultimodalSession:
    opener = MULTIMODAL_RUNTIMES.get(artifact["target"])
    if opener is None:
        raise InputError(bundle_dir, f"no runtime opens a vision-language {artifact['target']} artifact yet")
    return opener(Path(bundle_dir), artifact)


class TorchMultimodalSession:
    """The eager halves (a CausalLM-like text model with embed / forward_embeddings, and a vision encoder)
    behind the MultimodalSession interface: the check's reference."""

    verified = "PyTorch eager (reference)"

    def __init__(self, model: torch.nn.Module, vision: torch.nn.Module):
        self.model, self.vision = model, vision
        self.max_seq_len = model.max_seq_len

    def reset(self) -> None:
        self.model.reset_cache()

    @torch.no_grad()
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.vision(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None])[0].numpy()

    @torch.no_grad()
    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.model.embed(torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None])[0].numpy()

    @torch.no_grad()
    def forward_embeddings(self, embeddings: np.ndarray, start_pos: int) -> np.ndarray:
        h = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))[None]
        return self.model.forward_embeddings(h, torch.tensor([start_pos]))[0].float().numpy()

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        return self.forward_embeddings(self.embed(tokens), start_pos)


def image_token_runs(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of the image token, in order."""
    runs, start = [], None
    for position, token in enumerate([*ids, None]):
        if token == image_token_id and start is None:
            start = position
        elif token != image_token_id and start is not None:
            runs.append((start, position))
            start = None
    return runs


def prompt_embeddings(session: MultimodalSession, ids: Sequence[int], image_token_id: int,
                      slices: Sequence[np.ndarray], encode=None) -> np.ndarray:
    """[T, hidden]: the tokens' embeddings with each image-token run replaced by its slice's features
    (encode: how a slice becomes features, default the session's vision encoder)."""
    runs = image_token_runs(ids, image_token_id)
    if len(runs) != len(slices):
        raise ValueError(f"the prompt has {len(runs)} image-token runs for {len(slices)} image slices")
    encode = encode or session.encode_image
    embeddings = session.embed(np.asarray(ids, dtype=np.int64)).copy()
    for (start, end), pixels in zip(runs, slices):
        features = encode(pixels)
        if features.shape[0] != end - start:
            raise ValueError(f"a {pixels.shape[1]}x{pixels.shape[2]} slice gives {features.shape[0]} embeddings "
                             f"for a run of {end - start} image tokens")
        embeddings[start:end] = features
    return embeddings


class ImagePrompts:
    """A MultimodalSession as a plain Session: a registered prompt prefilled at position 0 is embedded with its
    image slices, everything else (decode steps, text-only prompts) runs as tokens."""

    def __init__(self, session: MultimodalSession, image_token_id: int,
                 prompts: dict[tuple[int, ...], Sequence[np.ndarray]],
                 features: dict[int, tuple[np.ndarray, np.ndarray]] | None = None):
        """features: another ImagePrompts' slice features, to share where both run the same vision encoder."""
        self.session, self.image_token_id, self.prompts = session, image_token_id, prompts
        self.max_seq_len = session.max_seq_len
        self.verified = session.verified
        self.encoded = 0  # vision-encoder calls made: a slice is encoded once, however often it is prefilled
        self.features = {} if features is None else features

    def reset(self) -> None:
        self.session.reset()

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """The slice's features, computed once per slice array (decoupled image encoding: a prompt that is
        prefilled again, a new chat turn over the same image, does not run the vision encoder again)."""
        cached = self.features.get(id(pixels))
        if cached is None or cached[0] is not pixels:
            cached = (pixels, self.session.encode_image(pixels))
            self.features[id(pixels)] = cached
            self.encoded += 1
        return cached[1]

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        if start_pos == 0:  # only a prefill from the start can be a registered image prompt
            key = tuple(int(t) for t in np.asarray(tokens).reshape(-1))
            if key in self.prompts:
                embeddings = prompt_embeddings(self.session, key, self.image_token_id, self.prompts[key], self.encode)
                return self.session.forward_embeddings(embeddings, 0)
        return self.session.forward(tokens, start_pos)
