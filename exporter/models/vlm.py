"""A vision-language model as its two halves and the joins between them.

The LLM runs from embeddings: token ids are embedded by `TokenEmbedding`, an image slice by the
VisionEncoder, and `TextDecoder` continues the LLM's state from either at input_pos. This is the
split ExecuTorch's MultimodalRunner drives (token_embedding / vision_encoder / text_decoder) and
the one the ONNX and Core ML halves follow; `prefill_with_images` is the same computation as
transformers' MiniCPM-V forward (image features scattered onto the image-token positions).
"""
from __future__ import annotations

import torch
from torch import nn

from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.models.vision import VisionEncoder


class TokenEmbedding(nn.Module):
    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed(tokens)


class TextDecoder(nn.Module):
    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model.forward_embeddings(embeddings, input_pos)


def prompt_embeddings(model: CausalLM, tokens: torch.Tensor, image_token_id: int,
                      features: list[torch.Tensor]) -> torch.Tensor:
    """tokens [1, T] with image-token runs -> [1, T, hidden]: the runs replaced, in order, by the
    features of each slice ([n, hidden] each, n the run's length)."""
    h = model.embed(tokens)
    positions = (tokens[0] == image_token_id).nonzero().flatten()
    flat = torch.cat([f.reshape(-1, h.shape[-1]) for f in features]) if features else h.new_zeros(0, h.shape[-1])
    if flat.shape[0] != positions.numel():
        raise ValueError(f"{positions.numel()} image tokens in the prompt for {flat.shape[0]} image embeddings")
    h = h.clone()
    h[0, positions] = flat.to(h.dtype)
    return h


def encode_slices(vision: VisionEncoder, slices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each [3, H, W] slice -> its [n, hidden] embeddings, slices of one shape in one batch."""
    out: list[torch.Tensor | None] = [None] * len(slices)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for index, pixels in enumerate(slices):
        shapes.setdefault(tuple(pixels.shape), []).append(index)
    with torch.no_grad():
        for indices in shapes.values():
            batch = vision(torch.stack([slices[i] for i in indices]))
            for i, features in zip(indices, batch):
                out[i] = features
    return out  # type: ignore[return-value]
