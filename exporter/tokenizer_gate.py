"""The tokenizer gate: every stock client's own tokenizer encodes text as the checkpoint's tokenizer does.

An app does not run our tokenizer: ExecuTorch's TextLLMRunner encodes the prompt with the C++
tokenizers of `pytorch_tokenizers` (it tries, in this order, HFTokenizer on tokenizer.json,
Tiktoken, sentencepiece and llama2.c on the path it is given, and takes the first that loads), and
onnxruntime-genai with its own tokenizer (ort-extensions) reading tokenizer.json and
tokenizer_config.json from the model folder. Each implements part of what `tokenizers` and
sentencepiece do, so the bundle's promise (the app gets the report's text) holds only where the
client is exact on this bundle's tokenizer. This module

- decides, from the tokenizer's kind, what each client loads and whether it can be exact
  (`client_routes`; measured on every kind in tests/test_tokenizer_gate.py):

  | kind | ExecuTorch (TextLLMRunner) | onnxruntime-genai |
  |---|---|---|
  | byte-level BPE tokenizer.json, no normaliser | the bundle folder: exact | the bundle folder: exact |
  | byte-level BPE tokenizer.json with NFC (Qwen's) | the bundle folder: not (its NFC decomposes 'é', breaks Hangul) | not (no normaliser applied) |
  | sentencepiece BPE, identity normalisation, byte fallback (Llama's) | `executorch_tokenizer/`: tokenizer.json without the decoder's Strip (the C++ decoder strips every token, not only the first): exact | tokenizer_module.json names GemmaTokenizer (its sentencepiece BPE without regex splitting): exact |
  | sentencepiece BPE (identity or NFKC, user-defined pieces or not) without byte fallback, added tokens or special tokens in the chat template | `tokenizer.model` (sentencepiece itself): exact | not (id -1 for unknown characters; the normaliser ignored) |
  | sentencepiece BPE with NFKC (or any charsmap) and byte fallback, added tokens or not | `executorch_tokenizer/`: tokenizer.json whose normaliser spells the charsmap as Replace rules (exporter.tokenizer_cpp_json, each key checked): exact | not (its BPE applies no normaliser) |
  | sentencepiece BPE with user-defined pieces, and byte fallback or added tokens | `tokenizer.model`: not (added tokens are encoded as text, byte pieces decoded as "<0xE6>"; the C++ Split drops the text around user-defined pieces) | not (user-defined pieces split) |
  | sentencepiece BPE with NFKC, no byte fallback, added tokens | `tokenizer.model`: not (added tokens are encoded as text) | not (the normaliser ignored) |
  | sentencepiece BPE, identity, no byte fallback, added tokens | `executorch_tokenizer/`: not (one <unk> per unknown character) | not (id -1) |
  | sentencepiece unigram | `tokenizer.model`: not (ties between equal-score segmentations) | not (the same ties) |

- writes the files a client needs (`write_client_files`) and names them in each artifact's manifest
  metadata (`metadata.tokenizer`: client, path, exact, note), where an integrator reads them;
- runs each client as the app runs it on the held-out text, the recipe's prompts and a fixed set of
  hard strings (`run_gate`): the ids must equal the checkpoint tokenizer's, and the client's
  decoding of those ids, streamed token by token as the app gets it, must equal the checkpoint
  tokenizer's text. A client claimed exact that differs fails the check, with the first differing
  position, both id sequences and the client named; a client that cannot be exact is reported
  `unsupported` with its one-line reason (and what it measured), never passed silently.

Encoding only: no model runs. Core ML has no stock tokenizer client, and ONNX without
genai_config.json has none either (the app feeds ids): the report says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cpm_mobile.exporter.targets import registry
from cpm_mobile.exporter.tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, TextTokenizer
from cpm_mobile.exporter.tokenizer_cpp_json import cpp_form
from cpm_mobile.exporter.tokenizer_spm import BPE_MODEL_TYPE, MODEL_TYPES, SPM_MODEL, read_proto

# The stock clients, as the targets declare them (Capabilities.tokenizer_client in exporter/targets/<name>/spec.py).
EXECUTORCH = "ExecuTorch TextLLMRunner"
GENAI = "onnxruntime-genai"
ET_FOLDER = "executorch_tokenizer"  # a tokenizer.json + tokenizer_config.json TextLLMRunner loads as a folder
GENAI_MODULE = "tokenizer_module.json"  # ort-extensions merges it over tokenizer_config.json; transformers ignores it
# Measured (tests/test_tokenizer_gate.py): pytorch_tokenizers' NFCNormalizer turns 'é' into 'e' + U+0301 and a
# Hangul syllable into other bytes, so no byte-level tokenizer.json with NFC is exact in the C++ HFTokenizer.
NFC_IN_CPP = ("its C++ NFC normaliser decomposes precomposed characters ('é', 'Å') and breaks Hangul syllables "
              "(the bundle folder's tokenizer.json)")
NO_GENAI = "no genai_config.json: onnxruntime-genai does not run this folder, the app feeds ids from tokenizer.json"

# Strings a tokenizer gets wrong first: normalisation (full-width forms, ligatures, compatibility
# characters, combining accents), byte fallback (emoji, CJK), whitespace (runs of spaces, tabs,
# newlines, leading and trailing spaces). The chat template's special tokens are added per tokenizer.
HARD_STRINGS: tuple[tuple[str, str], ...] = (
    ("full-width forms", "Ｆｕｌｌ-width ｔｅｘｔ and ＡＢＣ１２３！"),
    ("ligatures and compatibility forms", "ﬁ ﬂ ﬃ ½ ① ㎏ ™ Ⅻ"),
    ("combining accents", "e\u0301te\u0301 cafe\u0301 nai\u0308ve A\u030a vs été café naïve Å"),
    ("emoji", "emoji 🙂👍🏽 👨‍👩‍👧 🇫🇷 done"),
    ("CJK", "東京の天気 中文字符 한국어 텍스트"),
    ("runs of spaces", "a  b   c    d     e"),
    ("tabs", "\tindented\twith\t\ttabs\t"),
    ("newlines", "line one\nline two\n\n\nline five\r\nwindows"),
    ("leading and trailing spaces", "   leading and trailing   "),
    ("code", "    def f(x):\n        return x ** 2  # square\n"),
)


# -- what each client loads ------------------------------------------------------------------------

@dataclass
class Kind:
    """What a client's tokenizer has to reproduce, read from the tokenizer itself."""

    source: str  # "sentencepiece" (converted from tokenizer.model) or "tokenizer.json"
    model: str  # "BPE", "Unigram", ...
    byte_fallback: bool
    byte_level: bool  # ByteLevel pre-tokenizer and decoder (GPT-2 style)
    llama_form: bool  # normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer: Llama 2's tokenizer.json
    normalization: str  # sentencepiece's rule name ("identity", "nmt_nfkc", ...) or the normalizer types
    precompiled: bool  # a Precompiled (sentencepiece charsmap) normalizer
    user_defined: tuple[str, ...] = ()  # sentencepiece user-defined pieces
    added: tuple[str, ...] = ()  # tokens beyond the sentencepiece model (tokenizer_config / added_tokens.json)
    template_specials: tuple[str, ...] = ()  # special tokens the chat template writes as text
    remove_extra_whitespaces: bool = False
    cpp_form: str | None = None  # how tokenizer.json is rewritten for the C++ HFTokenizer (tokenizer_cpp_json)
    cpp_refusal: str = ""  # why it cannot be, when cpp_form is None

    def describe(self) -> str:
        if self.source == "sentencepiece":
            parts = [f"sentencepiece {self.model.lower()}", f"{self.normalization} normalisation",
                     "byte fallback" if self.byte_fallback else "no byte fallback"]
            if self.user_defined:
                parts.append(f"{len(self.user_defined)} user-defined pieces")
            if self.added:
                parts.append(f"{len(self.added)} added tokens")
            return ", ".join(parts)
        return f"tokenizer.json {'byte-level ' if self.byte_level else ''}{self.model}"


