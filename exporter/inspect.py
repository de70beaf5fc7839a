"""What a checkpoint is: family, shapes, parameter count, and what its artifacts will weigh."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cpm_mobile.exporter.models.loader import load_checkpoint
from cpm_mobile.exporter.models.transformer import max_supported_seq_len
from cpm_mobile.exporter.sizes import recipe_sizes, state_bytes


@dataclass
class CheckpointSummary:
    path: str
    family: str
    attention: str
    ffn: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    experts: int
    expert_size: int
    parameters: int
    dtype_on_disk: str
    tied_embeddings: bool
    vocab: int
    max_position_embeddings: int
    max_seq_len: int
    artifact_sizes: list[dict]  # exporter.sizes.ArtifactSize per shipped recipe x target
    sparse_attention: str
    rope: str = "default"
    biases: str = "none"
    weight_grid: str = "none"  # the integer grid the linears carry (GPTQ, or float weights on a grid)
    vision: str = "none"  # a vision-language checkpoint's vision tower, merger and tokens per slice
    state_bytes_per_token: int = 0  # KV caches per token of context (export --max-seq-len), fp32
    state_bytes_fixed: int = 0  # linear-attention states, whatever the context

    def rows(self) -> list[tuple[str, str]]:
        experts = f"{self.experts} x {self.expert_size}" if self.experts else "-"
        heads = f"{self.heads} q / {self.kv_heads} kv"
        rows = [
            ("path", self.path),
            ("family", self.family),
            ("attention", self.attention if " " in self.attention else self.attention.upper()),
            ("ffn", self.ffn),
            ("layers", str(self.layers)),
            ("hidden", str(self.hidden)),
            ("heads", heads),
            ("experts", experts),
            ("parameters", f"{self.parameters:,} ({self.parameters / 1e6:.1f} M)"),
            ("dtype on disk", self.dtype_on_disk),
            ("tied embeddings", "yes" if self.tied_embeddings else "no"),
            ("vocab", str(self.vocab)),
            ("max_seq_len", f"{self.max_seq_len} (config max_position_embeddings {self.max_position_embeddings})"),
            ("sparse attention", self.sparse_attention),
            ("rope", self.rope),
            ("biases", self.biases),
            ("weight grid", self.weight_grid),
            ("decoding state", self._state()),
        ]
        if self.vision != "none":
            rows.insert(1, ("vision", self.vision))
        return rows

    def _state(self) -> str:
        """What `export --max-seq-len N` costs in memory at run time, at a phone app's usual contexts."""
        fixed = f" + {human_size(self.state_bytes_fixed)} recurrent" if self.state_bytes_fixed else ""
        contexts = [n for n in (2048, 8192, 32768) if n <= self.max_seq_len] or [self.max_seq_len]
        at = ", ".join(f"{n}: {human_size(n * self.state_bytes_per_token + self.state_bytes_fixed)}" for n in contexts)
        return f"{human_size(self.state_bytes_per_token)} a token (fp32 KV caches){fixed}; {at}"

    def size_rows(self) -> list[tuple[str, str, str, str]]:
        """(recipe, target, predicted artifact size, ratio to the fp32 recipe's artifact) per row."""
        return [(row["recipe"], row["target"], human_size(row["bytes"]),
                 f"{row['fp32_ratio']:.2f}x" if row["fp32_ratio"] is not None else "-")
                for row in self.artifact_sizes]


def human_size(size: float) -> str:
    """Decimal units (1 MB = 10^6 bytes), as file managers and app stores count."""
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.2f} GB"


def summarize(path: str | Path) -> CheckpointSummary:
    checkpoint = load_checkpoint(path)
    config = checkpoint.config
    # Tied heads are one tensor in the checkpoint and one constant in each artifact.
    parameters = sum(t.numel() for t in checkpoint.state.values())
    one, two = state_bytes(config, 1), state_bytes(config, 2)  # the state at 1 and 2 tokens: per token, and fixed
    sparse = (
        f"InfLLM v2 (dense below {config.sparse_attention.dense_len} tokens; exported dense, capped there)"
        if config.sparse_attention
        else "none"
    )
    return CheckpointSummary(
        path=str(checkpoint.folder),
        family=config.family,
        attention=_attention(config),
        ffn="BlockFFN (ReLU router + RMSNorm)" if config.ffn == "blockffn" else "gated SiLU MLP",
        layers=config.num_layers,
        hidden=config.hidden_size,
        heads=config.num_heads,
        kv_heads=config.num_kv_heads,
        experts=config.num_experts,
        expert_size=config.expert_size,
        parameters=parameters,
        dtype_on_disk=", ".join(checkpoint.dtypes_on_disk),
        tied_embeddings=checkpoint.tied,
        vocab=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        max_seq_len=max_supported_seq_len(config),
        artifact_sizes=[asdict(row) for row in recipe_sizes(config, checkpoint.tied)],
        sparse_attention=sparse,
        rope=_rope(config),
        biases=", ".join(n for n, on in (("attention", config.attention_bias), ("mlp", config.mlp_bias)) if on) or "none",
        weight_grid=_weight_grid(config),
        vision=_vision(checkpoint),
        state_bytes_per_token=two - one,
        state_bytes_fixed=2 * one - two,
    )


def _vision(checkpoint) -> str:
    """The vision half of a MiniCPM-V folder in one line ("none" for a text checkpoint)."""
    from cpm_mobile.exporter.models.vision import VISION_MODEL_TYPES, VisionConfig

    raw = json.loads(Path(checkpoint.files.config).read_text())
    if raw.get("model_type") not in VISION_MODEL_TYPES:
        return "none"
    vision = VisionConfig.from_hf_dict(raw, checkpoint.files.config)
    side = 448
    processor = checkpoint.folder / "processor_config.json"
    if processor.is_file():
        side = json.loads(processor.read_text()).get("image_processor", {}).get("scale_resolution", side)
    tokens = (side // vision.patch_size) ** 2 // vision.tokens_divisor()
    return (f"SigLIP2-style tower: {vision.num_layers} layers x {vision.hidden_size}, patch {vision.patch_size}, "
            f"window-attention merger after layer {vision.insert_layer_id}; Merger to the LLM's {vision.llm_hidden_size} "
            f"({vision.downsample_mode}: {vision.tokens_divisor()} patches a token, about {tokens} tokens per "
            f"{side}x{side} slice); the LLM below")


def _weight_grid(config) -> str:
    if config.weight_grid is None:
        return "none (float weights on no integer grid)"
    how = "recipes checkpoint-grid / ternary-grid export it as it is; fp32 exports it dequantised"
    return f"{config.weight_grid.describe()}; {how}"


def _attention(config) -> str:
    if not config.is_hybrid:
        return config.attention
    linear = len(config.linear_layers)
    spec = config.linear_attention
    return (f"hybrid: {linear} Gated DeltaNet layers (state {spec.num_value_heads} x {spec.key_head_dim} x "
            f"{spec.value_head_dim}, conv {spec.conv_kernel}) + {config.num_layers - linear} gated GQA layers")


def _rope(config) -> str:
    rope = config.rope
    text = f"{rope.kind}, theta {rope.theta:g}"
    if config.rotary_dim < config.head_dim and config.attention == "gqa":
        text += f", on {config.rotary_dim} of {config.head_dim} head dims"
    if rope.factor is not None:
        text += f", factor {rope.factor:g}"
    if rope.original_max_position_embeddings:
        text += f", original context {rope.original_max_position_embeddings}"
    return text
