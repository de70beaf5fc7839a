"""The PyTorch reference (any module with the forward(tokens, input_pos) contract) behind the same Session
interface as the artifacts' runtimes."""
from __future__ import annotations

import numpy as np
import torch

from cpm_mobile.runtimes.base import RecurrentReplay


class _Eager:
    verified = "PyTorch eager (reference)"

    def __init__(self, model: torch.nn.Module):  # the forward(tokens, input_pos) -> logits contract
        self.model = model
        self.max_seq_len = model.max_seq_len

    def reset(self) -> None:
        self.model.reset_cache()

    @torch.no_grad()
    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        logits = self.model(torch.as_tensor(tokens, dtype=torch.int64)[None], torch.tensor([start_pos]))
        return logits[0].float().numpy()


class TorchSession:
    """The eager module as a Session; a hybrid model's linear-attention state rewinds by replay."""

    verified = _Eager.verified

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.max_seq_len = model.max_seq_len
        eager = _Eager(model)
        config = getattr(model, "config", None)
        self._session = RecurrentReplay(eager) if getattr(config, "is_hybrid", False) else eager

    def reset(self) -> None:
        self._session.reset()

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        return self._session.forward(tokens, start_pos)
