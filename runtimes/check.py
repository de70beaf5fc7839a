"""The check: the same prompts through the reference and an artifact, step by step, then judged.

For every prompt the reference prefills and greedily decodes; the artifact is fed the same
tokens (prefill, then one decode step per generated token, using its own KV cache), and every
logits row is compared. Held-out text gives both models' perplexity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from runtimes import metrics
from runtimes.base import Session


@dataclass
class CheckPlan:
    prompts: list[list[int]]
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    heldout_windows: list[list[int]] = field(default_factory=list)


@dataclass
class SequenceRun:
    prompt: list[int]
    generated: list[int]
    logits: np.ndarray  # [len(prompt) + len(generated) - 1, V]: prefill rows, then one row per decode step

    @property
    def next_token_logits(self) -> np.ndarray:
        """Rows whose argmax chose generated[0], generated[1], ..."""
        return self.logits[len(self.prompt) - 1 :]


@dataclass
class Observations:
    runs: list[SequenceRun]
    heldout_logits: list[np.ndarray]


def greedy_runs(session: Session, plan: CheckPlan) -> Observations:
    """The reference side: greedy decode each prompt with the session, recording every logits row."""
    runs = []
    for prompt in plan.prompts:
        budget = min(plan.max_new_tokens, session.max_seq_len - len(prompt))
        session.reset()
        rows = [session.forward(np.asarray(prompt, dtype=np.int64), 0)]
        generated: list[int] = []
        while True:
            token = int(rows[-1][-1].argmax())
            generated.append(token)
            if len(generated) >= budget or token in plan.stop_ids:
                break
            rows.append(session.forward(np.asarray([token], dtype=np.int64), len(prompt) + len(generated) - 1))
        runs.append(SequenceRun(list(prompt), generated, np.concatenate(rows)))
    return Observations(runs, _heldout_logits(session, plan))


def teacher_forced_runs(session: Session, plan: CheckPlan, reference: Observations) -> Observations:
    """The artifact side: the reference's tokens fed through the artifact's own prefill and decode."""
    runs = []
    for ref in reference.runs:
        session.reset()
        rows = [session.forward(np.asarray(ref.prompt, dtype=np.int64), 0)]
        for index, token in enumerate(ref.generated[:-1]):
            rows.append(session.forward(np.asarray([token], dtype=np.int64), len(ref.prompt) + index))
        runs.append(SequenceRun(ref.prompt, ref.generated, np.concatenate(rows)))
    return Observations(runs, _heldout_logits(session, plan))


def _heldout_logits(session: Session, plan: CheckPlan) -> list[np.ndarray]:
    outputs = []
    for window in plan.heldout_windows:
        session.reset()
        outputs.append(session.forward(np.asarray(window, dtype=np.int64), 0))
    return outputs


def compare(reference: Observations, actual: Observations, plan: CheckPlan) -> dict[str, Any]:
    ref_rows = np.concatenate([r.logits for r in reference.runs])
    act_rows = np.concatenate([r.logits for r in actual.runs])
    prefixes = [
        metrics.identical_greedy_prefix(ref.generated, act.next_token_logits)
        for ref, act in zip(reference.runs, actual.runs)
    ]
    lengths = [len(r.generated) for r in reference.runs]
    result: dict[str, Any] = {
        "max_abs_logits": metrics.max_abs_error(ref_rows, act_rows),
        "sqnr_db": metrics.sqnr_db(ref_rows, act_rows),
        "kl": metrics.mean_kl_divergence(ref_rows, act_rows),
        "top1": metrics.top1_agreement(ref_rows, act_rows),
        "greedy_prefix": min(p / n for p, n in zip(prefixes, lengths)) if lengths else 1.0,
        "greedy_prefix_tokens": prefixes,
        "greedy_tokens": lengths,
        "compared_rows": int(ref_rows.shape[0]),
    }
    if plan.heldout_windows:
        ref_ppl = _pooled_perplexity(reference.heldout_logits, plan.heldout_windows)
        act_ppl = _pooled_perplexity(actual.heldout_logits, plan.heldout_windows)
        result.update(
            ppl_reference=ref_ppl,
            ppl=act_ppl,
            ppl_rel_delta=abs(act_ppl - ref_ppl) / ref_ppl,
            heldout_tokens=sum(len(w) for w in plan.heldout_windows),
        )
    return result


def _pooled_perplexity(logits: Sequence[np.ndarray], windows: Sequence[Sequence[int]]) -> float:
    total_nll, count = 0.0, 0
    for rows, window in zip(logits, windows):
        ppl, n = metrics.perplexity(rows, np.asarray(window))
        if n:
            total_nll += np.log(ppl) * n
            count += n
    return float(np.exp(total_nll / count)) if count else float("nan")


# metric -> (tolerance key, whether larger is better)
TOLERANCE_KEYS = {
    "max_abs_logits": ("max_abs_logits", False),
    "sqnr_db": ("min_sqnr_db", True),
    "kl": ("max_kl", False),
    "top1": ("min_top1", True),
    "greedy_prefix": ("min_greedy_prefix", True),
    "ppl_rel_delta": ("max_ppl_rel_delta", False),
}


def judge(measured: dict[str, Any], tolerances: dict[str, float | None]) -> list[str]:
    """Breaches as readable lines; empty when every set tolerance holds. NaN always breaches."""
    breaches = []
    for metric, (key, higher_is_better) in TOLERANCE_KEYS.items():
        bound = tolerances.get(key)
        if bound is None:
            continue
        if metric not in measured:
            breaches.append(f"{metric}: not measured but {key}={bound} is required")
            continue
        value = measured[metric]
        ok = value >= bound if higher_is_better else value <= bound
        if not ok or np.isnan(value):
            sign = ">=" if higher_is_better else "<="
            breaches.append(f"{metric} = {value:.6g}, required {sign} {bound:g}")
    return breaches
