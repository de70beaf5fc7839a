"""genai_config.json: what onnxruntime-genai needs to run our ONNX folder unmodified.

The layout follows what onnxruntime-genai's own model builder writes (models/builders/base.py,
`make_genai_config`). genai treats the decoder as an opaque graph: it only reads the I/O names,
the cache shape (num_key_value_heads x head_size) and the token ids from here. "llama" is the
generic decoder-only type whose I/O (input_ids, attention_mask, position_ids, past/present per
layer) is the one we export. past_present_share_buffer is false: our graph returns
present = concat(past, new) of length P+T instead of writing into a max-length buffer in place
(sharing the buffer needs a GroupQueryAttention graph).
"""
from __future__ import annotations

from typing import Any

GENAI_CONFIG_FILE = "genai_config.json"


def genai_config(
    *,
    model_file: str,
    io: dict[str, Any],
    hidden_size: int,
    num_attention_heads: int,
    context_length: int,
    vocab_size: int,
    bos_id: int | None,
    eos_ids: tuple[int, ...],
) -> dict[str, Any]:
    """The config dict for a decoder exported with our I/O contract (`io` as OnnxTarget writes it).

    genai sizes both the key and the value cache with one head_size: the caller must have made
    key and value heads equally wide as stored (io's cache key_dim == stored_value_dim).
    """
    cache = io["cache"]
    if cache["key_dim"] != cache["stored_value_dim"]:
        raise ValueError(f"onnxruntime-genai needs equal key and value head sizes, got {cache['key_dim']} "
                         f"and {cache['stored_value_dim']}")
    names = io["names"]
    eos = list(eos_ids)
    pad_id = eos[0] if eos else 0  # batch-1 generation never pads; genai still requires the id
    return {
        "model": {
            "bos_token_id": bos_id if bos_id is not None else pad_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": cache["key_dim"],
                "hidden_size": hidden_size,
                "inputs": {
                    "input_ids": names["input_ids"],
                    "attention_mask": names["attention_mask"],
                    "position_ids": names["position_ids"],
                    "past_key_names": names["past_key"],
                    "past_value_names": names["past_value"],
                },
                "outputs": {
                    "logits": names["logits"],
                    "present_key_names": names["present_key"],
                    "present_value_names": names["present_value"],
                },
                "num_attention_heads": num_attention_heads,
                "num_hidden_layers": cache["layers"],
                "num_key_value_heads": cache["heads"],
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad_id,
            "type": "llama",
            "vocab_size": vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
