"""The checkpoint's tokenizer: how prompts become token ids, and the files the bundle ships.

A checkpoint carries either `tokenizer.json` or, as MiniCPM 1B/2B/4 and BlockFFN release it, only a
sentencepiece `tokenizer.model` with a LlamaTokenizer-style `tokenizer_config.json` (and maybe
`added_tokens.json` / `special_tokens_map.json`); the latter is converted (exporter.tokenizer_spm).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, processors

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.tokenizer_spm import SPM_MODEL, tokenizer_from_sentencepiece

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Copied into the bundle as the checkpoint has them (tokenizer.json and tokenizer_config.json are written).
COPIED_FILES = (SPM_MODEL, "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "generation_config.json")
# Keys of a slow LlamaTokenizer's config that mean nothing next to a tokenizer.json.
SLOW_ONLY_KEYS = ("sp_model_kwargs", "auto_map")


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    folder: Path
    bos_id: int | None
    add_bos: bool
    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json, special tokens resolved
    source: Path | None = None  # the file the tokenizer was read from

    @classmethod
    def from_folder(cls, folder: str | Path) -> "TextTokenizer":
        folder = Path(folder)
        config = read_json_object(folder / TOKENIZER_CONFIG)
        special_map = read_json_object(folder / "special_tokens_map.json")
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if config.get(key) is None and special_map.get(key) is not None:
                config[key] = special_map[key]
        path = folder / TOKENIZER_JSON
        if path.is_file():
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as exc:  # tokenizers raises a bare Exception for malformed files
                raise InputError(path, f"unreadable tokenizer ({' '.join(str(exc).split())[:160]})") from None
        elif (folder / SPM_MODEL).is_file():
            path = folder / SPM_MODEL
            legacy = config.get("legacy", True) is not False
            tokenizer = tokenizer_from_sentencepiece(path, _added_tokens(folder, config), legacy=legacy)
        else:
            raise InputError(folder / TOKENIZER_JSON, f"tokenizer.json not found, nor a sentencepiece {SPM_MODEL} "
                             "(the bundle ships the tokenizer for the app and the check needs it)")
        bos_token = _content(config.get("bos_token"))
        bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        if bos_token and bos_id is None:
            raise InputError(folder / TOKENIZER_CONFIG, f"bos_token {bos_token!r} is not in the tokenizer's vocabulary")
        add_bos = bool(config.get("add_bos_token", bos_id is not None)) and bos_id is not None
        return cls(tokenizer, folder, bos_id, add_bos, config, path)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def files(self) -> list[Path]:
        """The checkpoint's tokenizer files (what it was read from, and what the bundle copies)."""
        names = (TOKENIZER_JSON, TOKENIZER_CONFIG, *COPIED_FILES)
        return [self.folder / name for name in names if (self.folder / name).is_file()]

    @property
    def max_id(self) -> int:
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values())

    def check_fits(self, vocab_size: int, config_path: str | Path = "config.json") -> None:
        """Refuse a tokenizer that can emit ids the model's embedding does not have."""
        if self.max_id >= vocab_size:
            raise InputError(self.source or self.folder, f"tokenizer has ids up to {self.max_id} "
                             f"({self.max_id + 1} tokens) but {Path(config_path).name} sets vocab_size {vocab_size}")

    def write_bundle_files(self, folder: Path, max_seq_len: int) -> list[str]:
        """Write what every client's tokenizer loader reads, all agreeing on how a prompt is encoded.

        tokenizer.json's post-processor adds exactly the BOS that `encode` adds (tokenizers,
        transformers, and onnxruntime-genai with add_special_tokens on read it);
        tokenizer_config.json states add_bos_token / add_eos_token explicitly, the special tokens,
        the chat template, and model_max_length = the artifacts' positions. tokenizer.model is
        shipped too when the checkpoint has one. What a stock client loads instead, where it cannot
        read these exactly, is written by exporter.tokenizer_gate.write_client_files.
        Returns the names written.
        """
        probe = "a b"
        if self.source is not None and self.source.name == TOKENIZER_JSON and (
            self.tokenizer.encode(probe).ids == self.encode(probe)
        ):
            shutil.copy2(self.source, folder / TOKENIZER_JSON)  # already agrees: ship the checkpoint's own file
        else:
            tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
            tokenizer.post_processor = self._post_processor()
            tokenizer.save(str(folder / TOKENIZER_JSON))
        written = [TOKENIZER_JSON]
        for path in self.files():
            if path.name not in (TOKENIZER_JSON, TOKENIZER_CONFIG):
                shutil.copy2(path, folder / path.name)
                written.append(path.name)
        config = {k: v for k, v in self.config.items() if k not in SLOW_ONLY_KEYS}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            # Plain strings: ExecuTorch's C++ HFTokenizer reads bos_token / eos_token as strings only.
            if isinstance(config.get(key), dict):
                config[key] = _content(config[key])
        config.update(add_bos_token=self.add_bos, add_eos_token=False, model_max_length=max_seq_len)
        template = self.chat_template()
        if template is not None:
            config["chat_template"] = template
        # tokenizer.json is the definition: transformers 5 rebuilds a "LlamaTokenizer" from its vocab
        # with its own pre-tokenizer (which splits leading spaces unlike sentencepiece), but loads a
        # PreTrainedTokenizerFast from the file as it is.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return sorted([*written, TOKENIZER_CONFIG])

    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        jinja = self.folder / "chat_template.jinja"  # transformers 5 saves the template beside the config
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        return template

    def _post_processor(self) -> processors.PostProcessor:
        if not self.add_bos:
            return processors.TemplateProcessing(single="$A", pair="$A $B:1")
        bos = self.tokenizer.id_to_token(self.bos_id)
        return processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, self.bos_id)]
        )


def _content(token: Any) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _added_tokens(folder: Path, config: dict) -> dict[int, dict]:
    """{id: AddedToken fields} from tokenizer_config.json's added_tokens_decoder and added_tokens.json."""
    added: dict[int, dict] = {}
    for content, token_id in read_json_object(folder / "added_tokens.json").items():
        if not isinstance(token_id, int):
            raise InputError(folder / "added_tokens.json", f"id of {content!r} must be an int, got {token_id!r}")
        added[token_id] = {"content": content, "special": True}
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise InputError(folder / TOKENIZER_CONFIG, "'added_tokens_decoder' must be an object")
    for key, fields in decoder.items():
        if not (str(key).isdigit() and isinstance(fields, dict) and isinstance(fields.get("content"), str)):
            raise InputError(folder / TOKENIZER_CONFIG, f"added_tokens_decoder entry {key!r} is malformed")
        added[int(key)] = fields
    return added


def read_json_object(path: Path) -> dict:
    """A JSON file's top-level object ({} when the file is absent or not an object); bad JSON is bad input."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