def describe(tokenizer: TextTokenizer) -> Kind:
    data = json.loads(tokenizer.tokenizer.to_str())
    model = data.get("model") or {}
    normalizer, pre, decoder = data.get("normalizer"), data.get("pre_tokenizer"), data.get("decoder")
    byte_level = _has_type(pre, "ByteLevel") and _has_type(decoder, "ByteLevel")
    llama_form = (model.get("type") == "BPE" and pre is None and normalizer is not None
                  and normalizer.get("type") == "Sequence"
                  and [n.get("type") for n in normalizer.get("normalizers", [])] == ["Prepend", "Replace"])
    chat = f"{tokenizer.chat_template() or ''}{chat_example(tokenizer) or ''}"
    specials = [t.content for t in tokenizer.tokenizer.get_added_tokens_decoder().values()]
    kind = Kind(
        source="tokenizer.json", model=str(model.get("type")), byte_fallback=bool(model.get("byte_fallback")),
        byte_level=byte_level, llama_form=llama_form, normalization="+".join(_types(normalizer)) or "none",
        precompiled=_has_type(normalizer, "Precompiled"),
        template_specials=tuple(t for t in specials if t in chat),
    )
    form, how = cpp_form(data)
    kind.cpp_form, kind.cpp_refusal = (how, "") if form is not None else (None, how)
    if tokenizer.source is None or tokenizer.source.name != SPM_MODEL:
        return kind
    proto = read_proto(tokenizer.source)
    spec = proto.normalizer_spec
    pieces = len(proto.pieces)
    added = sorted((i, t.content) for i, t in tokenizer.tokenizer.get_added_tokens_decoder().items() if i >= pieces)
    kind.source = "sentencepiece"
    kind.model = {"bpe": "BPE", "unigram": "Unigram"}[MODEL_TYPES[proto.trainer_spec.model_type]]
    kind.byte_fallback = proto.trainer_spec.byte_fallback
    kind.normalization = spec.name or ("custom" if spec.precompiled_charsmap else "identity")
    kind.precompiled = bool(spec.precompiled_charsmap)
    kind.user_defined = tuple(p.piece for p in proto.pieces if p.type == 4)
    kind.added = tuple(content for _, content in added)
    kind.remove_extra_whitespaces = spec.remove_extra_whitespaces
    return kind


