"""A vision-language model as its two halves and the joins between them.

The LLM runs from embeddings: token ids are embedded by `TokenEmbedding`, an image slice by the
VisionEncoder, and `TextDecoder` continues the LLM's state from either at input_pos. This is the
split ExecuTorch's MultimodalRunner drives (token_embedding / vision_encoder / text_decoder) and
the one the ONNX and Core ML halves follow; runtimes.multimodal.prompt_embeddings joins them as
transformers' MiniCPM-V forward does (image features scattered onto the image-token positions).
"""
from __future__ import annotations

import torch
from torch import nn

from cpm_mobile.exporter.models.transformer import CausalLM


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
