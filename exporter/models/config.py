"""ModelConfig: the facts about a MiniCPM-family or BlockFFN checkpoint that the module needs.

Parsed from a Hugging Face `config.json`. Every supported variant is one config: attention is GQA
(MiniCPM 1B/2B, MiniCPM4, BlockFFN-3B, MiniCPM5 and any `LlamaForCausalLM`) or MLA (MiniCPM3,
BlockFFN Small..XLarge); the FFN is the gated SiLU MLP or BlockFFN's ReLU-routed experts.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from cpm_mobile.exporter.errors import InputError

AttentionKind = Literal["gqa", "mla"]
FfnKind = Literal["gated", "blockffn"]

SUPPORTED_MODEL_TYPES = ("minicpm", "minicpm3", "minicpm4", "blockffn", "llama", "qwen3_5_text")
# Folders whose text model is a qwen3_5_text config under "text_config", its tensors under
# "model.language_model." (Qwen3.5 and MiniCPM-V 4.6 / 4.7 as transformers saves them).
TEXT_CONFIG_WRAPPERS = ("qwen3_5", "minicpmv4_6", "minicpmv4_7")
QWEN3_5_TEXT = "qwen3_5_text"
LayerKind = Literal["full_attention", "linear_attention"]
# rope_scaling types as transformers defines them (modeling_rope_utils.ROPE_INIT_FUNCTIONS).
ROPE_KINDS = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
RopeKind = Literal["default", "linear", "dynamic", "llama3", "yarn", "longrope"]
# Norms inside MLA's low-rank projections use the library default, not rms_norm_eps
# (MiniCPM3RMSNorm(q_lora_rank) in both the original and the transformers code).
MLA_LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: RopeKind = "default"
    # linear / dynamic / llama3 / yarn scale; longrope: overrides max/original for the attention factor
    factor: float | None = None
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    original_max_position_embeddings: int = 0
    attention_factor: float | None = None
    # LongRoPE's choice of factor list. "context" (MiniCPM's own code): long factors whenever the
    # model is configured past the original context, at every length. "length" (transformers):
    # long factors only once the sequence itself passes the original context.
    long_factor_rule: Literal["context", "length"] = "context"
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class SparseAttentionConfig:
    """InfLLM v2 (MiniCPM4-8B): dense attention below `dense_len` tokens, block-sparse above."""

    dense_len: int = 8192
    raw: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Gated DeltaNet (Qwen3.5's linear_attention layers): a causal depthwise conv over q, k, v and a
    recurrent state of [value heads, key_head_dim, value_head_dim] per layer."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


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
    attention_bias: bool = False  # q/k/v/o projections carry biases (Llama's attention_bias)
    mlp_bias: bool = False  # gate/up/down projections carry biases (Llama's mlp_bias)
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
    # Qwen3.5 hybrid backbones: one mixer kind per layer (empty: every layer full attention),
    # softmax attention with a sigmoid output gate and per-head q/k norms, rotary on a fraction of
    # the head, norms that scale by (1 + weight) (folded into the weight at load).
    layer_types: tuple[LayerKind, ...] = ()
    linear_attention: LinearAttentionConfig | None = None
    attention_output_gate: bool = False
    qk_norm: bool = False
    partial_rotary_factor: float = 1.0
    zero_centered_norms: bool = False
    # Where the text model's tensors live in the folder ("model.language_model." in a VL folder).
    weight_prefix: str = "model."
    # config.json's quantization_config as written (GPTQ and others), kept for the loaders that read it.
    quantization_config: dict | None = None
    # The integer grid the checkpoint's linears carry (exporter/models/grid.py WeightGrid: GPTQ codes,
    # or float weights found on a grid), set by the loader; quantisers export it instead of rounding.
    weight_grid: Any = field(default=None, compare=False, repr=False)

    # -- derived -----------------------------------------------------------------------------
    @property
    def family(self) -> str:
        if self.model_type == QWEN3_5_TEXT:
            return "qwen3_5"
        if self.model_type == "llama":
            return "llama"
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
        return self.qk_rope_head_dim if self.attention == "mla" else int(self.head_dim * self.partial_rotary_factor)

    def layer_kind(self, index: int) -> LayerKind:
        return self.layer_types[index] if self.layer_types else "full_attention"

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """The layers that hold a linear-attention state instead of a KV cache."""
        return tuple(i for i, kind in enumerate(self.layer_types) if kind == "linear_attention")

    @property
    def is_hybrid(self) -> bool:
        return bool(self.linear_layers)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(replace(self, weight_grid=None)).items() if k != "weight_grid"}

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
        if model_type in TEXT_CONFIG_WRAPPERS:
            return self._wrapped_text_config(model_type)
        if model_type == QWEN3_5_TEXT:
            return _Qwen35Parser(self.raw, self.source).parse_qwen35()
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise self.fail(
                f"model_type '{model_type}' is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        attention = self._attention_kind(model_type)
        ffn = self._ffn_kind()
        act = self.raw.get("hidden_act", "silu")
        if act != "silu":
            raise self.fail(f"hidden_act '{act}' is not supported (supported: silu)")
        llama = model_type == "llama"
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
            # transformers' LlamaConfig defaults differ from MiniCPM's: 2048 positions, untied head.
            max_position_embeddings=self.get("max_position_embeddings", int, 2048 if llama else 4096),
            scale_emb=self.get("scale_emb", float, 1.0),
            scale_depth=self.get("scale_depth", float, None),
            dim_model_base=self.get("dim_model_base", float, None),
            tie_word_embeddings=self.get("tie_word_embeddings", bool, not llama),
            attention_bias=self.get("attention_bias", bool, False),
            mlp_bias=self.get("mlp_bias", bool, False),
            bos_token_id=self.get("bos_token_id", int, None, positive=False),
            eos_token_ids=self._eos_ids(),
            torch_dtype=str(self.raw.get("torch_dtype") or self.raw.get("dtype") or "float32"),
            sparse_attention=self._sparse_attention(),
            quantization_config=self._quantization_config(),
        )
        if attention == "mla" and fields["attention_bias"]:
            raise self.fail("attention_bias is not supported with MLA attention")
        if ffn == "blockffn" and fields["mlp_bias"]:
            raise self.fail("mlp_bias is not supported with BlockFFN")
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
        fields["rope"] = self._rope(rotary_dim, fields["max_position_embeddings"], transformers_rules=llama)
        return ModelConfig(**fields)

    def _wrapped_text_config(self, model_type: str) -> ModelConfig:
        """The text model of a Qwen3.5 / MiniCPM-V 4.6 / 4.7 folder (its vision tower is not read here)."""
        text = self.raw.get("text_config")
        if not isinstance(text, dict):
            raise self.fail(f"model_type '{model_type}' needs a 'text_config' object")
        inner = text.get("model_type", QWEN3_5_TEXT)
        # MiniCPM-V builds its LLM from text_config with AutoModel: any text model we read may sit there.
        allowed = (QWEN3_5_TEXT,) if model_type == "qwen3_5" else (QWEN3_5_TEXT, *SUPPORTED_MODEL_TYPES)
        if inner not in allowed:
            raise self.fail(f"text_config.model_type '{inner}' is not supported (supported: {', '.join(allowed)})")
        # A composite config states the head's tying at the top (it wins), and may state the token ids there.
        merged = {**{k: self.raw[k] for k in ("bos_token_id", "eos_token_id") if k in self.raw}, **text}
        if "tie_word_embeddings" in self.raw:
            merged["tie_word_embeddings"] = self.raw["tie_word_embeddings"]
        if inner == QWEN3_5_TEXT:
            config = _Qwen35Parser(merged, self.source).parse_qwen35()
        else:
            config = _ConfigParser(merged, self.source).parse()
        return replace(config, weight_prefix="model.language_model.")

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

    def _quantization_config(self) -> dict | None:
        quant = self.raw.get("quantization_config")
        if quant is None:
            return None
        if not isinstance(quant, dict):
            raise self.fail("'quantization_config' must be an object")
        return dict(quant)

    def _rope(self, rotary_dim: int, max_positions: int, transformers_rules: bool) -> RopeConfig:
        """rope_theta and rope_scaling (or transformers 5's rope_parameters), with transformers' defaults."""
        params = self.raw.get("rope_scaling") or self.raw.get("rope_parameters") or {}
        if not isinstance(params, dict):
            raise self.fail("'rope_scaling' must be an object")
        theta = self.raw.get("rope_theta", params.get("rope_theta", 10000.0))
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
            raise self.fail(f"'rope_theta' must be a positive number, got {theta!r}")
        partial = self.raw.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise self.fail(f"partial_rotary_factor {partial!r} is not supported (rotary over the whole head only)")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ROPE_KINDS:
            raise self.fail(f"rope type '{kind}' is not supported (supported: {', '.join(ROPE_KINDS)})")
        if kind == "default":
            return RopeConfig(theta=float(theta))
        number = _RopeNumbers(self, params)
        if kind in ("linear", "dynamic"):
            return RopeConfig(theta=float(theta), kind=kind, factor=number("factor"))
        original = self._original_context(params, max_positions, transformers_rules)
        if kind == "llama3":
            low, high = number("low_freq_factor"), number("high_freq_factor")
            if high <= low:
                raise self.fail(f"rope_scaling.high_freq_factor {high} must exceed low_freq_factor {low}")
            return RopeConfig(
                theta=float(theta), kind=kind, factor=number("factor"), low_freq_factor=low,
                high_freq_factor=high, original_max_position_embeddings=original,
            )
        if kind == "yarn":
            truncate = params.get("truncate", True)
            if not isinstance(truncate, bool):
                raise self.fail(f"rope_scaling.truncate must be true or false, got {truncate!r}")
            return RopeConfig(
                theta=float(theta), kind=kind, factor=number("factor"),
                attention_factor=number("attention_factor", None), original_max_position_embeddings=original,
                # transformers treats a 0 / null beta as its default (`or 32`, `or 1`)
                beta_fast=number("beta_fast", None) or 32.0, beta_slow=number("beta_slow", None) or 1.0,
                mscale=number("mscale", None), mscale_all_dim=number("mscale_all_dim", None), truncate=truncate,
            )
        factors = {}
        for name in ("short_factor", "long_factor"):
            values = params.get(name)
            if not isinstance(values, list) or len(values) != rotary_dim // 2:
                raise self.fail(f"rope_scaling.{name} must list {rotary_dim // 2} factors (rotary dim {rotary_dim})")
            factors[name] = tuple(float(v) for v in values)
        return RopeConfig(
            theta=float(theta),
            kind="longrope",
            original_max_position_embeddings=original,
            attention_factor=number("attention_factor", None),
            factor=number("factor", None) if transformers_rules else None,
            long_factor_rule="length" if transformers_rules else "context",
            **factors,
        )

    def _original_context(self, params: dict, max_positions: int, transformers_rules: bool) -> int:
        inside = params.get("original_max_position_embeddings")
        outside = self.raw.get("original_max_position_embeddings")
        # transformers lets a top-level value win (Phi-3 writes it there); MiniCPM reads rope_scaling's.
        original = (outside if outside is not None else inside) if transformers_rules else (
            inside if inside is not None else outside
        )
        if original is None:
            return max_positions
        if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
            raise self.fail(f"original_max_position_embeddings must be a positive int, got {original!r}")
        return original


class _RopeNumbers:
    """Reads one number of rope_scaling: required (default ...) or optional, positive."""

    def __init__(self, parser: _ConfigParser, params: dict):
        self.parser = parser
        self.params = params

    def __call__(self, key: str, default: Any = ...) -> Any:
        value = self.params.get(key)
        kind = self.params.get("rope_type", self.params.get("type"))
        if value is None:
            if default is ...:
                raise self.parser.fail(f"rope_scaling of type '{kind}' needs '{key}'")
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise self.parser.fail(f"rope_scaling.{key} must be a positive number, got {value!r}")
        return float(value)


# transformers' Qwen3_5TextConfig defaults: a config.json may leave any of them out.
QWEN3_5_DEFAULTS = {
    "vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
    "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 32768, "head_dim": 256,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "rms_norm_eps": 1e-6,
}
QWEN3_5_FULL_ATTENTION_INTERVAL = 4


class _Qwen35Parser(_ConfigParser):
    """qwen3_5_text: Gated DeltaNet and gated softmax attention layers (transformers' Qwen3_5TextModel)."""

    def parse_qwen35(self) -> ModelConfig:
        raw = {**QWEN3_5_DEFAULTS, **{k: v for k, v in self.raw.items() if v is not None}}
        self.raw = raw
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise self.fail(f"hidden_act '{act}' is not supported (supported: silu)")
        layers = self.get("num_hidden_layers", int)
        heads = self.get("num_attention_heads", int)
        kv_heads = self.get("num_key_value_heads", int)
        if heads % kv_heads:
            raise self.fail(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")
        linear = LinearAttentionConfig(
            num_key_heads=self.get("linear_num_key_heads", int),
            num_value_heads=self.get("linear_num_value_heads", int),
            key_head_dim=self.get("linear_key_head_dim", int),
            value_head_dim=self.get("linear_value_head_dim", int),
            conv_kernel=self.get("linear_conv_kernel_dim", int),
        )
        if linear.num_value_heads % linear.num_key_heads:
            raise self.fail(f"linear_num_value_heads {linear.num_value_heads} is not a multiple of "
                            f"linear_num_key_heads {linear.num_key_heads}")
        if linear.conv_kernel < 2:
            raise self.fail(f"linear_conv_kernel_dim {linear.conv_kernel} must be at least 2")
        layer_types = self._layer_types(layers)
        head_dim = self.get("head_dim", int)
        params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise self.fail("'rope_parameters' must be an object")
        partial = raw.get("partial_rotary_factor", params.get("partial_rotary_factor", 0.25))
        if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
            raise self.fail(f"partial_rotary_factor must be in (0, 1], got {partial!r}")
        rotary_dim = int(head_dim * partial)
        if rotary_dim % 2:
            raise self.fail(f"rotary dim {rotary_dim} (head_dim x partial_rotary_factor) must be even")
        for key in ("attention_bias", "mlp_bias"):
            if raw.get(key):
                raise self.fail(f"{key}=true is not supported for {QWEN3_5_TEXT}")
        # Text positions are one per token: MRoPE's sections (and their interleaving) then give every
        # rotary pair the plain frequency, so only the image positions of the VL model need them.
        plain = {k: v for k, v in params.items() if k not in ("partial_rotary_factor", "mrope_section",
                                                                "mrope_interleaved")}
        text_raw = {k: v for k, v in raw.items() if k not in ("partial_rotary_factor", "rope_scaling")}
        rope = _ConfigParser({**text_raw, "rope_parameters": plain}, self.source)._rope(
            rotary_dim, self.get("max_position_embeddings", int), transformers_rules=True)
        return ModelConfig(
            model_type=QWEN3_5_TEXT,
            attention="gqa",
            ffn="gated",
            vocab_size=self.get("vocab_size", int),
            hidden_size=self.get("hidden_size", int),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=self.get("intermediate_size", int),
            rms_norm_eps=self.get("rms_norm_eps", float),
            max_position_embeddings=self.get("max_position_embeddings", int),
            rope=rope,
            tie_word_embeddings=self.get("tie_word_embeddings", bool, False),
            bos_token_id=self.get("bos_token_id", int, None, positive=False),
            eos_token_ids=self._eos_ids() if "eos_token_id" in self.raw else (),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            quantization_config=self._quantization_config(),
            layer_types=layer_types,
            linear_attention=linear,
            attention_output_gate=True,
            qk_norm=True,
            partial_rotary_factor=float(partial),
            zero_centered_norms=True,
        )

    def _layer_types(self, layers: int) -> tuple[LayerKind, ...]:
        declared = self.raw.get("layer_types")
        if declared is None:
            interval = self.get("full_attention_interval", int, QWEN3_5_FULL_ATTENTION_INTERVAL)
            return tuple("linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers))
        if not isinstance(declared, list) or len(declared) != layers:
            raise self.fail(f"'layer_types' must list {layers} layer kinds (num_hidden_layers)")
        unknown = sorted({kind for kind in declared if kind not in ("full_attention", "linear_attention")})
        if unknown:
            raise self.fail(f"layer_types holds {', '.join(map(repr, unknown))}: supported full_attention, "
                            "linear_attention")
        return tuple(declared)