@dataclass
class Route:
    """What one client loads from the bundle, and whether it can be exact on this tokenizer."""

    client: str
    path: str  # relative to the bundle: "." is the bundle folder
    exact: bool
    note: str  # what it reads; when not exact, why (one line)
    module: dict[str, Any] | None = None  # onnxruntime-genai: tokenizer_module.json's content
    loads_as: str | None = None  # ExecuTorch: the C++ tokenizer TextLLMRunner picks on `path`

    def metadata(self) -> dict[str, Any]:
        return {"client": self.client, "path": self.path, "exact": self.exact, "note": self.note}


def client_routes(tokenizer: TextTokenizer, bundle_has_spm: bool = True) -> dict[str, Route]:
    """The client -> Route table for this tokenizer (the module docstring's table, as code)."""
    kind = describe(tokenizer)
    return {EXECUTORCH: _executorch_route(kind, bundle_has_spm), GENAI: _genai_route(kind)}


def _executorch_route(kind: Kind, has_spm: bool) -> Route:
    if kind.byte_level and kind.model == "BPE" and kind.normalization == "none":
        return Route(EXECUTORCH, ".", True, "the bundle folder: tokenizer.json in its C++ HFTokenizer")
    if kind.byte_level and kind.model == "BPE" and kind.normalization == "NFC":
        return Route(EXECUTORCH, ".", False, NFC_IN_CPP)
    spm_exact_reasons = _sentencepiece_runner_limits(kind)
    if kind.llama_form:
        if kind.byte_fallback:
            return Route(EXECUTORCH, ET_FOLDER, True,
                         f"{ET_FOLDER}/: tokenizer.json in its C++ HFTokenizer, decoder without Strip (it decodes token "
                         "by token)")
        if kind.source == "sentencepiece" and has_spm and not spm_exact_reasons:
            return Route(EXECUTORCH, SPM_MODEL, True, f"{SPM_MODEL} in its sentencepiece tokenizer")
        return Route(EXECUTORCH, ET_FOLDER, False,
                     "without byte fallback sentencepiece turns a run of unknown characters into one <unk>, its "
                     "HFTokenizer into one <unk> per character"
                     + (f"; with {SPM_MODEL} {'; '.join(spm_exact_reasons)}" if kind.source == "sentencepiece" else ""))
    if kind.source == "sentencepiece" and kind.model == "BPE" and kind.byte_fallback and kind.cpp_form is not None:
        return Route(EXECUTORCH, ET_FOLDER, True, f"{ET_FOLDER}/: tokenizer.json in its C++ HFTokenizer, with "
                     f"{kind.cpp_form}; decoder without Strip (it decodes token by token)")
    if kind.source == "sentencepiece" and has_spm:
        why_not_json = _hf_cpp_limits(kind)
        if not spm_exact_reasons:
            return Route(EXECUTORCH, SPM_MODEL, True,
                         f"{SPM_MODEL} in its sentencepiece tokenizer (its HFTokenizer cannot load {why_not_json})")
        return Route(EXECUTORCH, SPM_MODEL, False,
                     f"its HFTokenizer cannot load {why_not_json}, and with {SPM_MODEL} {'; '.join(spm_exact_reasons)} "
                     "(plain text encodes exactly)")
    return Route(EXECUTORCH, ".", False, f"its HFTokenizer reads byte-level BPE and Llama-style tokenizer.json, this is "
                 f"{kind.describe()} ({kind.normalization} normalizer)")


