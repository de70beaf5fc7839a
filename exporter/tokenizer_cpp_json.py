"""tokenizer.json in the form ExecuTorch's C++ HFTokenizer (pytorch_tokenizers) applies exactly.

The C++ HFTokenizer reads the normalizers Replace (string or regex), Prepend, Sequence and NFC (not
exactly: it decomposes 'é' and breaks Hangul), and no Metaspace pre-tokenizer. A sentencepiece BPE model converted by transformers (exporter.tokenizer_spm)
carries two things it cannot load:

- its normaliser, a `Precompiled` charsmap (sentencepiece's `nmt_nfkc` and custom rule tables): a
  double-array trie of string -> string rules applied greedily, longest key first. No library hands
  out the rules (sentencepiece and tokenizers only apply them), so `charsmap_rules` walks the trie
  itself (darts-clone's unit layout, as sentencepiece's normalizer.cc reads it). The rules are spelled
  as Replace normalizers: one character class per output for the single-character keys (full-width
  forms, ligatures, control characters), then the multi-character keys over characters that are
  already normal (canonical compositions such as "e\u0301" -> "é", conjoining Hangul jamo), grouped by
  output and applied longest first. The C++ NFC normaliser is not used: it decomposes "Å" and breaks
  Hangul syllables. Every key of the table is run through the rules before they are used.
- its Metaspace(prepend "always", no split) pre-tokenizer, after the converter's "\\A▁ -> ▁▁" rule:
  together that is one unconditional Prepend("▁"), which the C++ tokenizer reads.

The decoder loses its Strip: the C++ tokenizer applies the decoder to each token, where Strip(" ", 1)
would drop every word's space instead of the text's dummy prefix.
"""
from __future__ import annotations

import base64
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# What the C++ HFTokenizer applies as tokenizers does; its NFC is not (it decomposes 'é' and breaks Hangul).
CPP_EXACT_NORMALIZERS = ("Replace", "Prepend")
_DOUBLE_PREFIX = {"Regex": "\\A\u2581"}


def charsmap_entries(blob: bytes) -> dict[str, str]:
    """Every key -> replacement of a sentencepiece precompiled charsmap: [uint32 trie bytes][darts-clone
    double-array trie][NUL-terminated replacements]. Walked breadth first, all 255 byte labels of a level's
    nodes at once (a child of `node` for byte b sits at node ^ b, and is one when its label is b)."""
    import numpy as np

    (trie_bytes,) = struct.unpack_from("<I", blob, 0)
    units = np.frombuffer(blob, dtype="<u4", count=trie_bytes // 4, offset=4).astype(np.int64)
    replacements = blob[4 + trie_bytes:]
    offset = (units >> 10) << ((units & (1 << 9)) >> 6)
    label = units & ((1 << 31) | 0xFF)
    has_leaf = (units >> 8) & 1
    value = units & ((1 << 31) - 1)
    labels = np.arange(1, 256, dtype=np.int64)

    found: dict[str, str] = {}
    nodes, prefixes = np.array([offset[0]]), [b""]
    while len(nodes):
        next_nodes, next_prefixes = [], []
        for start in range(0, len(nodes), 4096):
            chunk = nodes[start:start + 4096]
            children = chunk[:, None] ^ labels[None, :]
            inside = children < len(units)
            hit = np.zeros_like(inside)
            hit[inside] = label[children[inside]] == np.broadcast_to(labels, children.shape)[inside]
            rows, cols = np.nonzero(hit)
            for row, col in zip(rows.tolist(), cols.tolist()):
                child = int(children[row, col])
                node = child ^ int(offset[child])
                key = prefixes[start + row] + bytes([col + 1])
                if has_leaf[child]:
                    first = int(value[node])
                    found[key.decode("utf-8", "replace")] = replacements[
                        first:replacements.index(b"\0", first)].decode("utf-8", "replace")
                next_nodes.append(node)
                next_prefixes.append(key)
        nodes, prefixes = np.array(next_nodes, dtype=np.int64), next_prefixes
    return found


@dataclass
class CharsmapRules:
    """A charsmap as ordered Replace rules: the single-character keys by output, then the keys that compose
    characters already normal, longest first (see the module docstring)."""

    single: dict[str, str]
    composing: list[tuple[str, list[str]]]  # (output, keys), in the order the rules apply

    @classmethod
    def of(cls, entries: dict[str, str]) -> "CharsmapRules":
        single = {key: value for key, value in entries.items() if len(key) == 1}
        # A multi-character key with a character the single rules rewrite is reached through them:
        # "ｅ\u0301" becomes "e\u0301", which has its own key.
        groups: dict[tuple[int, str], list[str]] = defaultdict(list)
        for key, value in entries.items():
            if len(key) > 1 and not any(c in single for c in key):
                groups[(len(key), value)].append(key)
        ordered = sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1]))
        return cls(single, [(value, sorted(keys)) for (_, value), keys in ordered])

    def normalizers(self) -> list[dict[str, Any]]:
        by_output: dict[str, list[str]] = defaultdict(list)
        for key, value in self.single.items():
            by_output[value].append(key)
        rules = [_replace("[" + "".join(re.escape(c) for c in sorted(keys)) + "]", value)
                 for value, keys in sorted(by_output.items())]
        return rules + [_replace("|".join(re.escape(k) for k in keys), value) for value, keys in self.composing]

    def first_unreproduced(self, entries: dict[str, str]) -> tuple[str, str, str] | None:
        """The first key whose rules give other than its replacement, as (key, replacement, rules' output):
        each rule is a global regex replace, as the C++ ReplaceNormalizer applies it."""
        order = sorted(set(self.single.values()))
        for key, value in self.single.items():
            if any(c in self.single for c in value):  # a later single rule rewrites this one's output
                text = key
                for output in order:
                    text = "".join(output if self.single.get(c) == output else c for c in text)
                if text != value:
                    return key, value, text
        rank = {key: index for index, (_, keys) in enumerate(self.composing) for key in keys}
        lengths = sorted({len(key) for key in rank}, reverse=True)
        compiled: dict[int, re.Pattern] = {}
        for key in sorted(entries):
            text = "".join(self.single.get(c, c) for c in key)
            applied = -1
            while True:
                pending = [rank[text[i:i + n]] for n in lengths for i in range(len(text) - n + 1)
                           if rank.get(text[i:i + n], -1) > applied]
                if not pending:
                    break
                applied = min(pending)
                output, keys = self.composing[applied]
                pattern = compiled.setdefault(applied, re.compile("|".join(re.escape(k) for k in keys)))
                text = pattern.sub(lambda _: output, text)
            if text != entries[key]:
                return key, entries[key], text
        return None


