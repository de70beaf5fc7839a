"""Numbers that say how far an artifact's logits are from the reference's (numpy, float64)."""
from __future__ import annotations

import numpy as np

SQNR_CAP_DB = 300.0  # identical outputs: report a finite, JSON-safe ceiling instead of infinity


def max_abs_error(reference: np.ndarray, actual: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - reference.astype(np.float64)))) if reference.size else 0.0


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """Signal-to-quantisation-noise ratio: 10 log10(|ref|^2 / |actual - ref|^2)."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((actual.astype(np.float64) - ref) ** 2))
    signal = float(np.sum(ref**2))
    if not np.isfinite(noise):
        return float("nan")
    if noise == 0.0:
        return SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10.0 * np.log10(signal / noise)) if signal > 0 else -SQNR_CAP_DB


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def mean_kl_divergence(reference: np.ndarray, actual: np.ndarray) -> float:
    """Mean over rows of KL(p_reference || p_actual) of the next-token distributions, in nats."""
    if not reference.size:
        return 0.0
    log_p, log_q = log_softmax(reference), log_softmax(actual)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def top1_agreement(reference: np.ndarray, actual: np.ndarray) -> float:
    if not reference.size:
        return 1.0
    return float(np.mean(reference.argmax(-1) == actual.argmax(-1)))


def identical_greedy_prefix(expected_tokens: list[int], next_token_logits: np.ndarray) -> int:
    """How many leading greedy tokens the artifact reproduces.

    next_token_logits[i] are the artifact's logits before expected_tokens[i] was chosen, computed
    on the reference's own prefix: while the argmax agrees, the artifact's free-running greedy
    output is the same sequence, so the first disagreement ends its identical prefix.
    """
    for index, token in enumerate(expected_tokens):
        if index >= len(next_token_logits) or int(next_token_logits[index].argmax()) != token:
            return index
    return len(expected_tokens)


def perplexity(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, int]:
    """exp(mean NLL) of tokens[1:] under logits[:-1]; also the number of predicted tokens."""
    if len(tokens) < 2:
        return float("nan"), 0
    log_probs = log_softmax(logits[:-1])
    nll = -log_probs[np.arange(len(tokens) - 1), tokens[1:]]
    return float(np.exp(nll.mean())), len(tokens) - 1
