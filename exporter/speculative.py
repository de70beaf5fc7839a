"""Speculative decoding: draft k tokens cheaply, verify them in one forward call of the artifact.

The verification entry is the artifact's ordinary `forward`: with the cache holding positions
0..p-1, `forward([t_p, d_1, .., d_k], input_pos=p)` (T = k + 1: the last accepted token, not yet
fed, then the k drafts) returns k + 1 logits rows; row i is the model's prediction for position
p + i + 1. Under greedy decoding the drafts are accepted while d_i == argmax(row i-1); the first
mismatch (or, with every draft accepted, row k) gives the next token, so each call yields between
one and k + 1 tokens and the output is the plain greedy output. For a `blockffn_sparse` artifact
that one call computes the union of the T tokens' active experts once.

Positions past the accepted prefix then hold rejected drafts' keys and values. No runtime ever
reads them: the next call starts at the first such position and writes over it, and attention
sees only slots <= each token's own position (the static caches mask by position, the ONNX
session truncates its past to input_pos, see runtimes/).

Drafters propose from the sequence so far: `NgramDrafter` (prompt lookup: the tokens that
followed the last earlier occurrence of the sequence's final n-gram) and `ModelDrafter` (greedy
decoding of a smaller model's session, its own cache rewound to what the sequence shares with it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np

from cpm_mobile.runtimes.base import Session


class Drafter(Protocol):
    def propose(self, sequence: Sequence[int], k: int) -> list[int]:
        """Up to k tokens likely to follow `sequence` (its last token included; may be fewer, or none)."""


@dataclass
class NgramDrafter:
    """Prompt-lookup drafting: match the last n tokens (n = max_ngram..1) earlier in the sequence.

    The same rule as transformers' prompt_lookup_num_tokens, written here over plain token lists
    (transformers' version works on torch tensors inside its generate loop); the latest match is
    taken, since recent text predicts the continuation best.
    """

    max_ngram: int = 3

    def propose(self, sequence: Sequence[int], k: int) -> list[int]:
        tokens = list(sequence)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    return tokens[start + n : start + n + k]
        return []


class ModelDrafter:
    """A smaller model's session drafts k tokens greedily; its cache follows the target's sequence."""

    def __init__(self, session: Session):
        self.session = session
        self.cached: list[int] = []  # token ids at positions 0.. of the draft session's cache
        self.session.reset()

    def propose(self, sequence: Sequence[int], k: int) -> list[int]:
        sequence = list(sequence)
        k = min(k, self.session.max_seq_len - len(sequence) + 1)
        if k < 1:
            return []
        common = 0
        for a, b in zip(self.cached, sequence):
            if a != b:
                break
            common += 1
        start = min(common, len(sequence) - 1)  # at least one token fed: its logits give the first draft
        # A forward at `start` rewinds the draft session: its later slots are rewritten before they are read.
        logits = self.session.forward(np.asarray(sequence[start:], dtype=np.int64), start)[-1]
        self.cached = sequence
        drafts = [int(np.argmax(logits))]
        while len(drafts) < k:
            logits = self.session.forward(np.asarray(drafts[-1:], dtype=np.int64), len(self.cached))[-1]
            self.cached = self.cached + drafts[-1:]
            drafts.append(int(np.argmax(logits)))
        return drafts


@dataclass
class Verified:
    accepted: list[int]  # the drafts the model agrees with, a prefix of the drafts
    next_token: int  # the model's own token after them
    logits: np.ndarray  # the row next_token was chosen from


def verify(session: Session, token: int, drafts: Sequence[int], start_pos: int) -> Verified:
    """One forward call, T = len(drafts) + 1, at start_pos: the greedy-accepted drafts and the next token.

    The session's cache must hold positions 0..start_pos-1 of the sequence; `token` is its last
    accepted token (position start_pos). Afterwards the cache holds the sequence through the last
    accepted draft; slots beyond hold rejected drafts, overwritten by the next call.
    """
    rows = session.forward(np.asarray([token, *drafts], dtype=np.int64), start_pos)
    choices = np.argmax(rows, axis=-1)
    n = 0
    while n < len(drafts) and int(choices[n]) == drafts[n]:
        n += 1
    return Verified(list(drafts[:n]), int(choices[n]), rows[n])


@dataclass
class SpeculativeStats:
    calls: int = 0  # verification forward calls
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_call(self) -> float:
        return (self.accepted + self.calls) / self.calls if self.calls else float("nan")


class SpeculativeDecoder:
    """A token source with `decode_tokens`'s signature and output under greedy decoding, k drafts per call."""

    def __init__(self, drafter: Drafter, draft_tokens: int = 4):
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
        self.drafter = drafter
        self.draft_tokens = draft_tokens
        self.stats = SpeculativeStats()
        self._sequence: list[int] = []  # the last call's fed tokens at positions 0.., for the drafter's context

    def __call__(self, session: Session, tokens: Sequence[int], start_pos: int, max_new_tokens: int,
                 sample, stop_ids: Sequence[int] = (), timings=None) -> Iterator[int]:
        from cpm_mobile.exporter.generate import Timings, greedy

        if sample is not greedy:
            raise ValueError("speculative decoding here is exact for greedy decoding only")
        if not tokens:
            raise ValueError("speculative decoding needs at least one token to prefill")
        end = start_pos + len(tokens)
        budget = min(max_new_tokens, session.max_seq_len - end + 1)
        if budget < 1:
            raise ValueError(f"{end} positions leave no room in the artifact's {session.max_seq_len}")
        timings = timings if timings is not None else Timings()
        stops = set(stop_ids)
        # Without the earlier positions' ids (a session used by another source) the drafter sees less context.
        known = self._sequence[:start_pos] if len(self._sequence) >= start_pos else []
        sequence = known + list(tokens)  # the tokens fed to the session: sequence[i] sits at position offset + i
        offset = end - len(sequence)
        started = time.perf_counter()
        logits = session.forward(np.asarray(tokens, dtype=np.int64), start_pos)[-1]
        timings.prefill_s += time.perf_counter() - started
        timings.prefill_tokens += len(tokens)
        token, produced = int(np.argmax(logits)), 1
        self._sequence = sequence
        yield token
        while token not in stops and produced < budget:
            started = time.perf_counter()
            room = budget - produced - 1  # drafts beyond this would only be thrown away
            drafts = self.drafter.propose(sequence + [token], min(self.draft_tokens, room))[:room] if room > 0 else []
            result = verify(session, token, drafts, offset + len(sequence))
            timings.decode_s += time.perf_counter() - started
            self.stats.calls += 1
            self.stats.drafted += len(drafts)
            self.stats.accepted += len(result.accepted)
            sequence.append(token)
            for accepted in result.accepted:
                sequence.append(accepted)
                produced += 1
                timings.decode_tokens += 1
                self._sequence = sequence
                yield accepted
                if accepted in stops:
                    return
            token = result.next_token
            produced += 1
            timings.decode_tokens += 1
            self._sequence = sequence
            yield token


# -- from the command line -----------------------------------------------------------------------

def parse_speculative(value: str):
    """`ngram` or `draft:PATH` -> ("ngram", None) or ("draft", Path); InputError for anything else."""
    from pathlib import Path

    from cpm_mobile.exporter.errors import InputError

    if value == "ngram":
        return "ngram", None
    if value.startswith("draft:") and value[len("draft:"):]:
        return "draft", Path(value[len("draft:"):])
    raise InputError("--speculative", f"'{value}' is neither ngram nor draft:PATH")


def check_draft(value: str, target_bundle, target: str | None):
    """For `draft:PATH`: the draft bundle's path and the target it runs (InputError if unusable); else None.

    A draft bundle must share the target bundle's tokenizer (its ids are the target's ids); it runs
    its artifact for the same target when it has one, else its first.
    """
    from pathlib import Path

    from cpm_mobile.exporter.errors import InputError
    from cpm_mobile.exporter.generate import select_artifact

    kind, path = parse_speculative(value)
    if kind != "draft":
        return None
    manifest, artifact = select_artifact(path)  # a bad draft bundle: a one-line error naming it
    targets = [a["target"] for a in manifest["artifacts"]]
    if _vocab(path) != _vocab(Path(target_bundle)):
        raise InputError(path, f"draft bundle's tokenizer differs from {target_bundle}'s: its ids would not be "
                         "the same tokens")
    return path, target if target in targets else artifact["target"]


def open_drafter(value: str, target_bundle, target: str, max_ngram: int = 3) -> tuple[Drafter, str]:
    """The drafter `--speculative VALUE` names, and its description in words."""
    from cpm_mobile.exporter.generate import open_bundle_model

    draft = check_draft(value, target_bundle, target)
    if draft is None:
        return NgramDrafter(max_ngram), f"prompt-lookup drafts (n-grams up to {max_ngram})"
    path, draft_target = draft
    model = open_bundle_model(path, draft_target)
    return ModelDrafter(model.session), f"drafts from {path} ({draft_target} in {model.runtime})"


def _vocab(folder) -> dict[str, int]:
    from cpm_mobile.exporter.tokenizer import TextTokenizer

    return TextTokenizer.from_folder(folder).tokenizer.get_vocab(with_added_tokens=True)


class Recorded:
    """A token source that keeps the ids another one yields (to compare two runs token for token)."""

    def __init__(self, source):
        self.source = source
        self.tokens: list[int] = []

    def __call__(self, *args, **kwargs) -> Iterator[int]:
        for token in self.source(*args, **kwargs):
            self.tokens.append(token)
            yield token


def check_speculative_options(speculative: str | None, draft_tokens: int | None, compare: bool,
                              temperature: float, chat: bool, bundle, target: str | None) -> None:
    """The generate command's speculative flags make sense together, and a draft bundle is usable
    (InputError, before any artifact loads)."""
    from cpm_mobile.exporter.errors import InputError

    if speculative is None:
        for flag, given in (("--draft-tokens", draft_tokens is not None), ("--compare", compare)):
            if given:
                raise InputError(flag, "goes with --speculative")
        return
    parse_speculative(speculative)
    if temperature > 0:
        raise InputError("--speculative", "is exact for greedy decoding only: drop --temperature")
    if compare and chat:
        raise InputError("--compare", "goes with --prompt, not --chat")
    check_draft(speculative, bundle, target)