@lru_cache(maxsize=4)  # describe() and the bundle writer ask for the same tokenizer's form
def _charsmap_normalizers(charsmap: str) -> tuple[tuple[dict[str, Any], ...] | None, str]:
    entries = charsmap_entries(base64.b64decode(charsmap))
    rules = CharsmapRules.of(entries)
    missed = rules.first_unreproduced(entries)
    if missed is not None:
        key, wanted, got = (ascii(x) for x in missed)
        return None, f"its Precompiled charsmap, which Replace rules cannot spell ({key} -> {wanted}, rules {got})"
    normalizers = tuple(rules.normalizers())
    return normalizers, (f"the Precompiled charsmap as {len(normalizers)} Replace rules (each of its {len(entries)} "
                         "keys checked)")


def _replace(pattern: str, content: str) -> dict[str, Any]:
    return {"type": "Replace", "pattern": {"Regex": pattern}, "content": content}


def cpp_form(data: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(`data` rewritten for the C++ HFTokenizer, what was rewritten), or (None, why it cannot be)."""
    data = dict(data)  # the vocabulary is shared, the rewritten parts are new
    normalizer, pre = data.get("normalizer"), data.get("pre_tokenizer")
    steps = list(normalizer.get("normalizers", [])) if normalizer and normalizer.get("type") == "Sequence" else (
        [normalizer] if normalizer else [])
    done = []
    expanded: list[dict[str, Any]] = []
    for step in steps:
        if step.get("type") == "Precompiled":
            rules, how = _charsmap_normalizers(step["precompiled_charsmap"])
            if rules is None:
                return None, how
            expanded += rules  # shared with the cache: the form is written out, never edited
            done.append(how)
        else:
            expanded.append(step)
    pres = (list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]) if pre else []
    if pres and pres[0].get("type") == "Metaspace":
        metaspace, pres = pres[0], pres[1:]
        if metaspace.get("prepend_scheme") != "always" or metaspace.get("split", True) or not expanded \
                or expanded[-1].get("pattern") != _DOUBLE_PREFIX:
            return None, "its Metaspace pre-tokenizer (a form other than the converter's)"
        expanded = expanded[:-1] + [{"type": "Prepend", "prepend": "\u2581"}]
        done.append("the Metaspace pre-tokenizer as Prepend('▁')")
    if pres:  # the converter's Split keeping user-defined pieces whole: the C++ Split returns no text for it
        return None, f"its {'+'.join(p.get('type', '?') for p in pres)} pre-tokenizer (user-defined pieces)"
    data["pre_tokenizer"] = None
    unsupported = sorted({str(s.get("type")) for s in expanded if s.get("type") not in CPP_EXACT_NORMALIZERS})
    if unsupported:
        return None, f"its {', '.join(unsupported)} normaliser"
    data["normalizer"] = {"type": "Sequence", "normalizers": expanded} if expanded else None
    decoder = data.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        data["decoder"] = {**decoder, "decoders": [d for d in decoder["decoders"] if d.get("type") != "Strip"]}
    return data, "; ".join(done) or "its normaliser as written"
