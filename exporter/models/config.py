"""ModelConfig: the facts about a MiniCPM-family or BlockFFN checkpoint that the module needs.

Parsed from a Hugging Face `config.json`. Every supported variant is one config: attention is GQA
(MiniCPM 1B/2B, MiniCPM4, BlockFFN-3B) or MLA (MiniCPM3, BlockFFN Small..XLarge); the FFN is the
gated SiLU MLP or BlockFFN's ReLU-routed experts.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from exporter.errors import InputError

AttentionKind = Literal["gqa", "mla"]
FfnKind = Literal["gated", "blockffn"]

SUPPORTED_MODEL_TYPES = ("minicpm", "minicpm3", "minicpm4", "blockffn")
# Norms inside MLA's low-rank projections use the library default, not rms_norm_eps
# (MiniCPM3RMSNorm(q_lora_rank) in both the original and the transformers code).
MLA_LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: Literal["default", "longrope"] = "default"
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    original_max_position_embeddings: int = 0
    attention_factor: float | None = None


@dataclass(frozen=True)
class SparseAttentionConfig:
    """InfLLM v2 (MiniCPM4-8B): dense attention below `dense_len` tokens, block-sparse above."""

    dense_len: int = 8192
    raw: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    attention: AttentionKind
    ffn: FfnKind
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    scale_emb: float = 1.0
    scale_depth: float | None = None
    dim_model_base: float | None = None
    tie_word_embeddings: bool = True
    # MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # BlockFFN
    num_experts: int = 0
    expert_size: int = 0
    # tokens
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    sparse_attention: SparseAttentionConfig | None = None
    torch_dtype: str = "float32"

    # -- derived -----------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return "blockffn" if self.ffn == "blockffn" else ("minicpm3" if self.attention == "mla" else "minicpm")

    @property
    def residual_scale(self) -> float:
        if self.scale_depth is None:
            return 1.0
        return self.scale_depth / math.sqrt(self.num_layers)

    @property
    def logits_divisor(self) -> float:
        return 1.0 if self.dim_model_base is None else self.hidden_size / self.dim_model_base

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def k_head_dim(self) -> int:
        return self.qk_head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.head_dim

    @property
    def cache_heads(self) -> int:
        # MLA caches the expanded per-head keys and values, one per query head.
        return self.num_heads if self.attention == "mla" else self.num_kv_heads

    @property
    def rotary_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- parsing -----------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "config.json not found")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(path, f"not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise InputError(path, "not a JSON object")
        return cls.from_hf_dict(raw, path)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str | Path = "config.json") -> "ModelConfig":
        return _ConfigParser(raw, source).parse()


class _ConfigParser:
    def __init__(self, raw: dict[str, Any], source: str | Path):
        self.raw = raw
        self.source = source

    def fail(self, problem: str) -> InputError:
        return InputError(self.source, problem)

    def get(self, key: str, kind: type, default: Any = ..., positive: bool = True) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if default is ...:
                raise self.fail(f"missing required key '{key}'")
            return default
        value = self.raw[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.fail(f"'{key}' must be {kind.__name__}, got {value!r}")
        if positive and kind in (int, float) and value <= 0:
            raise self.fail(f"'{key}' must be positive, got {value!r}")
        return value

    def parse(self) -> ModelConfig:
        model_type = self.raw.get("model_type", "minicpm")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise self.fail(
                f"model_type '{model_type}' is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        attention = self._attention_kind(model_type)
        ffn = self._ffn_kind()
        hidden = self.get("hidden_size", int)
        heads = self.get("num_attention_heads", int)
        kv_heads = self.get("num_key_value_heads", int, heads)
        layers = self.get("num_hidden_layers", int)
        if attention == "gqa":
            if hidden % heads and "head_dim" not in self.raw:
                raise self.fail(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
            if heads % kv_heads:
                raise self.fail(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")
        head_dim = self.get("head_dim", int, hidden // heads)
        intermediate = self.get("intermediate_size", int, 0, positive=False)
        if ffn == "gated" and intermediate <= 0:
            raise self.fail("missing required key 'intermediate_size'")
        fields: dict[str, Any] = dict(
            model_type=model_type,
            attention=attention,
            ffn=ffn,
            vocab_size=self.get("vocab_size", int),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=intermediate,
            rms_norm_eps=self.get("rms_norm_eps", float, 1e-6),
            max_position_embeddings=self.get("max_position_embeddings", int, 4096),
            scale_emb=self.get("scale_emb", float, 1.0),
            scale_depth=self.get("scale_depth", float, None),
            dim_model_base=self.get("dim_model_base", float, None),
            tie_word_embeddings=self.get("tie_word_embeddings", bool, True),
            bos_token_id=self.get("bos_token_id", int, None, positive=False),
            eos_token_ids=self._eos_ids(),
            torch_dtype=str(self.raw.get("torch_dtype") or self.raw.get("dtype") or "float32"),
            sparse_attention=self._sparse_attention(),
        )
        if attention == "mla":
            fields.update(
                q_lora_rank=self.get("q_lora_rank", int, None),
                kv_lora_rank=self.get("kv_lora_rank", int),
                qk_nope_head_dim=self.get("qk_nope_head_dim", int),
                qk_rope_head_dim=self.get("qk_rope_head_dim", int),
                v_head_dim=self.get("v_head_dim", int, hidden // heads),
                num_kv_heads=heads,
            )
        if ffn == "blockffn":
            fields.update(num_experts=self.get("num_experts", int), expert_size=self.get("expert_size", int))
        rotary_dim = fields["qk_rope_head_dim"] if attention == "mla" else head_dim
        fields["rope"] = self._rope(rotary_dim, fields["max_position_embeddings"])
        return ModelConfig(**fields)

    def _attention_kind(self, model_type: str) -> AttentionKind:
        declared = self.raw.get("attention_type")
        if declared not in (None, "mla", "gqa", "mha", "dense"):
            raise self.fail(f"attention_type '{declared}' is not supported (supported: mla, gqa)")
        if declared == "mla" or model_type == "minicpm3" or "kv_lora_rank" in self.raw:
            return "mla"
        return "gqa"

    def _ffn_kind(self) -> FfnKind:
        ffn_type = self.raw.get("ffn_type")
        if ffn_type in (None, "dense", "mlp") and "num_experts" not in self.raw:
            return "gated"
        if ffn_type not in (None, "block_linear"):
            raise self.fail(f"ffn_type '{ffn_type}' is not supported (supported: block_linear)")
        router_act = self.raw.get("router_act", "relu")
        if router_act != "relu":
            raise self.fail(f"router_act '{router_act}' is not supported (BlockFFN routes with relu)")
        norm = self.raw.get("norm_after_router", "rms")
        if norm != "rms":
            raise self.fail(f"norm_after_router '{norm}' is not supported (BlockFFN uses rms)")
        return "blockffn"

    def _eos_ids(self) -> tuple[int, ...]:
        eos = self.raw.get("eos_token_id", 2)
        if eos is None:
            return ()
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise self.fail(f"'eos_token_id' must be an int or a list of ints, got {eos!r}")
        return tuple(ids)

    def _sparse_attention(self) -> SparseAttentionConfig | None:
        sparse = self.raw.get("sparse_config")
        if not sparse:
            return None
        if not isinstance(sparse, dict):
            raise self.fail("'sparse_config' must be an object")
        dense_len = sparse.get("dense_len", 8192)
        if not isinstance(dense_len, int) or dense_len <= 0:
            raise self.fail(f"'sparse_config.dense_len' must be a positive int, got {dense_len!r}")
        return SparseAttentionConfig(dense_len=dense_len, raw=dict(sparse))

    def _rope(self, rotary_dim: int, max_positions: int) -> RopeConfig:
        params = self.raw.get("rope_scaling") or self.raw.get("rope_parameters") or {}
        if not isinstance(params, dict):
            raise self.fail("'rope_scaling' must be an object")
        theta = self.raw.get("rope_theta", params.get("rope_theta", 10000.0))
        if not isinstance(theta, (int, float)) or theta <= 0:
            raise self.fail(f"'rope_theta' must be a positive number, got {theta!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            return RopeConfig(theta=float(theta))
        if kind != "longrope":
            raise self.fail(f"rope type '{kind}' is not supported (supported: default, longrope)")
        factors = {}
        for name in ("short_factor", "long_factor"):
            values = params.get(name)
            if not isinstance(values, list) or len(values) != rotary_dim // 2:
                raise self.fail(f"rope_scaling.{name} must list {rotary_dim // 2} factors (rotary dim {rotary_dim})")
            factors[name] = tuple(float(v) for v in values)
        original = params.get("original_max_position_embeddings", self.raw.get("original_max_position_embeddings"))
        if original is None:
            original = max_positions
        return RopeConfig(
            theta=float(theta),
            kind="longrope",
            original_max_position_embeddings=int(original),
            attention_factor=params.get("attention_factor"),
            **factors,
        )
