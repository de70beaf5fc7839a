"""The checkpoint's tokenizer: what the bundle ships and how prompts become token ids."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from exporter.errors import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    folder: Path
    bos_id: int | None
    add_bos: bool

    @classmethod
    def from_folder(cls, folder: str | Path) -> "TextTokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise InputError(path, "tokenizer.json not found (the bundle ships it for the app and the check needs it)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise InputError(path, f"unreadable tokenizer ({' '.join(str(exc).split())[:160]})") from None
        config = _read_json(folder / "tokenizer_config.json")
        bos_token = config.get("bos_token")
        if isinstance(bos_token, dict):
            bos_token = bos_token.get("content")
        bos_id = tokenizer.token_to_id(bos_token) if isinstance(bos_token, str) else None
        return cls(tokenizer, folder, bos_id, bool(config.get("add_bos_token", bos_id is not None)))

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def files(self) -> list[Path]:
        return [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
