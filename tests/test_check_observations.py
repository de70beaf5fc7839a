"""The check keeps per-token NLL of the held-out windows, not their logits, and scores perplexity from it."""
from __future__ import annotations

import numpy as np

from cpm_mobile.runtimes.check import CheckPlan, compare, greedy_runs, teacher_forced_runs

VOCAB = 50


class _TableSession:
    """Logits a fixed function of (token, position): enough to drive the check's bookkeeping."""

    max_seq_len = 64

    def __init__(self, seed: int) -> None:
        self.table = np.random.default_rng(seed).normal(0, 3, (VOCAB, self.max_seq_len, VOCAB)).astype(np.float32)

    def reset(self) -> None:
        pass

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        return np.stack([self.table[t, start_pos + i] for i, t in enumerate(tokens)])


def _ppl(session: _TableSession, windows: list[list[int]]) -> float:
    nll = []
    for window in windows:
        logits = session.forward(np.asarray(window), 0)[:-1].astype(np.float64)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        nll.extend(-log_probs[np.arange(len(window) - 1), window[1:]])
    return float(np.exp(np.mean(nll)))


def test_heldout_perplexity_from_kept_nll_equals_the_logits_own():
    rng = np.random.default_rng(0)
    windows = [list(rng.integers(0, VOCAB, 20)), list(rng.integers(0, VOCAB, 33))]
    plan = CheckPlan(prompts=[[1, 2, 3]], max_new_tokens=4, heldout_windows=windows)
    reference, artifact = _TableSession(1), _TableSession(2)
    expected = greedy_runs(reference, plan)
    observed = teacher_forced_runs(artifact, plan, expected)
    assert [n.shape for n in expected.heldout_nll] == [(19,), (32,)]  # one number per next token, no logits rows
    measured = compare(expected, observed, plan)
    assert measured["heldout_tokens"] == 51
    assert np.isclose(measured["ppl_expected"], _ppl(reference, windows), rtol=1e-5)
    assert np.isclose(measured["ppl"], _ppl(artifact, windows), rtol=1e-5)
    assert measured["ppl_rel_delta"] > 0.01  # two different tables: the check sees it
    same = compare(expected, teacher_forced_runs(reference, plan, expected), plan)
    assert same["ppl_rel_delta"] == 0.0 and same["kl"] == 0.0
