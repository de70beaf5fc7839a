"""BlockFFN activation-sparsity profiler: token-level and chunk-level sparsity per layer.

Definitions (BlockFFN paper; thunlp/BlockFFN ``stat_window_activation``):

* an expert is *active* for a token when its router score ``RMSNorm(ReLU(x W_r^T))`` is non-zero
  (the module multiplies idle experts by an exact zero);
* token-level sparsity ``TLS = 1 - nnz / (T * E)`` over the T profiled tokens and E experts;
* s-token chunk-level sparsity: split the tokens into non-overlapping chunks of s consecutive
  tokens (an incomplete tail chunk is dropped); a (chunk, expert) pair is active when any token of
  the chunk fires the expert; ``CLS_s = 1 - active_pairs / (chunks * E)``. CLS_1 equals TLS (up to
  the dropped tail). CLS_s is what a sparse kernel that loads the union of experts for s tokens
  (a speculative-decoding draft, a prefill block) actually saves.

The model runs with its real cached forward ``model(tokens, input_pos)``, in windows of its
``max_seq_len`` (cache reset per window); scores are read by forward hooks on each layer's
``mlp.router_norm``. Chunks run across window borders: the stream of tokens is one sequence.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from cpm_mobile.exporter.errors import InputError

DEFAULT_CHUNK_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_MAX_TOKENS = 4096


@dataclass
class LayerSparsity:
    layer: int
    tls: float
    cls: dict[int, float]  # chunk size -> CLS
    expert_rates: list[float] = field(default_factory=list)  # fraction of tokens each expert fires on


@dataclass
class SparsityProfile:
    model_dir: str
    tokens: int
    num_experts: int
    max_seq_len: int
    chunk_sizes: tuple[int, ...]
    layers: list[LayerSparsity]

    @property
    def mean_tls(self) -> float:
        return sum(layer.tls for layer in self.layers) / len(self.layers)

    def mean_cls(self, chunk_size: int) -> float:
        return sum(layer.cls[chunk_size] for layer in self.layers) / len(self.layers)

    def to_dict(self) -> dict:
        """Plain JSON types; chunk sizes as string keys; NaN (no complete chunk) as null."""
        data = asdict(self)
        data["chunk_sizes"] = list(self.chunk_sizes)
        for layer in data["layers"]:
            layer["cls"] = {str(s): _finite(v) for s, v in layer["cls"].items()}
        data["mean"] = {"tls": self.mean_tls, "cls": {str(s): _finite(self.mean_cls(s)) for s in self.chunk_sizes}}
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _finite(value: float) -> float | None:
    return None if value != value else value


def sparsity_metrics(active: torch.Tensor, chunk_sizes: Sequence[int] = DEFAULT_CHUNK_SIZES) -> tuple[float, dict[int, float]]:
    """TLS and CLS_s of one layer from its activity pattern, bool [T, E] (True = expert fires)."""
    if active.dim() != 2:
        raise ValueError(f"activity pattern must be [tokens, experts], got shape {tuple(active.shape)}")
    active = active.bool()
    tokens, experts = active.shape
    if tokens == 0:
        raise ValueError("no tokens to profile")
    tls = 1.0 - active.sum().item() / (tokens * experts)
    cls: dict[int, float] = {}
    for size in chunk_sizes:
        if size < 1:
            raise ValueError(f"chunk size must be positive, got {size}")
        chunks = tokens // size
        if chunks == 0:
            cls[size] = float("nan")
            continue
        fired = active[: chunks * size].view(chunks, size, experts).any(dim=1)
        cls[size] = 1.0 - fired.sum().item() / (chunks * experts)
    return tls, cls


def _load(model_dir: str | Path, max_seq_len: int | None):
    from cpm_mobile.exporter.models.loader import build_model, load_checkpoint

    checkpoint = load_checkpoint(model_dir)
    config = checkpoint.config
    if config.ffn != "blockffn" or config.num_experts <= 0:
        raise InputError(
            model_dir,
            "has no BlockFFN layers (its FFN is the dense gated MLP): sparsity profiling needs a checkpoint "
            "with ffn_type 'block_linear'",
        )
    seq = max_seq_len or min(512, config.max_position_embeddings)
    return build_model(checkpoint, max_seq_len=seq), checkpoint


def _tokenize(model_dir: str | Path, text: str, max_tokens: int | None) -> list[int]:
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise InputError(path, "tokenizer.json not found (needed to tokenize the profiling text)")
    ids = Tokenizer.from_file(str(path)).encode(text).ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids:
        raise InputError(model_dir, "the profiling text is empty")
    return ids


@torch.no_grad()
def router_activity(model, ids: Sequence[int]) -> list[torch.Tensor]:
    """Run ids through the cached forward in windows of max_seq_len; per BlockFFN layer, the router
    scores [T, E] (exact zeros = idle expert)."""
    layers = [layer.mlp for layer in model.layers if hasattr(layer.mlp, "router_norm")]
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [
        mlp.router_norm.register_forward_hook(lambda _m, _i, out, slot=slot: slot.append(out[0].detach().float()))
        for mlp, slot in zip(layers, captured)
    ]
    try:
        window = model.max_seq_len
        for start in range(0, len(ids), window):
            model.reset_cache()
            model(torch.tensor([list(ids[start : start + window])]), torch.tensor([0]))
    finally:
        for handle in handles:
            handle.remove()
        model.reset_cache()
    return [torch.cat(parts) for parts in captured]


def profile_sparsity(
    model_dir: str | Path,
    text: str,
    chunk_sizes: Sequence[int] = DEFAULT_CHUNK_SIZES,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    max_seq_len: int | None = None,
) -> SparsityProfile:
    """TLS and CLS_s per BlockFFN layer of the checkpoint at model_dir, on `text` (its first
    max_tokens tokens, with the checkpoint's tokenizer.json)."""
    model, checkpoint = _load(model_dir, max_seq_len)
    ids = _tokenize(model_dir, text, max_tokens)
    layers = []
    for index, scores in enumerate(router_activity(model, ids)):
        active = scores != 0
        tls, cls = sparsity_metrics(active, chunk_sizes)
        rates = active.float().mean(dim=0).tolist()
        layers.append(LayerSparsity(index, tls, cls, [round(r, 6) for r in rates]))
    return SparsityProfile(
        model_dir=str(model_dir),
        tokens=len(ids),
        num_experts=checkpoint.config.num_experts,
        max_seq_len=model.max_seq_len,
        chunk_sizes=tuple(chunk_sizes),
        layers=layers,
    )


def render_table(profile: SparsityProfile):
    """A rich Table: one row per layer (and the mean), TLS and CLS_s in percent."""
    from rich.table import Table

    table = Table(title=f"BlockFFN sparsity: {profile.tokens} tokens, {profile.num_experts} experts")
    table.add_column("layer", justify="right")
    table.add_column("TLS", justify="right")
    for size in profile.chunk_sizes:
        table.add_column(f"CLS_{size}", justify="right")

    def pct(value: float) -> str:
        return "n/a" if value != value else f"{100 * value:.1f}%"

    for layer in profile.layers:
        table.add_row(str(layer.layer), pct(layer.tls), *(pct(layer.cls[s]) for s in profile.chunk_sizes))
    table.add_row("mean", pct(profile.mean_tls), *(pct(profile.mean_cls(s)) for s in profile.chunk_sizes), style="bold")
    return table


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def write_heatmap_png(profile: SparsityProfile, path: str | Path) -> Path:
    """Heatmap of sparsity, layers (rows) x [TLS, CLS_s for each chunk size] (columns), in percent."""
    import numpy as np

    columns = ["TLS"] + [f"CLS_{s}" for s in profile.chunk_sizes]
    values = np.array([[layer.tls] + [layer.cls[s] for s in profile.chunk_sizes] for layer in profile.layers]) * 100
    figure = _figure(1.0 + 0.8 * len(columns), 1.2 + 0.45 * len(profile.layers))
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    axes.set_yticks(range(len(profile.layers)), [str(layer.layer) for layer in profile.layers])
    axes.set_xlabel("chunk size (tokens)")
    axes.set_ylabel("layer")
    axes.set_title(f"BlockFFN sparsity (%) over {profile.tokens} tokens")
    for row in range(values.shape[0]):
        for col in range(values.shape[1]):
            value = values[row, col]
            if value == value:
                axes.text(col, row, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black", fontsize=8)
    figure.colorbar(image, ax=axes, label="sparsity %")
    return _save(figure, path)


def write_expert_firing_png(
    model_dir: str | Path, text: str, path: str | Path, layer: int = 0, max_tokens: int = 96
) -> Path:
    """Which experts fire along a passage: tokens on x, experts on y, score as colour (idle = white)."""
    import numpy as np
    from tokenizers import Tokenizer

    model, _ = _load(model_dir, None)
    ids = _tokenize(model_dir, text, min(max_tokens, model.max_seq_len))
    activity = router_activity(model, ids)
    if not 0 <= layer < len(activity):
        raise InputError(model_dir, f"layer {layer} out of range (the model has {len(activity)} BlockFFN layers)")
    scores = activity[layer].abs().T.numpy()  # [E, T]
    masked = np.ma.masked_equal(scores, 0.0)
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    labels = [tokenizer.decode([i], skip_special_tokens=False).replace("\n", "\\n") for i in ids]
    figure = _figure(max(6.0, 0.16 * len(ids) + 1.5), max(3.0, 0.14 * scores.shape[0] + 1.5))
    axes = figure.add_subplot()
    image = axes.imshow(masked, cmap="magma_r", aspect="auto", interpolation="nearest")
    axes.set_facecolor("white")
    axes.set_xticks(range(len(ids)), labels, rotation=90, fontsize=6)
    axes.set_ylabel("expert")
    active = scores != 0
    tls, cls = sparsity_metrics(torch.from_numpy(active.T.copy()), (8,))
    axes.set_title(f"layer {layer}: experts firing per token (TLS {100 * tls:.0f}%, CLS_8 {100 * cls[8]:.0f}%)")
    figure.colorbar(image, ax=axes, label="router score |r|")
    return _save(figure, path)
