"""The check: the same prompts through the reference and an artifact, step by step, then judged.

For every prompt the reference prefills and greedily decodes; the artifact is fed the same
tokens (prefill, then one decode step per generated token, using its own KV cache), and every
logits row is compared. Held-out text gives both models' perplexity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from cpm_mobile.runtimes import metrics
from cpm_mobile.runtimes.base import Session


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
    # Per held-out window, each next token's negative log-likelihood: all the perplexity needs. The windows'
    # logits themselves are not kept (16 x 256 rows x 73k vocab is 1.2 GB per run at MiniCPM4's size).
    heldout_nll: list[np.ndarray]


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
    return Observations(runs, _heldout_nll(session, plan))


def teacher_forced_runs(session: Session, plan: CheckPlan, reference: Observations) -> Observations:
    """The artifact side: the reference's tokens fed through the artifact's own prefill and decode."""
    runs = []
    for ref in reference.runs:
        session.reset()
        rows = [session.forward(np.asarray(ref.prompt, dtype=np.int64), 0)]
        for index, token in enumerate(ref.generated[:-1]):
            rows.append(session.forward(np.asarray([token], dtype=np.int64), len(ref.prompt) + index))
        runs.append(SequenceRun(ref.prompt, ref.generated, np.concatenate(rows)))
    return Observations(runs, _heldout_nll(session, plan))


def _heldout_nll(session: Session, plan: CheckPlan) -> list[np.ndarray]:
    outputs = []
    for window in plan.heldout_windows:
        session.reset()
        outputs.append(_token_nll(session.forward(np.asarray(window, dtype=np.int64), 0), window))
    return outputs


def compare(expected: Observations, actual: Observations, plan: CheckPlan, tie_margin_rel: float = 0.0) -> dict[str, Any]:
    """The artifact's logits against what was expected of them (the twin's or the fp32 reference's),
    on the same teacher-forced tokens."""
    exp_rows = np.concatenate([r.logits for r in expected.runs])
    act_rows = np.concatenate([r.logits for r in actual.runs])
    scale = float(np.max(np.abs(exp_rows))) if exp_rows.size else 0.0
    max_abs = metrics.max_abs_error(exp_rows, act_rows)
    greedy = greedy_agreement(expected, actual, tie_margin_rel)
    prefixes = [
        metrics.identical_greedy_prefix([int(t) for t in exp.next_token_logits.argmax(-1)], act.next_token_logits)
        for exp, act in zip(expected.runs, actual.runs)
    ]
    result: dict[str, Any] = {
        "max_abs_logits": max_abs,
        "max_rel_logits": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")),
        "logit_scale": scale,
        "sqnr_db": metrics.sqnr_db(exp_rows, act_rows),
        "kl": metrics.mean_kl_divergence(exp_rows, act_rows),
        "top1": metrics.top1_agreement(exp_rows, act_rows),
        **greedy,
        "greedy_prefix_tokens": prefixes,
        "greedy_tokens": [len(r.next_token_logits) for r in expected.runs],
        "compared_rows": int(exp_rows.shape[0]),
    }
    if plan.heldout_windows:
        result.update(heldout_comparison(expected.heldout_nll, actual.heldout_nll))
    return result


def greedy_agreement(expected: Observations, actual: Observations, tie_margin_rel: float) -> dict[str, Any]:
    """Teacher-forced greedy steps: does the artifact pick the expected next token at each step?

    A free-running comparison diverges for good at the first near-tie that rounding flips, which
    fails faithful artifacts; judged step by step on the same tokens, a flip counts only where the
    expected top-2 margin exceeds tie_margin_rel x the row's largest |logit|. Every flip is listed
    with its margin, so a tie shows as a tie and a fault as a fault.
    """
    steps, ties, flips = 0, 0, []
    for run_index, (exp, act) in enumerate(zip(expected.runs, actual.runs)):
        exp_rows, act_rows = exp.next_token_logits, act.next_token_logits
        for step in range(len(exp_rows)):
            want, got = int(exp_rows[step].argmax()), int(act_rows[step].argmax())
            steps += 1
            if want == got:
                continue
            scale = float(np.max(np.abs(exp_rows[step]))) or 1.0
            margin = float(exp_rows[step][want] - exp_rows[step][got]) / scale
            tie = margin <= tie_margin_rel
            ties += tie
            flips.append({"prompt": run_index, "step": step, "margin_rel": margin, "tie": bool(tie)})
    counted = steps - ties
    agreed = counted - sum(not f["tie"] for f in flips)
    return {
        "greedy": agreed / counted if counted else 1.0,
        "greedy_steps": steps,
        "greedy_ties": ties,
        "greedy_flips": flips[:20],
    }


def heldout_comparison(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> dict[str, Any]:
    """Perplexity of both on the held-out windows (their per-token NLL), their relative difference, and its
    standard error (from the per-token NLL differences), so a reader can see whether the text was long enough."""
    exp_nll = np.concatenate(list(expected)) if len(expected) else np.zeros(0)
    act_nll = np.concatenate(list(actual)) if len(actual) else np.zeros(0)
    if not exp_nll.size:
        return {}
    exp_ppl, act_ppl = float(np.exp(exp_nll.mean())), float(np.exp(act_nll.mean()))
    diff = act_nll - exp_nll
    stderr = float(np.std(diff, ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
    return {
        "ppl_expected": exp_ppl,
        "ppl": act_ppl,
        "ppl_rel_delta": abs(act_ppl - exp_ppl) / exp_ppl,
        "ppl_rel_delta_stderr": stderr * act_ppl / exp_ppl,
        "heldout_tokens": int(exp_nll.size),
    }


def _token_nll(logits: np.ndarray, window: Sequence[int]) -> np.ndarray:
    tokens = np.asarray(window)
    if len(tokens) < 2:
        return np.zeros(0)
    log_probs = metrics.log_softmax(logits[:-1])
    return -log_probs[np.arange(len(tokens) - 1), tokens[1:]]


# metric -> (tolerance key, whether larger is better)
TOLERANCE_KEYS = {
    "max_abs_logits": ("max_abs_logits", False),
    "max_rel_logits": ("max_rel_logits", False),
    "sqnr_db": ("min_sqnr_db", True),
    "kl": ("max_kl", False),
    "top1": ("min_top1", True),
    "greedy": ("min_greedy", True),
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