def _sentencepiece_runner_limits(kind: Kind) -> list[str]:
    """Why TextLLMRunner's sentencepiece tokenizer (pytorch_tokenizers' SPTokenizer) differs, if it does."""
    reasons = []
    if kind.added:
        reasons.append(f"the added tokens ({_names(kind.added)}) are not in {SPM_MODEL}: it encodes them as text")
    elif kind.template_specials:
        reasons.append(f"it encodes the chat template's special tokens ({_names(kind.template_specials)}) as text")
    if kind.byte_fallback:
        reasons.append("it decodes byte-fallback pieces as text such as '<0xE6>' (only <0x0A> is mapped)")
    if kind.model == "Unigram":
        reasons.append(_UNIGRAM_TIES)
    return reasons


_UNIGRAM_TIES = ("it resolves ties between equal-score unigram segmentations (such as a run of '*') unlike "
                 "sentencepiece")


def _names(tokens: tuple[str, ...]) -> str:
    return ", ".join(tokens[:3]) + (", ..." if len(tokens) > 3 else "")


def _hf_cpp_limits(kind: Kind) -> str:
    if kind.model != "BPE":
        return f"a {kind.model.lower()} tokenizer.json"
    if kind.cpp_refusal:
        return kind.cpp_refusal
    if kind.precompiled:
        return f"the {kind.normalization} normaliser (a Precompiled charsmap)"
    if kind.user_defined:
        return "the Metaspace pre-tokenizer that keeps user-defined pieces whole"
    return "this tokenizer.json's normalizer and pre-tokenizer"


def _genai_route(kind: Kind) -> Route:
    if kind.byte_level and kind.model == "BPE" and kind.normalization == "none":
        return Route(GENAI, ".", True, "the bundle folder: tokenizer.json, tokenizer_config.json")
    if kind.byte_level and kind.model == "BPE" and kind.normalization == "NFC":
        return Route(GENAI, ".", False, "its BPE applies no normaliser: decomposed text ('e\u0301', 'A\u030a') is "
                                        "not composed as NFC composes it")
    if kind.llama_form:
        if kind.byte_fallback:
            return Route(GENAI, ".", True,
                         f"tokenizer.json with {GENAI_MODULE} naming GemmaTokenizer (sentencepiece BPE without regex "
                         "splitting)", module={"tokenizer_class": "GemmaTokenizer"})
        return Route(GENAI, ".", False, "without byte fallback it returns id -1 for characters outside the vocabulary")
    reasons = []
    if kind.source == "sentencepiece" and kind.model == "Unigram":
        reasons.append(_UNIGRAM_TIES)
        if kind.byte_fallback:
            reasons.append("its unigram tokenizer has no byte fallback")
        if not kind.remove_extra_whitespaces:
            reasons.append("its unigram tokenizer always collapses runs of spaces")
    elif kind.source == "sentencepiece":
        if kind.precompiled:
            reasons.append(f"its BPE tokenizer ignores the {kind.normalization} normaliser (full-width forms, "
                           "ligatures, whitespace)")
        if kind.user_defined:
            reasons.append("it does not keep user-defined pieces whole")
        if not kind.byte_fallback:
            reasons.append("without byte fallback it returns id -1 for characters outside the vocabulary")
        if not reasons:
            reasons.append("its BPE tokenizer approximates sentencepiece's whitespace handling")
    else:
        reasons.append(f"it reads byte-level and Llama-style BPE tokenizer.json, this is {kind.describe()} "
                       f"({kind.normalization} normalizer)")
    return Route(GENAI, ".", False, "; ".join(reasons))


# -- the files ---------------------------------------------------------------------------------------

