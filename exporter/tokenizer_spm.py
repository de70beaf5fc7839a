"""A sentencepiece `tokenizer.model` (MiniCPM 1B/2B/4, BlockFFN releases) as a `tokenizers` Tokenizer.

The conversion is transformers' own (`SpmConverter.build_tokenizer_from_spm_proto`, which follows
the model's normalizer spec so the result encodes as `SentencePieceProcessor.encode` does); this
module only reads the proto and adds the checkpoint's special tokens at the ids it declares. BPE
models and unigram models are converted (a unigram lattice with two equal-score segmentations, such
as a run of '*', can resolve unlike sentencepiece: exporter.tokenizer_gate reports it).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers

from cpm_mobile.exporter.errors import InputError

SPM_MODEL = "tokenizer.model"
UNIGRAM_MODEL_TYPE = 1  # sentencepiece's TrainerSpec.ModelType
BPE_MODEL_TYPE = 2
MODEL_TYPES = {UNIGRAM_MODEL_TYPE: "unigram", BPE_MODEL_TYPE: "bpe"}


def read_proto(path: Path):
    # sentencepiece ships the protobuf bindings of its own model format.
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise InputError(path, f"not a sentencepiece model ({exc})") from None
    if not proto.pieces:
        raise InputError(path, "not a sentencepiece model (no pieces)")
    return proto


def tokenizer_from_sentencepiece(path: Path, added: dict[int, dict], legacy: bool = True) -> Tokenizer:
    """The fast tokenizer for `path`, with `added` ({id: AddedToken fields}) at exactly their ids.

    `legacy` is LlamaTokenizer's flag (MiniCPM's configs set it true): text after a special token
    gets the dummy prefix again, as the sentencepiece model itself does for every chunk.
    """
    proto = read_proto(path)
    model_type = proto.trainer_spec.model_type
    if model_type not in MODEL_TYPES:
        raise InputError(path, f"sentencepiece model type {model_type} is not BPE or unigram (word and char models "
                         "are not converted)")
    from transformers.convert_slow_tokenizer import SpmConverter

    if model_type == BPE_MODEL_TYPE:
        vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    else:  # unigram: the pieces with their scores, in id order
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=legacy)
    # sentencepiece's control and unknown pieces (<unk>, <s>, </s>) are special tokens in the HF form.
    if legacy and model_type == BPE_MODEL_TYPE and _llama_normalizer_spec(proto):
        # Same text transform, in the form Llama 2's tokenizer.json spells it: ExecuTorch's C++
        # HFTokenizer cannot load the Metaspace pre-tokenizer transformers writes for it.
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tokenizer.pre_tokenizer = None
    specials = {i: {"content": p.piece, "special": True} for i, p in enumerate(proto.pieces) if p.type in (2, 3)}
    for token_id, fields in sorted({**specials, **added}.items()):
        _add_at(tokenizer, token_id, fields, path)
    return tokenizer


def _llama_normalizer_spec(proto) -> bool:
    spec = proto.normalizer_spec
    user_defined = any(piece.type == 4 for piece in proto.pieces)
    return (
        spec.add_dummy_prefix and spec.escape_whitespaces and not spec.remove_extra_whitespaces
        and not spec.precompiled_charsmap and not user_defined
    )


def _add_at(tokenizer: Tokenizer, token_id: int, fields: dict, path: Path) -> None:
    content = fields["content"]
    existing = tokenizer.token_to_id(content)
    if existing is None and token_id != tokenizer.get_vocab_size(with_added_tokens=True):
        # tokenizers appends added tokens after the last id: a gap or a clash cannot keep the declared id.
        raise InputError(path.parent, f"added token {content!r} declares id {token_id}, but the next free id after "
                         f"the sentencepiece vocabulary is {tokenizer.get_vocab_size(with_added_tokens=True)}")
    if existing is not None and existing != token_id:
        raise InputError(path.parent, f"added token {content!r} declares id {token_id}, but {SPM_MODEL} has it at {existing}")
    token = AddedToken(
        content, single_word=fields.get("single_word", False), lstrip=fields.get("lstrip", False),
        rstrip=fields.get("rstrip", False), normalized=fields.get("normalized", False), special=fields.get("special", True),
    )
    if token.special:
        tokenizer.add_special_tokens([token])
    else:
        tokenizer.add_tokens([token])
