"""A byte-level BPE tokenizer for the fixture models, trained with Hugging Face `tokenizers`.

Special tokens take MiniCPM's low ids: ``<unk>``=0, ``<s>``=1 (bos), ``</s>``=2 (eos), then
``<|im_start|>``=3 and ``<|im_end|>``=4 for the ChatML template. Byte-level pre-tokenisation and
decoding with no normaliser make ``decode(encode(text)) == text`` for any string.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

UNK, BOS, EOS, IM_START, IM_END = "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK, BOS, EOS, IM_START, IM_END)
UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
DEFAULT_VOCAB_SIZE = 4096

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE over `texts`; encoding prepends <s> (as MiniCPM's add_bos_token does)."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
            ),
        ]
    )
    for token, expected in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        if tokenizer.token_to_id(token) != expected:
            raise AssertionError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {expected}")
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast (and onnxruntime-genai)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
            for i, tok in enumerate(SPECIAL_TOKENS)
        },
    }


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path, model_max_length: int) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model_max_length), indent=2) + "\n")


def load_tokenizer(folder: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