def write_client_files(tokenizer: TextTokenizer, folder: Path, artifacts: list[dict[str, Any]]) -> list[str]:
    """Write what the clients of `artifacts` load (beside write_bundle_files' files), and name each
    client's route in its artifact's metadata.tokenizer. Returns the names written."""
    folder = Path(folder)
    routes = client_routes(tokenizer, (folder / SPM_MODEL).is_file())
    written: list[str] = []
    clients = {client_of(a) for a in artifacts}
    executorch, genai = routes[EXECUTORCH], routes[GENAI]
    if EXECUTORCH in clients and executorch.path == ET_FOLDER:
        written += _write_executorch_folder(folder)
    if GENAI in clients and genai.module is not None:
        (folder / GENAI_MODULE).write_text(json.dumps(genai.module, indent=2) + "\n", encoding="utf-8")
        written.append(GENAI_MODULE)
    if EXECUTORCH in clients:
        executorch.loads_as, error = executorch_loader(folder / executorch.path)
        if executorch.exact and executorch.loads_as not in _EXPECTED_LOADERS.get(executorch.path, ("HFTokenizer",)):
            executorch.exact = False
            executorch.note = f"TextLLMRunner does not load {executorch.path} as expected ({error or executorch.loads_as})"
    for artifact in artifacts:
        client = client_of(artifact)
        artifact.setdefault("metadata", {})["tokenizer"] = (
            routes[client].metadata() if client is not None else {"client": None, "note": _no_client_note(artifact)})
    return written


def client_of(artifact: dict[str, Any]) -> str | None:
    """The stock client that runs this artifact with its own tokenizer, if there is one."""
    client = registry.capabilities(artifact["target"]).tokenizer_client
    if client == GENAI and not (artifact.get("metadata") or {}).get("genai_config"):
        return None
    return client


_EXPECTED_LOADERS = {SPM_MODEL: ("SPTokenizer",)}


