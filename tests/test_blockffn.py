"""BlockFFN's FFN checked against values derived by hand."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cpm_mobile.exporter.models.ffn import BlockFFN

HIDDEN, EXPERTS, WIDTH, EPS = 16, 4, 8, 1e-5


def _ffn(seed: int = 0) -> BlockFFN:
    torch.manual_seed(seed)
    ffn = BlockFFN(HIDDEN, EXPERTS, WIDTH, EPS)
    for parameter in ffn.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    return ffn.requires_grad_(False)


def test_all_router_scores_zero_gives_zero_output():
    ffn = _ffn()
    ffn.router_proj.weight.copy_(-ffn.router_proj.weight.abs())  # every logit <= 0 for x >= 0
    x = torch.rand(3, HIDDEN)
    assert torch.all(ffn.router_scores(x) == 0)
    assert torch.all(ffn(x) == 0)


def test_one_active_expert_is_that_expert_alone_scaled_by_its_normalised_score():
    ffn = _ffn(1)
    x = torch.rand(2, HIDDEN)
    active = 2
    router = -x.new_ones(EXPERTS, HIDDEN)
    router[active] = torch.linspace(0.1, 1.0, HIDDEN)
    ffn.router_proj.weight.copy_(router)
    logit = x @ router[active]  # > 0: the only firing expert
    gamma = ffn.router_norm.weight[active]
    # RMSNorm over E scores with one non-zero s: s / sqrt(s^2 / E + eps), times gamma.
    score = gamma * logit / torch.sqrt(logit**2 / EXPERTS + EPS)
    rows = slice(active * WIDTH, (active + 1) * WIDTH)
    expert = F.silu(x @ ffn.up_proj.weight[rows].T) * score[:, None]
    expected = expert @ ffn.down_proj.weight[:, rows].T
    assert torch.allclose(ffn(x), expected, atol=1e-5, rtol=1e-5)
    assert math.isclose(float(ffn.router_scores(x)[0, active]), float(score[0]), rel_tol=1e-5)


def test_router_norm_makes_scores_scale_invariant_and_gamma_scales_output():
    ffn = _ffn(2)
    x = torch.randn(5, HIDDEN)
    before = ffn(x)
    ffn.router_proj.weight.mul_(7.0)  # RMSNorm undoes a uniform scale of the router logits
    assert torch.allclose(ffn(x), before, atol=1e-4, rtol=1e-4)
    ffn.router_norm.weight.mul_(2.0)  # the output is linear in the normalised scores
    assert torch.allclose(ffn(x), 2 * before, atol=1e-4, rtol=1e-4)


def test_scores_are_rms_normalised_over_experts():
    ffn = _ffn(3)
    ffn.router_norm.weight.fill_(1.0)
    x = torch.randn(64, HIDDEN)
    scores = ffn.router_scores(x)
    fired = (scores > 0).any(-1)
    rms = scores[fired].pow(2).mean(-1).sqrt()
    assert fired.any()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    assert torch.all(scores >= 0)


def test_dense_form_equals_per_expert_sum():
    ffn = _ffn(4)
    x = torch.randn(6, HIDDEN)
    scores = ffn.router_scores(x)
    total = torch.zeros(6, HIDDEN)
    for e in range(EXPERTS):
        rows = slice(e * WIDTH, (e + 1) * WIDTH)
        total += (F.silu(x @ ffn.up_proj.weight[rows].T) * scores[:, e:e + 1]) @ ffn.down_proj.weight[:, rows].T
    assert torch.allclose(ffn(x), total, atol=1e-5)
