"""Generate text from a bundle's artifact, in its own runtime (the same sessions the check uses).

Plain functions, in the style of gpt-fast, so each piece can be swapped on its own:

- a sampler turns one logits row into a token id (`make_sampler`: greedy, temperature, top-p);
- `decode_tokens` feeds tokens into a runtime Session (one prefill call, then one decode call
  per token through the artifact's KV cache) and yields each sampled token as it comes;
- `TextStream` turns those ids into text as they arrive (a byte-level BPE piece that is not
  valid UTF-8 alone is held until the character is complete);
- `Chat` keeps a conversation: renders the bundle's chat template, prefills only what the KV
  cache does not hold yet, stops at the manifest's EOS ids.

Another token source with the same shape as `decode_tokens` (a speculative decoder: draft k
tokens, verify them in one forward call with T=k) plugs into `Chat` and `complete` unchanged.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from cpm_mobile.exporter.contract import read_manifest
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.tokenizer import read_json_object
from cpm_mobile.runtimes.base import Session, open_session

Sampler = Callable[[np.ndarray], int]


# -- sampling ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: sample among the most likely tokens whose mass reaches top_p
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def make_sampler(sampling: Sampling) -> Sampler:
    """One logits row [V] -> one token id. Greedy at temperature 0; seeded, so a run repeats exactly."""
    if sampling.temperature == 0:
        return greedy
    rng = np.random.default_rng(sampling.seed)

    def sample(logits: np.ndarray) -> int:
        scaled = np.asarray(logits, dtype=np.float64) / sampling.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if sampling.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            keep = int(np.searchsorted(np.cumsum(probs[order]), sampling.top_p)) + 1
            kept = order[:keep]
            return int(kept[rng.choice(keep, p=probs[kept] / probs[kept].sum())])
        return int(rng.choice(probs.size, p=probs))

    return sample


# -- the token loop ------------------------------------------------------------------------------

@dataclass
class Timings:
    """Wall time of the session calls: one prefill call, then one call per decoded token."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else float("nan")


class TokenSource(Protocol):
    """What Chat and complete run: `decode_tokens`, or anything with its signature (a speculative decoder)."""

    def __call__(self, session: Session, tokens: Sequence[int], start_pos: int, max_new_tokens: int,
                 sample: Sampler, stop_ids: Sequence[int] = (), timings: Timings | None = None) -> Iterator[int]: ...


def decode_tokens(
    session: Session,
    tokens: Sequence[int],
    start_pos: int,
    max_new_tokens: int,
    sample: Sampler,
    stop_ids: Sequence[int] = (),
    timings: Timings | None = None,
) -> Iterator[int]:
    """Prefill `tokens` at positions start_pos.., then decode; yield every sampled token.

    The session's cache must hold the sequence's first start_pos positions already (0: a new
    sequence). A stop token is yielded (the caller decides whether to show it) and ends the loop;
    the last token yielded is never fed back, so the cache then holds start_pos + len(tokens) +
    generated - 1 positions. At most max_seq_len positions are ever used.
    """
    if not tokens:
        raise ValueError("decode_tokens needs at least one token to prefill")
    end = start_pos + len(tokens)
    budget = min(max_new_tokens, session.max_seq_len - end + 1)
    if budget < 1:
        raise ValueError(f"{end} positions leave no room in the artifact's {session.max_seq_len}")
    timings = timings if timings is not None else Timings()
    stops = set(stop_ids)
    started = time.perf_counter()
    logits = session.forward(np.asarray(tokens, dtype=np.int64), start_pos)[-1]
    timings.prefill_s += time.perf_counter() - started
    timings.prefill_tokens += len(tokens)
    for index in range(budget):
        token = sample(logits)
        yield token
        if token in stops or index == budget - 1:
            return
        started = time.perf_counter()
        logits = session.forward(np.asarray([token], dtype=np.int64), end + index)[-1]
        timings.decode_s += time.perf_counter() - started
        timings.decode_tokens += 1


# -- text ----------------------------------------------------------------------------------------

class TextStream:
    """Token ids in, text out as soon as it is complete (tokenizers' own incremental decoder)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer  # a tokenizers.Tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token: int) -> str:
        """The text this token completes ('' while a multi-byte character is still partial)."""
        return self._stream.step(self._tokenizer, token) or ""


def complete(
    session: Session,
    prompt_ids: Sequence[int],
    tokenizer,
    max_new_tokens: int,
    sample: Sampler = greedy,
    stop_ids: Sequence[int] = (),
    timings: Timings | None = None,
    source: TokenSource = decode_tokens,
) -> Iterator[str]:
    """Continue a prompt in a new sequence: text pieces as they are produced (stop tokens not shown)."""
    session.reset()
    stream = TextStream(tokenizer)
    stops = set(stop_ids)
    for token in source(session, prompt_ids, 0, max_new_tokens, sample, stop_ids, timings):
        if token not in stops:
            piece = stream.push(token)
            if piece:
                yield piece


# -- chat ----------------------------------------------------------------------------------------

def render_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                **special_tokens: Any) -> str:
    """The chat template applied as transformers applies it: same sandboxed Jinja environment and helpers.

    Written here rather than calling transformers, which is a heavy import and not a dependency of
    the package; tests compare the two.
    """
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
    )


@dataclass
class ChatTemplate:
    template: str
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the template may refer to them

    @classmethod
    def from_folder(cls, folder: Path) -> "ChatTemplate":
        """The chat template a bundle ships: tokenizer_config.json's chat_template (or chat_template.jinja)."""
        config_path = folder / "tokenizer_config.json"
        config = read_json_object(config_path)
        template = config.get("chat_template")
        if isinstance(template, list):  # the named-templates form: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not template and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(template, str) or not template:
            raise InputError(config_path, "has no chat_template: this model has no chat format (use --prompt)")
        tokens = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                tokens[key] = value
        return cls(template, tokens)

    def render(self, messages: list[dict[str, str]]) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return render_chat(self.template, messages, add_generation_prompt=True, **self.special_tokens)
        except TemplateError as exc:
            raise InputError("tokenizer_config.json", f"chat_template failed: {exc}") from None