def _write_executorch_folder(folder: Path) -> list[str]:
    """tokenizer.json in the form the C++ HFTokenizer applies as `tokenizers` applies the original
    (exporter.tokenizer_cpp_json), and the tokenizer_config.json fields it reads (bos_token / eos_token as strings)."""
    data, why_not = cpp_form(json.loads((folder / TOKENIZER_JSON).read_text(encoding="utf-8")))
    if data is None:
        raise ValueError(f"{ET_FOLDER} chosen for a tokenizer the C++ HFTokenizer cannot read: {why_not}")
    config = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    keep = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "add_bos_token", "add_eos_token",
                                   "model_max_length") if config.get(k) is not None}
    target = folder / ET_FOLDER
    target.mkdir(exist_ok=True)
    (target / TOKENIZER_JSON).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (target / TOKENIZER_CONFIG).write_text(json.dumps(keep, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [f"{ET_FOLDER}/{TOKENIZER_JSON}", f"{ET_FOLDER}/{TOKENIZER_CONFIG}"]


def _no_client_note(artifact: dict[str, Any]) -> str:
    return registry.capabilities(artifact["target"]).tokenizer_client_refusal or NO_GENAI


# -- the clients -------------------------------------------------------------------------------------

def executorch_loader(path: Path):
    """The C++ tokenizer TextLLMRunner(model, path) uses: the first of HFTokenizer, Tiktoken, sentencepiece
    and llama.c that loads `path` (ExecuTorch's load_tokenizer), as (name, None) or (None, error)."""
    tokenizer, name = _load_executorch(path)
    return (name, None) if tokenizer is not None else (None, f"no tokenizer kind loads {path.name}")


def _load_executorch(path: Path):
    import pytorch_tokenizers as pt

    candidates = [("HFTokenizer", pt.CppHFTokenizer), ("Tiktoken", pt.CppTiktoken), ("SPTokenizer", pt.CppSPTokenizer),
                  ("Llama2cTokenizer", pt.CppLlama2cTokenizer)]
    for name, cls in candidates:
        tokenizer = cls()
        try:
            tokenizer.load(str(path))
        except Exception:  # the bindings raise RuntimeError("Failed to load ...") when a kind does not fit
            continue
        return tokenizer, name
    return None, None


@dataclass
class Client:
    name: str
    loads: str  # what it was given, relative to the bundle
    loaded_as: str | None
    encode: Callable[[str], list[int]] | None
    stream: Callable[[list[int]], list[str]] | None  # the text pieces an app receives for ids after the first
    error: str | None = None
    missing: bool = False  # the client's library is not installed here: not run (said, not passed as exact)


def _executorch_client(bundle: Path, path: str) -> Client:
    tokenizer, name = _load_executorch(bundle / path)
    if tokenizer is None:
        return Client(EXECUTORCH, path, None, None, None, f"TextLLMRunner cannot load a tokenizer from {path}")
    batch = getattr(tokenizer, "decode_batch", None)

    def encode(text: str) -> list[int]:
        return [int(i) for i in tokenizer.encode(text, 1, 0)]  # GenerationConfig(num_bos=1, num_eos=0)

    def stream(ids: list[int]) -> list[str]:
        # TextLLMRunner hands the app decode(prev, cur) for each new token. The Python binding returns str,
        # so a token that is only part of a UTF-8 character is decoded together with the next ones.
        pieces, pending = [], []
        for token in ids[1:]:
            pending.append(token)
            try:
                pieces.append(tokenizer.decode(pending[0]) if len(pending) == 1 else batch(pending))
                pending = []
            except (ValueError, UnicodeDecodeError):
                if batch is None or len(pending) >= 8:
                    pieces.append("\ufffd")
                    pending = []
        if pending:
            pieces.append("\ufffd")
        return pieces

    return Client(EXECUTORCH, path, name, encode, stream)


def _genai_client(bundle: Path, path: str) -> Client:
    import numpy as np

    try:
        import onnxruntime_genai as og
    except ImportError:
        return Client(GENAI, path, None, None, None, "onnxruntime-genai is not installed here (pip install "
                      "onnxruntime-genai): the client was not run", missing=True)

    try:
        tokenizer = og.Tokenizer(og.Config(str(bundle / path)))
        tokenizer.update_options(add_special_tokens="true")  # the README's setting: the BOS the check encodes
    except Exception as exc:
        return Client(GENAI, path, None, None, None, f"og.Tokenizer fails: {' '.join(str(exc).split())[:200]}")

    def encode(text: str) -> list[int]:
        return [int(i) for i in np.asarray(tokenizer.encode(text)).astype(np.int64)]

    def stream(ids: list[int]) -> list[str]:
        decoder = tokenizer.create_stream()
        decoder.decode(ids[0])
        pieces = []
        for token in ids[1:]:
            try:
                pieces.append(decoder.decode(token))
            except (ValueError, UnicodeDecodeError):
                pieces.append("\ufffd")
        return pieces

    return Client(GENAI, path, "og.Tokenizer", encode, stream)


# -- the gate ----------------------------------------------------------------------------------------

def gate_texts(tokenizer: TextTokenizer, heldout_text: str = "", prompts: list[str] | tuple[str, ...] = ()
               ) -> list[tuple[str, str]]:
    """(label, text): the held-out text, the recipe's prompts, the hard strings, and the chat template's
    special tokens (a rendered conversation, and each added token inside text)."""
    texts = [("held-out text", heldout_text)] if heldout_text else []
    texts += [(f"prompt {i}", p) for i, p in enumerate(prompts)]
    texts += list(HARD_STRINGS)
    chat = chat_example(tokenizer)
    if chat:
        texts.append(("chat template", chat))
    specials = describe(tokenizer).template_specials  # the ones an app sends as text
    if specials:
        texts.append(("chat template's special tokens in text", " ".join(f"x{t}y {t}\n{t}z" for t in specials)))
    return [(label, text) for label, text in texts if text]


def chat_example(tokenizer: TextTokenizer) -> str | None:
    """A conversation rendered with the checkpoint's chat template (None without one, or when it does not render)."""
    template = tokenizer.chat_template()
    if not isinstance(template, str) or not template:
        return None
    from cpm_mobile.exporter.generate import render_chat

    tokens = {k: v for k, v in ((k, _content(tokenizer.config.get(k))) for k in
                                ("bos_token", "eos_token", "unk_token", "pad_token")) if v}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The interpreter reads the file"},
                {"role": "assistant", "content": "  It reads\tit.\n"}, {"role": "user", "content": "東京 ﬁ 🙂"}]
    try:
        return render_chat(template, messages, add_generation_prompt=True, **tokens)
    except Exception:  # a template that needs what we do not pass: the special tokens in text still run
        return None


def run_gate(reference: TextTokenizer, bundle: Path, artifacts: list[dict[str, Any]],
             texts: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """The tokenizer entry of each artifact's report: its stock client against `reference` (the
    checkpoint's own tokenizer) on `texts`. Clients are loaded from `bundle` as its manifest says."""
    bundle = Path(bundle)
    expected = [(label, text, reference.encode(text)) for label, text in texts]
    reference_check = _reference_check(reference, expected)
    specials = set(reference.tokenizer.get_added_tokens_decoder())
    results: dict[tuple[str, str], dict[str, Any]] = {}
    entries: dict[str, dict[str, Any]] = {}
    for artifact in artifacts:
        target = artifact["target"]
        meta = (artifact.get("metadata") or {}).get("tokenizer")
        client = client_of(artifact)
        if client is None:
            note = (meta or {}).get("note") or _no_client_note(artifact)
            entries[target] = _entry(None, None, "no client", note, None, reference_check, texts, expected)
            continue
        # A bundle written before this gate names no route: the README then said "the bundle folder".
        path, claimed, note = (meta["path"], bool(meta["exact"]), meta.get("note", "")) if meta else (".", True, "")
        key = (client, path)
        if key not in results:
            runner = _executorch_client(bundle, path) if client == EXECUTORCH else _genai_client(bundle, path)
            results[key] = {"client": runner, "mismatch": _first_mismatch(runner, expected, reference, specials)}
        runner, mismatch = results[key]["client"], results[key]["mismatch"]
        status = "exact" if mismatch is None else "mismatch" if claimed else "unsupported"
        if not claimed and mismatch is None:
            status = "unsupported"  # exact on these strings, but not in general (the note says why)
        if runner.missing:
            status, note, mismatch = "not run", runner.error, None
        entries[target] = _entry(runner, path, status, note, mismatch, reference_check, texts, expected)
    return entries


def _entry(runner: Client | None, path: str | None, status: str, note: str, mismatch: dict | None,
           reference_check: dict[str, Any], texts, expected) -> dict[str, Any]:
    reference_failed = reference_check["status"] == "mismatch"
    passed = status in ("exact", "unsupported", "no client", "not run") and not reference_failed
    breaches = []
    if status == "mismatch":
        breaches.append(f"{runner.name} ({path}): {_describe_mismatch(mismatch)}")
    if reference_failed:
        breaches.append(f"{reference_check['encoder']}: {_describe_mismatch(reference_check['mismatch'])}")
    return {
        "client": runner.name if runner is not None else None,
        "loads": path,
        "loaded_as": runner.loaded_as if runner is not None else None,
        "status": status,
        "note": note,
        "strings": len(texts),
        "tokens": sum(len(ids) for _, _, ids in expected),
        "mismatch": mismatch,
        "reference": reference_check,
        "breaches": breaches,
        "passed": passed,
    }


def _reference_check(reference: TextTokenizer, expected) -> dict[str, Any]:
    """For a sentencepiece checkpoint, the check's own encoder (tokenizers, on the converted tokenizer.json,
    what `cpm-mobile generate` uses too) against sentencepiece itself, on every text without special tokens.

    Claimed exact for BPE. A unigram model's conversion is exact except where two segmentations score
    exactly the same (a run of '*'), which tokenizers' lattice resolves unlike sentencepiece's: reported
    `unsupported` with what it measured, as a client would be."""
    check = {"encoder": "tokenizers (tokenizer.json)", "against": None, "status": "exact", "note": "",
             "mismatch": None}
    if reference.source is None or reference.source.name != SPM_MODEL:
        return check
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(reference.source))
    if processor.get_piece_size() and read_proto(reference.source).trainer_spec.model_type != BPE_MODEL_TYPE:
        check["status"] = "unsupported"
        check["note"] = ("tokenizers resolves ties between equal-score unigram segmentations (such as a run of '*') "
                         "unlike sentencepiece")
    # Text that holds a special token's content is split on it by the tokenizer (as LlamaTokenizer does),
    # not by sentencepiece: those are compared through the clients only.
    specials = [t.content for t in reference.tokenizer.get_added_tokens_decoder().values()]
    check["against"] = f"sentencepiece ({SPM_MODEL})"
    offset = 1 if reference.add_bos and reference.bos_id is not None else 0
    for label, text, ids in expected:
        if any(token in text for token in specials):
            continue
        # A whole text of tens of thousands of tokens is compared paragraph by paragraph: sentencepiece sums
        # a unigram lattice in float32, which cannot tell near-ties apart that far into one string.
        parts = [(f"{label}, paragraph {i}", p) for i, p in enumerate(text.split("\n\n"))] if len(ids) > 4096 \
            else [(label, text)]
        for part_label, part in parts:
            got = reference.encode(part)[offset:] if len(parts) > 1 else ids[offset:]
            want = processor.encode(part)
            if got != want:
                check["status"] = "mismatch" if check["status"] == "exact" else check["status"]
                check["mismatch"] = _encode_mismatch(part_label, part, want, got, "sentencepiece")
                return check
    return check


def _first_mismatch(client: Client, expected, reference: TextTokenizer, specials: set[int]) -> dict[str, Any] | None:
    if client.encode is None:
        return {"string": None, "what": "load", "error": client.error}
    for label, text, ids in expected:
        try:
            got = client.encode(text)
        except Exception as exc:
            return {"string": label, "what": "encode", "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
        if got != ids:
            return _encode_mismatch(label, text, ids, got, "checkpoint")
    for label, text, ids in expected:
        text_ids = [i for i in ids if i not in specials]
        mismatch = _decode_mismatch(client, label, text_ids, reference)
        if mismatch is not None:
            return mismatch
    return None


def _encode_mismatch(label: str, text: str, want: list[int], got: list[int], against: str) -> dict[str, Any]:
    position = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    start = max(0, position - 4)
    whole = len(want) <= 48 and len(got) <= 48
    return {
        "string": label,
        "what": "encode",
        "position": position,
        "offset": 0 if whole else start,
        "expected": want if whole else want[start:position + 8],
        "got": got if whole else got[start:position + 8],
        "text": text if len(text) <= 80 else text[:80],
        "against": against,
    }


def _decode_mismatch(client: Client, label: str, ids: list[int], reference: TextTokenizer) -> dict[str, Any] | None:
    """The text the client streams for ids[1:] after ids[0] must be what the checkpoint's tokenizer adds:
    decode(ids) minus decode(ids[:1]). (After a prompt, not at the very start: there a sentencepiece
    decoder drops the dummy prefix's space, which a token-by-token decoder cannot know to do.)"""
    if len(ids) < 2:
        return None
    full = reference.tokenizer.decode(ids, skip_special_tokens=True)
    first = reference.tokenizer.decode(ids[:1], skip_special_tokens=True)
    if not full.startswith(first) or "\ufffd" in first:
        return None  # the first token is part of a character: no token boundary to stream from
    want = full[len(first):]
    try:
        pieces = client.stream(ids)
    except Exception as exc:
        return {"string": label, "what": "decode", "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    got = "".join(pieces)
    if got == want:
        return None
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    token, length = 0, 0
    for token, piece in enumerate(pieces):
        length += len(piece)
        if length > at:
            break
    start = max(0, token - 4)
    return {
        "string": label,
        "what": "decode",
        "position": token + 1,
        "offset": start + 1,
        "ids": ids[start + 1:token + 9],
        "expected": want[max(0, at - 20):at + 40],
        "got": got[max(0, at - 20):at + 40],
    }


def _describe_mismatch(mismatch: dict[str, Any] | None) -> str:
    if mismatch is None:
        return "exact"
    if "error" in mismatch:
        where = f" of {mismatch['string']!r}" if mismatch.get("string") else ""
        return f"{mismatch['what']}{where} failed: {mismatch['error']}"
    if mismatch["what"] == "encode":
        return (f"encode of {mismatch['string']!r} differs at token {mismatch['position']}: expected "
                f"{mismatch['expected']}, got {mismatch['got']}"
                + (f" (from token {mismatch['offset']})" if mismatch["offset"] else "")
                + (f" ({mismatch['against']} ids)" if mismatch.get("against") == "sentencepiece" else ""))
    return (f"decode of {mismatch['string']!r} differs at token {mismatch['position']} (ids {mismatch['ids']}): "
            f"expected {mismatch['expected']!r}, got {mismatch['got']!r}")


def describe_entry(entry: dict[str, Any]) -> str:
    """One line for the console: the client, what it loads, and its verdict."""
    if entry["status"] in ("no client", "not run"):
        return entry["note"]
    where = f"{entry['client']} on {entry['loads']}" + (f" ({entry['loaded_as']})" if entry.get("loaded_as") else "")
    if entry["status"] == "exact":
        return f"{where}: exact on {entry['strings']} strings, {entry['tokens']} tokens"
    if entry["status"] == "unsupported":
        return f"{where}: unsupported for this bundle: {entry['note']}"
    return f"{where}: {_describe_mismatch(entry['mismatch'])}"


def apply_gate(entry: dict[str, Any], gate: dict[str, Any] | None) -> dict[str, Any]:
    """Fold a tokenizer gate result into an artifact's report entry (passed, failed_gates, breaches)."""
    if gate is None:
        return entry
    entry["tokenizer"] = gate
    if not gate["passed"]:
        entry["passed"] = False
        entry["failed_gates"] = [*entry["failed_gates"], "tokenizer"]
        entry["breaches"] = [*entry["breaches"], *(f"tokenizer: {b}" for b in gate["breaches"])]
    return entry


def _content(token: Any) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _types(node: dict | None) -> list[str]:
    if not node:
        return []
    inner = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders")
    return [t for n in inner for t in _types(n)] if node.get("type") == "Sequence" and inner else [node.get("type")]


def _has_type(node: dict | None, name: str) -> bool:
    return name in _types(node)

