"""The `blockffn_sparse` pass: BlockFFN layers that compute only the experts some token activates.

BlockFFN's router is ReLU + RMSNorm, so an idle expert's score is an exact zero and the dense form
(exporter/models/ffn.py) multiplies its whole up/down block by that zero. `SparseBlockFFN` does
what BlockFFN's kernels do instead:

    router scores [N, E] -> union mask over the call's N tokens (N = 1 in decode, the prompt in
    prefill) -> active ids = nonzero(mask) -> gather the active experts' up rows and down columns
    -> SiLU(x Wu_active^T) * score -> sum over the active column blocks of Wd.

The numbers are the dense form's up to the order of the down projection's sum (idle terms are
exact zeros there): within ~1e-6 in fp32.

Export notes (measured with torch 2.13 / executorch 1.5.1, research/executorch_onnx.md):
- the active count n is an unbacked symbolic size; `torch._check` bounds it to 1..E so the gathers'
  shapes are bounded (memory planning sizes them for E) and never empty (see active_experts);
- `nonzero(mask).reshape(-1)` rather than `.squeeze(1)` (the latter breaks ExecuTorch's dim order);
- both expert weights are held as one contiguous row per expert, each row an expert's [de, H]
  block (Wu viewed so is the checkpoint's own storage; Wd [H, E*de] is re-laid out once, at pass
  time), so each gather is one `index_select` of whole rows (Gather in ONNX);
- the gathered weights enter two plain 2-D matmuls (up: [n*de, H] with the tokens; down:
  [N, n*de] x [n*de, H]), never a transposed copy of a weight and no bmm over the unbacked count
  (see _scaled_up_projection for the one place the form differs per target: the pass picks it).
- nothing with an unbacked size is delegated to XNNPACK (its partitioner refuses unbacked dims):
  in a .pte the router is delegated, the gathers and expert matmuls run as portable/optimized
  kernels (slower per FLOP than XNNPACK: see bench/sparse_ffn.py for where sparsity pays).
- ExecuTorch gets the fused form instead (FusedSparseBlockFFN, exporter/kernels): one custom
  kernel reads the active experts' rows in place, so neither gathers nor portable matmuls remain.
- A target without the sparse_experts capability (Core ML) refuses the recipe up front, with its reason.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.kernels.fused_ffn import FusedSparseBlockFFN
from cpm_mobile.exporter.models.ffn import BlockFFN
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.models.variant import derive
from cpm_mobile.exporter.passes.registry import register_pass
from cpm_mobile.exporter.targets.spec import Capabilities

PASS_NAME = "blockffn_sparse"
CAPABILITY = "sparse_experts"  # a target declares which sparse form its runtime runs (exporter/targets/<name>/spec.py)


class SparseBlockFFN(nn.Module):
    """BlockFFN computing only the experts active for at least one token of the call.

    Shares the router and the up-projection storage with the dense module it is built from.
    `tokens_transposed` picks the form of the up projection that is fast in the target's runtime
    (same numbers either way, see _scaled_up_projection).
    """

    def __init__(self, dense: BlockFFN, tokens_transposed: bool = True):
        super().__init__()
        self.tokens_transposed = tokens_transposed
        experts, width = dense.num_experts, dense.expert_size
        hidden = dense.router_proj.in_features
        self.num_experts = experts
        self.expert_size = width
        self.hidden_size = hidden
        self.router_proj = dense.router_proj
        self.router_norm = dense.router_norm
        with torch.no_grad():
            # One row per expert holding its [de, H] block, so a gather copies whole rows:
            # Wu [E*de, H] viewed as [E, de*H] (the same storage); Wd [H, E*de] re-laid out (a copy).
            up = dense.up_proj.weight.detach().view(experts, width * hidden)
            down = dense.down_proj.weight.detach().view(hidden, experts, width).permute(1, 2, 0)
        self.up_experts = nn.Parameter(up, requires_grad=False)
        self.down_experts = nn.Parameter(down.contiguous().view(experts, width * hidden), requires_grad=False)
        self.register_buffer("first_expert", torch.arange(experts) == 0, persistent=False)

    def router_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.router_norm(F.relu(self.router_proj(x)))

    def active_experts(self, scores: torch.Tensor) -> torch.Tensor:
        """Ids (int64 [n], ascending) of the experts with a non-zero score for some token.

        When no expert fires, expert 0 stands in: its scores are all zero, so it adds exact zeros,
        and n >= 1 keeps every gathered shape non-empty (ExecuTorch cannot order the strides of a
        tensor whose unbacked size may be 0).
        """
        union = (scores != 0).any(dim=0)
        union = torch.logical_or(union, torch.logical_and(self.first_expert, torch.logical_not(union.any())))
        ids = torch.nonzero(union).reshape(-1)
        count = ids.shape[0]
        torch._check(count >= 1)
        torch._check(count <= self.num_experts)
        return ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, self.hidden_size)  # [N, H]
        # The router on x's own [1, T, H]: a 2-D linear exports as Gemm, which onnxruntime's weight
        # quantiser (MatMul only) would leave fp32.
        scores = self.router_scores(x).reshape(-1, self.num_experts)  # [N, E]
        ids = self.active_experts(scores)
        rows = ids.shape[0] * self.expert_size
        up = self.up_experts.index_select(0, ids).reshape(rows, self.hidden_size)  # [n*de, H]
        inner = _scaled_up_projection(tokens, up, scores.index_select(1, ids), self.expert_size,
                                      self.tokens_transposed)  # [N, n*de]
        # Gathered after the up projection, so its buffer can reuse the up weights' (memory planning).
        down = self.down_experts.index_select(0, ids).reshape(rows, self.hidden_size)  # [n*de, H]
        return (inner @ down).reshape(shape)


def _scaled_up_projection(tokens: torch.Tensor, up: torch.Tensor, scores: torch.Tensor, width: int,
                          tokens_transposed: bool) -> torch.Tensor:
    """SiLU(tokens [N, H] x up [n*de, H]^T) scaled by each expert's score [N, n] -> [N, n*de].

    The same numbers either way; the form is the fast one per runtime. onnxruntime folds the
    weight's transpose into its MatMul (~2.4x faster than up x tokens^T there). ExecuTorch would
    copy the transposed [n*de, H] weight elementwise (permute_copy, ~5 ms at blockffn-small
    widths), so there the small tokens are transposed instead, and the result back.
    """
    count = scores.shape[1]
    if not tokens_transposed:
        inner = F.silu(tokens @ up.t()).reshape(-1, count, width) * scores.unsqueeze(-1)
        return inner.reshape(-1, count * width)
    inner = F.silu(up @ tokens.t()).reshape(count, width, -1) * scores.t().unsqueeze(1)  # [n, de, N]
    return inner.reshape(count * width, -1).t()


@register_pass(PASS_NAME, needs=CAPABILITY)
def blockffn_sparse(model: CausalLM, options: dict[str, Any], capabilities: Capabilities) -> CausalLM:
    """A variant of the model with each BlockFFN replaced by the sparse form the target runs. No options.

    fused_kernel: FusedSparseBlockFFN (the cpm_mobile::sparse_expert_ffn kernel, exporter/kernels: no
    gather copies, on ExecuTorch's threadpool); gather / gather_tokens_transposed: SparseBlockFFN's gathers.
    """
    if options:
        raise InputError("recipe", f"pass '{PASS_NAME}' takes no options (got {', '.join(sorted(options))})")
    if not any(isinstance(layer.mlp, BlockFFN) for layer in model.layers):
        if any(isinstance(layer.mlp, (SparseBlockFFN, FusedSparseBlockFFN)) for layer in model.layers):
            raise InputError("recipe", f"pass '{PASS_NAME}' is already applied to this model (listed twice?)")
        family = getattr(model.config, "family", "this model")
        raise InputError("recipe", f"pass '{PASS_NAME}' needs a model with BlockFFN layers, but {family} has none "
                                   "(its FFN is dense); remove the pass from the recipe")
    if capabilities.sparse_experts == "fused_kernel":
        return derive(model, lambda _name, m: FusedSparseBlockFFN(m) if isinstance(m, BlockFFN) else None)
    return sparse_variant(model, tokens_transposed=capabilities.sparse_experts == "gather_tokens_transposed")


def sparse_variant(model: CausalLM, tokens_transposed: bool = True) -> CausalLM:
    """A variant with every BlockFFN swapped for SparseBlockFFN; the input is not changed.

    Every weight but the down projection (re-laid out per expert, see SparseBlockFFN) is the
    input's own tensor.
    """
    def replace(name: str, module: nn.Module) -> nn.Module | None:
        return SparseBlockFFN(module, tokens_transposed) if isinstance(module, BlockFFN) else None

    return derive(model, replace)