@dataclass
class Chat:
    """A multi-turn conversation on one session: each turn prefills only what its cache lacks."""

    session: Session
    tokenizer: Any  # a tokenizers.Tokenizer
    template: ChatTemplate
    stop_ids: Sequence[int]
    system: str | None = None
    source: TokenSource = decode_tokens
    messages: list[dict[str, str]] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # the token ids at positions 0.. of the session's cache
    last_prompt_ids: list[int] = field(default_factory=list)
    last_start_pos: int = 0

    def __post_init__(self) -> None:
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.session.reset()

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        # As transformers' apply_chat_template(tokenize=True): special tokens come from the template only.
        return self.tokenizer.encode(self.template.render(messages), add_special_tokens=False).ids

    def reply(self, text: str, max_new_tokens: int, sample: Sampler = greedy,
              timings: Timings | None = None) -> Iterator[str]:
        """The assistant's answer to `text`, as text pieces while it is generated; ends at EOS."""
        self.messages.append({"role": "user", "content": text})
        ids = self._fit_context()
        self.last_prompt_ids = ids
        start = self._prefill_start(ids)
        self.last_start_pos = start
        stream, stops, generated = TextStream(self.tokenizer), set(self.stop_ids), []
        answer: list[str] = []
        self.cached = []  # unknown until the prefill has run
        try:
            for token in self.source(self.session, ids[start:], start, max_new_tokens, sample, self.stop_ids, timings):
                # Every token but the newest has been fed back, so the cache holds ids + generated[:-1].
                self.cached = ids + generated
                generated.append(token)
                if token in stops:
                    continue
                piece = stream.push(token)
                if piece:
                    answer.append(piece)
                    yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})

    def _prefill_start(self, ids: list[int]) -> int:
        """Where this turn's prefill starts: after the cached prefix it shares (the session rewinds to there),
        with at least one token to prefill, whose logits choose the first reply token."""
        return min(_common_prefix(self.cached, ids), len(ids) - 1)

    def _fit_context(self) -> list[int]:
        """The rendered conversation, dropping the oldest exchanges while it leaves no room to answer."""
        ids = self.encode(self.messages)
        first = 1 if self.messages[0]["role"] == "system" else 0
        while len(ids) >= self.session.max_seq_len and len(self.messages) - first > 1:
            del self.messages[first : first + 2]  # the oldest user message and its answer
            ids = self.encode(self.messages)
        if len(ids) >= self.session.max_seq_len:
            raise InputError("chat", f"the message is {len(ids)} tokens with the template; the artifact holds "
                             f"{self.session.max_seq_len} positions")
        return ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- a bundle ------------------------------------------------------------------------------------

@dataclass
class BundleModel:
    """One artifact of a bundle opened in its runtime, with what generation needs from the manifest."""

    folder: Path
    target: str
    session: Session
    runtime: str  # which runtime runs it, in words
    eos_ids: list[int]
    passed_check: bool | None


def select_artifact(folder: str | Path, target: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bundle's manifest and `target`'s entry in it (default: the first artifact); InputError if absent."""
    folder = Path(folder)
    manifest = read_manifest(folder).dump()  # validated against the typed contract
    artifacts = {a["target"]: a for a in manifest["artifacts"]}
    if not artifacts:
        raise InputError(folder / "manifest.json", "lists no artifact")
    if target is None:
        target = next(iter(artifacts))
    elif target not in artifacts:
        raise InputError(folder, f"bundle has no {target} artifact (has {', '.join(artifacts)})")
    return manifest, artifacts[target]


def open_bundle_model(folder: str | Path, target: str | None = None) -> BundleModel:
    """Open `target`'s artifact (default: the bundle's first) in the runtime the check uses."""
    folder = Path(folder)
    manifest, artifact = select_artifact(folder, target)
    target = artifact["target"]
    session = open_session(folder, artifact)
    runtime = getattr(session, "runtime_name", target)
    report = folder / "report.json"
    passed = read_json_object(report).get("passed") if report.is_file() else None
    return BundleModel(folder, target, session, runtime, list(manifest.get("model", {}).get("eos_ids", [])), passed)


def peak_memory_mib() -> float:
    """This process's peak resident memory (VmHWM: its own, unlike ru_maxrss which inherits across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
