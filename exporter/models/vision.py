"""MiniCPM-V 4.6 / 4.7's vision half: image slices -> LLM-space embeddings, one slice shape per call.

The checkpoint's tower is SigLIP2-shaped (patch conv, learned 2-D position table looked up by
nearest bucket, pre-norm encoder layers), with a window-attention merger after layer
`insert_layer_id` that folds each 2x2 patch window into one token, and a Merger MLP that folds
2x2 again and projects into the LLM's width: 16x fewer tokens than patches ("16x"), or 4x when
the window merger is skipped ("4x").

transformers packs every slice of a prompt into one sequence and cuts attention at slice
boundaries (cu_seqlens). Here a call takes a batch of equal-shape slices [B, 3, H, W] instead:
the same arithmetic per slice, with no data-dependent shapes, so it exports with H, W and B
dynamic. Attention inside a slice is full (no mask), as in the checkpoint.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from cpm_mobile.exporter.errors import InputError

VISION_MODEL_TYPES = ("minicpmv4_6", "minicpmv4_7")
DownsampleMode = Literal["16x", "4x"]
DOWNSAMPLE_MODES = ("16x", "4x")
# Folder prefixes of the two vision modules, as MiniCPMV4_6ForConditionalGeneration saves them.
TOWER_PREFIX = "model.vision_tower."
MERGER_PREFIX = "model.merger."


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    insert_layer_id: int
    window_kernel: int
    merge_kernel: int
    merger_times: int
    downsample_mode: DownsampleMode
    llm_hidden_size: int

    @property
    def positions_per_side(self) -> int:
        return self.image_size // self.patch_size

    def tokens_divisor(self, mode: DownsampleMode | None = None) -> int:
        """Patches per LLM token: 16 ("16x": window merger and Merger), 4 ("4x": Merger only)."""
        mode = mode or self.downsample_mode
        merges = self.merger_times + (1 if mode == "16x" else 0)
        return (self.merge_kernel**2) ** merges

    def side_multiple(self, mode: DownsampleMode | None = None) -> int:
        """Pixels a slice side must be a multiple of, for every merge to fold whole windows."""
        return self.patch_size * int(round(self.tokens_divisor(mode) ** 0.5))

    @classmethod
    def from_file(cls, path: str | Path) -> "VisionConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(path, f"cannot read config: {exc}") from None
        return cls.from_hf_dict(raw, path)

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str | Path = "config.json") -> "VisionConfig":
        def fail(problem: str) -> InputError:
            return InputError(source, problem)

        model_type = raw.get("model_type")
        if model_type not in VISION_MODEL_TYPES:
            raise fail(f"model_type '{model_type}' has no vision half we read (supported: {', '.join(VISION_MODEL_TYPES)})")
        vision, text = raw.get("vision_config"), raw.get("text_config")
        if not isinstance(vision, dict) or not isinstance(text, dict):
            raise fail(f"model_type '{model_type}' needs 'vision_config' and 'text_config' objects")

        def number(section: dict, key: str, default, where: str):
            value = section.get(key, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise fail(f"'{where}{key}' must be a positive number, got {value!r}")
            return value

        def square(section: dict, key: str, where: str) -> int:
            value = section.get(key, (2, 2))
            if isinstance(value, int):
                value = (value, value)
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1] and value[0] > 0):
                raise fail(f"'{where}{key}' must be a square kernel like [2, 2], got {value!r}")
            return int(value[0])

        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise fail(f"'vision_config.hidden_act' {act!r} is not supported (supported: gelu_pytorch_tanh)")
        mode = raw.get("downsample_mode", "16x")
        if mode not in DOWNSAMPLE_MODES:
            raise fail(f"'downsample_mode' {mode!r} is not supported (supported: {', '.join(DOWNSAMPLE_MODES)})")
        if raw.get("drop_vision_last_layer", False):
            raise fail("'drop_vision_last_layer' true is not supported")
        # number() refuses a list: a non-square image_size or patch_size is refused by name there
        image_size = number(vision, "image_size", 224, "vision_config.")
        patch_size = number(vision, "patch_size", 16, "vision_config.")
        config = cls(
            hidden_size=int(number(vision, "hidden_size", 768, "vision_config.")),
            intermediate_size=int(number(vision, "intermediate_size", 3072, "vision_config.")),
            num_layers=int(number(vision, "num_hidden_layers", 12, "vision_config.")),
            num_heads=int(number(vision, "num_attention_heads", 12, "vision_config.")),
            num_channels=int(number(vision, "num_channels", 3, "vision_config.")),
            image_size=int(image_size),
            patch_size=int(patch_size),
            layer_norm_eps=float(number(vision, "layer_norm_eps", 1e-6, "vision_config.")),
            insert_layer_id=int(raw.get("insert_layer_id", vision.get("insert_layer_id", 6))),
            window_kernel=square(vision, "window_kernel_size", "vision_config."),
            merge_kernel=square(raw, "merge_kernel_size", ""),
            merger_times=int(number(raw, "merger_times", 1, "")),
            downsample_mode=mode,
            llm_hidden_size=int(number(text, "hidden_size", None, "text_config.")),
        )
        if config.hidden_size % config.num_heads:
            raise fail(f"'vision_config.hidden_size' {config.hidden_size} is not divisible by its "
                       f"num_attention_heads {config.num_heads}")
        if not 0 <= config.insert_layer_id < config.num_layers:
            raise fail(f"'insert_layer_id' {config.insert_layer_id} is outside the tower's "
                       f"{config.num_layers} layers")
        if config.window_kernel != 2 or config.merge_kernel != 2:
            raise fail("window and merge kernels other than 2x2 are not supported")
        return config


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written out: XNNPACK lowers F.gelu(approximate="tanh") to a kernel 4.5e-5
    off in relative terms, and these elementwise ops to within 1e-7 (both measured on the same inputs)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kernel: str) -> torch.Tensor:
    """Full attention within the second-last axis: [..., N, D] -> [..., N, D].

    kernel "sdpa": torch's; "custom_sdpa": ExecuTorch's llama::custom_sdpa (non-causal from position 0), which
    tiles the scores instead of materialising [heads, N, N]: a program planned for the largest slice would
    otherwise hold GBs of score buffers (ExecuTorch plans memory for the dynamic dims' upper bound)."""
    *lead, n, dim = q.shape
    split = lambda x: x.reshape(-1, n, heads, dim // heads)  # noqa: E731  [B', N, H, d]
    if kernel == "custom_sdpa":
        out = torch.ops.llama.custom_sdpa(split(q), split(k), split(v), 0, None, 0.0, False, None)
    else:
        out = F.scaled_dot_product_attention(*(split(x).transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    return out.reshape(*lead, n, dim)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.kernel = "sdpa"  # a target may choose its runtime's attention op (see _attention)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, self.kernel))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.self_attn = SelfAttention(dim, config.num_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = MLP(dim, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def fold_windows(x: torch.Tensor, h: int, w: int, k: int) -> torch.Tensor:
    """[B, h*w, D] on a row-major grid -> [B, (h/k)*(w/k), k*k, D]: each kxk window's tokens
    together, windows row-major (the order transformers' window index and Merger give)."""
    b, _, dim = x.shape
    # Batch and window rows share one axis: Core ML takes tensors of rank 5 at most.
    x = x.reshape(b * (h // k), k, w // k, k, dim).permute(0, 2, 1, 3, 4)
    return x.reshape(b, (h // k) * (w // k), k * k, dim)


class WindowMerger(nn.Module):
    """Attention inside each 2x2 window, then the window's four tokens -> one (MLP + their mean)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        dim, window = config.hidden_size, config.window_kernel**2
        self.window_kernel = config.window_kernel
        self.self_attn = SelfAttention(dim, config.num_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.pre_norm = nn.LayerNorm(dim * window, eps=config.layer_norm_eps)
        self.linear_1 = nn.Linear(dim * window, config.intermediate_size * window)
        self.linear_2 = nn.Linear(config.intermediate_size * window, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        windows = fold_windows(x, h, w, self.window_kernel)  # [B, n, 4, D]
        windows = windows + self.self_attn(self.layer_norm1(windows))
        flat = self.pre_norm(windows.flatten(2))
        out = self.linear_2(gelu_tanh(self.linear_1(flat)))
        return out + windows.mean(dim=2)


def bucket_edges(side: int) -> torch.Tensor:
    """The position table's bucket edges exactly as transformers computes them (an fp32 arange, not k/side)."""
    return torch.arange(1 / side, 1.0, 1 / side)


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.positions_per_side = config.positions_per_side
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.position_embedding = nn.Embedding(config.positions_per_side**2, config.hidden_size)
        self.register_buffer("boundaries", bucket_edges(config.positions_per_side), persistent=False)

    def bucket(self, n: int) -> torch.Tensor:
        """Nearest-bucket rows of the position table for n patches along a side: the count of
        edges at or below i/n (torch.bucketize(right=True), written as a compare-and-sum so every
        runtime has the ops)."""
        coords = torch.arange(n, dtype=torch.float32, device=self.boundaries.device) / n
        return (coords[:, None] >= self.boundaries[None, :]).sum(-1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        patches = self.patch_embedding(pixels)  # [B, D, h, w]
        h, w = patches.shape[-2], patches.shape[-1]
        ids = (self.bucket(h)[:, None] * self.positions_per_side + self.bucket(w)[None, :]).reshape(-1)
        return patches.flatten(2).transpose(1, 2) + self.position_embedding(ids), h, w


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.vit_merger = WindowMerger(config)

    def forward(self, pixels: torch.Tensor, mode: DownsampleMode) -> tuple[torch.Tensor, int, int]:
        x, h, w = self.embeddings(pixels)
        for index, layer in enumerate(self.encoder.layers):
            x = layer(x)
            if mode == "16x" and index == self.config.insert_layer_id:
                x = self.vit_merger(x, h, w)
                h, w = h // self.config.window_kernel, w // self.config.window_kernel
        return self.post_layernorm(x), h, w


class DownsampleMLP(nn.Module):
    def __init__(self, dim: int, out_dim: int, kernel: int):
        super().__init__()
        merged = dim * kernel * kernel
        self.pre_norm = nn.LayerNorm(merged, eps=1e-6)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.pre_norm(x))))


class Merger(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.kernel = config.merge_kernel
        dim = config.hidden_size
        outs = [dim] * (config.merger_times - 1) + [config.llm_hidden_size]
        self.mlp = nn.ModuleList(DownsampleMLP(dim, out, self.kernel) for out in outs)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        for mlp in self.mlp:
            x = mlp(fold_windows(x, h, w, self.kernel).flatten(2))
            h, w = h // self.kernel, w // self.kernel
        return x


class VisionEncoder(nn.Module):
    """pixels [B, 3, H, W] (normalised, H and W multiples of `side_multiple`) -> [B, H*W/(p*p*divisor), llm]."""

    def __init__(self, config: VisionConfig, mode: DownsampleMode | None = None):
        super().__init__()
        self.config = config
        self.mode: DownsampleMode = mode or config.downsample_mode
        self.vision_tower = VisionTower(config)
        self.merger = Merger(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x, h, w = self.vision_tower(pixels, self.mode)
        return self.merger(x, h, w)

    def slice_shapes(self, max_side: int, batch: int = 1) -> tuple[torch.Tensor, dict[int, Any], int]:
        """What every target captures the encoder with: an example slice batch, torch.export's dynamic dims for it
        (H and W multiples of side_multiple up to max_side; the batch too when batch > 1) and the largest side.
        No side of the example is one step: export would fix it."""
        step = self.config.side_multiple(self.mode)
        units = max_side // step
        if units < 3:
            raise ValueError(f"max_side {max_side} leaves fewer than 3 steps of {step} px")
        rows, cols = Dim("slice_rows", min=1, max=units), Dim("slice_cols", min=1, max=units)
        dims: dict[int, Any] = {2: step * rows, 3: step * cols}
        if batch > 1:
            dims[0] = Dim("slices", min=1, max=64)
        return torch.zeros(batch, self.config.num_channels, 2 * step, 3 * step), dims, step * units


def load_vision_encoder(path: str | Path, mode: DownsampleMode | None = None) -> VisionEncoder:
    """The folder's vision tower and merger, strict: every tensor under their prefixes used, none missing."""
    from cpm_mobile.exporter.models.checkpoint import find_files, read_all_tensors

    files = find_files(path)
    config = VisionConfig.from_file(files.config)
    # Only the vision tensors (a safetensors checkpoint's LLM is not read again beside the text loader's read)
    raw, origin = read_all_tensors(files, keep=lambda name: name.startswith((TOWER_PREFIX, MERGER_PREFIX)))
    state = {name.removeprefix("model."): tensor.float() for name, tensor in raw.items()}
    with torch.device("meta"):
        module = VisionEncoder(config, mode)
    expected = {name: tensor.shape for name, tensor in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        where = files.index or files.folder
        problem = f"vision tensors missing: {', '.join(missing[:4])}" if missing else \
            f"vision tensors the model does not have: {', '.join(unexpected[:4])}"
        raise InputError(where, problem)
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise InputError(origin["model." + name], f"'model.{name}' has shape {tuple(state[name].shape)}, "
                             f"expected {tuple(shape)}")
    module.load_state_dict(state, assign=True)
    module.vision_tower.embeddings.boundaries = bucket_edges(config.positions_per_side)  # not in the state dict
    module.requires_grad_(False)
    return module.eval()
