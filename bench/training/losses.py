"""BlockFFN's sparsity objectives, as thunlp/BlockFFN's pretraining code computes them.

Both losses take the router logits ``s`` of one layer BEFORE the ReLU, shape [B, T, E]
(captured with a forward hook on ``mlp.router_proj``), and both are averaged over layers by the
caller (the reference averages each over its layers before weighting).

* Activation locality (the "transfer" loss, weight 2e-3, steepness alpha = 100):
  ``BCE_with_logits(alpha * s_{t-1}, sigmoid(alpha * s_t))`` averaged over (t, e): token t-1's
  soft on/off pattern is pulled toward token t's, so neighbouring tokens fire the same experts.
  Like the reference, gradients flow into both sides. Pairs that cross a document boundary are
  masked out (the reference uses segment_shift_indices for that).
* Chunk sparsification: ``L_CS = 1 - mean_{chunk, e} prod_{t in chunk} (1 - p_{t,e})`` where
  ``p = r / (sum_e r + 1e-5)`` are the normalised ReLU scores (``r`` the RMS-normalised ReLU output,
  before the norm's gain, as the reference's ``router_ori``). ``prod (1-p)`` is the soft
  probability that expert e stays idle for the whole chunk; the loss rewards chunks whose tokens
  share few experts. Computed in log space: ``exp(sum log(1 - p + 1e-5))``.

The chunk loss's weight lambda(t) is adaptive (:class:`AdaptiveCoefficient`), starting at 5e-2.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LOCALITY_ALPHA = 100.0
LOCALITY_WEIGHT = 2e-3
CHUNK_LAMBDA_START = 5e-2


def activation_locality_loss(
    logits: torch.Tensor, boundary: torch.Tensor | None = None, alpha: float = LOCALITY_ALPHA
) -> torch.Tensor:
    """logits: [B, T, E] pre-ReLU router logits. boundary: bool [B, T], True where token t starts a
    new document (the pair (t-1, t) is then left out). Returns a scalar."""
    prev, cur = logits[:, :-1].float(), logits[:, 1:].float()
    loss = F.binary_cross_entropy_with_logits(alpha * prev, torch.sigmoid(alpha * cur), reduction="none")
    if boundary is None:
        return loss.mean()
    keep = (~boundary[:, 1:]).unsqueeze(-1).to(loss.dtype)
    return (loss * keep).sum() / (keep.sum() * loss.shape[-1]).clamp_min(1.0)


def normalised_scores(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """p = r / (sum_e r + 1e-5) with r = RMSNorm(ReLU(logits)) without the gain: sums to ~1 per token
    (to 0 for a token that fires no expert)."""
    relu = F.relu(logits.float())
    r = relu * torch.rsqrt(relu.pow(2).mean(-1, keepdim=True) + eps)
    return r / (r.sum(-1, keepdim=True) + 1e-5)


def chunk_sparsification_loss(logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """logits: [B, T, E] pre-ReLU router logits, T divisible by chunk_size. Returns L_CS (scalar)."""
    batch, seq, experts = logits.shape
    if seq % chunk_size:
        raise ValueError(f"sequence length {seq} is not a multiple of chunk size {chunk_size}")
    p = normalised_scores(logits).view(batch, seq // chunk_size, chunk_size, experts)
    idle = torch.exp(torch.log(1 - p + 1e-5).sum(dim=2))  # [B, chunks, E]: P(expert idle all chunk)
    return 1 - idle.mean()


@torch.no_grad()
def chunk_activation_rate(logits: torch.Tensor, chunk_size: int) -> float:
    """Hard (chunk, expert) activation rate = 1 - CLS at this chunk size, on pre-ReLU logits."""
    batch, seq, experts = logits.shape
    usable = seq - seq % chunk_size
    fired = (logits[:, :usable] > 0).view(batch, usable // chunk_size, chunk_size, experts).any(dim=2)
    return float(fired.float().mean())


@dataclass
class AdaptiveCoefficient:
    """lambda(t) for the chunk loss, steered toward a target sparsity.

    BlockFFN's AdaptiveLinearScheduler holds the coefficient for `stable_steps`, then every
    `window` steps compares the chunk loss of the last window with the one before and moves the
    coefficient linearly (over the next window) by that ratio, clipped to [start * min_factor,
    start * max_factor]. Our runs are a few thousand steps long, so instead of the loss ratio we use
    the measured hard chunk activation rate against its target: ratio = rate / target (clamped to
    [1/max_step, max_step]); too many active (chunk, expert) pairs raise lambda, too few lower it,
    so the LM loss gets back what the sparsity target does not need.
    """

    start: float = CHUNK_LAMBDA_START
    target_rate: float = 0.30  # target chunk activation rate (1 - CLS at the tracked chunk size)
    stable_steps: int = 100
    window: int = 50
    max_step: float = 2.0
    min_factor: float = 0.1
    max_factor: float = 20.0
    _from: float = field(init=False, default=0.0)
    _to: float = field(init=False, default=0.0)
    _steps_in_window: int = field(init=False, default=0)
    _rates: list[float] = field(init=False, default_factory=list)
    _step: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._from = self._to = self.start

    @property
    def value(self) -> float:
        progress = min(1.0, self._steps_in_window / self.window)
        return self._from + (self._to - self._from) * progress

    def step(self, measured_rate: float) -> float:
        """Record this step's measured chunk activation rate; returns lambda for the next step."""
        self._step += 1
        self._steps_in_window += 1
        self._rates.append(measured_rate)
        if self._step >= self.stable_steps and self._step % self.window == 0:
            rate = sum(self._rates[-self.window :]) / min(len(self._rates), self.window)
            ratio = min(self.max_step, max(1.0 / self.max_step, rate / self.target_rate))
            current = self.value
            low, high = self.start * self.min_factor, self.start * self.max_factor
            self._from, self._to = current, min(high, max(low, current * ratio))
            self._steps_in_window = 0
            self._rates = self._rates[-self.window :]
        return self.value
