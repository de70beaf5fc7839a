"""Train the embedded fixture models: a byte-level BPE tokenizer, then `minicpm-tiny` and `blockffn-tiny`.

    python -m bench.training.train_fixtures --out exporter/embedded

Both models share one backbone (MiniCPM: GQA attention, muP scalings scale_emb / scale_depth /
dim_model_base, tied embeddings) and differ only in the FFN: MiniCPM's gated SiLU MLP, or
BlockFFN's ReLU-routed experts with RMSNorm after the router (as BlockFFN-3B: GQA attention).
Parameter counts match (3 * H * I for the MLP vs 2 * H * E * de + H * E for BlockFFN).

Training uses the export module itself: ``CausalLM.decode`` with a causal SDPA ``attend`` (the same
math as the cached forward). The BlockFFN model adds the paper's activation-locality loss
(2e-3, alpha 100) and chunk-sparsification loss (adaptive lambda from 5e-2, chunk size
``chunk_size``), reading the pre-ReLU router logits with forward hooks on ``mlp.router_proj``.

Everything is seeded and the data order is fixed: a rerun with the same seed, Python version and
thread count reproduces the losses bit for bit (torch.use_deterministic_algorithms is on).
Measurements are taken on the stored bfloat16 weights, loaded back with exporter.models.load_model.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.deterministic
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cpm_mobile.exporter.models.config import ModelConfig
from cpm_mobile.exporter.models.loader import checkpoint_state, load_model
from bench.synthetic import write_checkpoint
from cpm_mobile.exporter.models.transformer import CausalLM
from bench.training.corpus import Corpus, build_corpus
from bench.training.evaluate import greedy_text, perplexity
from bench.training.losses import (
    CHUNK_LAMBDA_START,
    LOCALITY_ALPHA,
    LOCALITY_WEIGHT,
    AdaptiveCoefficient,
    activation_locality_loss,
    chunk_activation_rate,
    chunk_sparsification_loss,
)
from bench.training.tokenizer import BOS_ID, EOS_ID, IM_END_ID, load_tokenizer, save_tokenizer, train_tokenizer

SEED = 1234
VOCAB_SIZE = 4096
MAX_POSITIONS = 512
THREADS = 2
STORE_DTYPE = "bfloat16"
PROMPT_CHARS = 120  # the greedy sample's prompt: the start of a held-out document

BACKBONE = {
    "architectures": ["MiniCPMForCausalLM"],
    "model_type": "minicpm",
    "hidden_act": "silu",
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": MAX_POSITIONS,
    "bos_token_id": BOS_ID,
    "eos_token_id": [EOS_ID, IM_END_ID],
    "tie_word_embeddings": True,
    "scale_emb": 12,
    "dim_model_base": 64,
    "scale_depth": 1.4,
}
MLP = {"intermediate_size": 384}
BLOCKFFN = {
    "ffn_type": "block_linear",
    "router_act": "relu",
    "norm_after_router": "rms",
    "num_experts": 32,
    "expert_size": 18,
}


def model_config(kind: str) -> dict:
    if kind == "minicpm-tiny":
        return {**BACKBONE, **MLP}
    if kind == "blockffn-tiny":
        return {**BACKBONE, "architectures": ["MiniCPMForCausalLM"], **BLOCKFFN}
    raise ValueError(kind)


@dataclass
class Settings:
    steps: int = 1500
    batch: int = 2
    seq_len: int = MAX_POSITIONS
    lr: float = 1e-2  # muP base rate: embeddings and norms; hidden matrices get lr / (hidden / dim_model_base)
    warmup_steps: int = 60
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays the rate to final_lr_ratio
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.1
    clip: float = 1.0
    init_std: float = 0.1
    seed: int = SEED
    # BlockFFN
    locality_weight: float = LOCALITY_WEIGHT
    locality_alpha: float = LOCALITY_ALPHA
    # The paper trains L_CS on 64-token chunks of 4096-token sequences; our sequences are 512 tokens, so
    # 16-token chunks (32 per sequence), still twice the 8-token CLS the target is measured at.
    chunk_size: int = 16
    lambda_start: float = CHUNK_LAMBDA_START
    target_cls: float = 0.70  # target chunk-level sparsity at `track_chunk` tokens
    track_chunk: int = 8
    lambda_window: int = 50
    lambda_stable: int = 100
    lambda_max_factor: float = 40.0  # lambda stays within [0.1, 40] x lambda_start
    log_every: int = 25


@dataclass
class RunResult:
    name: str
    steps: int
    tokens_seen: int
    wall_s: float
    losses: list[float] = field(default_factory=list)
    final: dict = field(default_factory=dict)


# -- data ----------------------------------------------------------------------------------------


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """<s> doc </s> for each document, concatenated, as one int64 tensor."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(docs):
        ids.extend(encoding.ids)  # the post-processor prepends <s>
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.int64)


class Batches:
    """Windows of seq_len + 1 tokens in a seeded order: each epoch shifts the window grid by a random
    offset and visits its windows in a random permutation."""

    def __init__(self, stream: torch.Tensor, batch: int, seq_len: int, seed: int):
        self.stream, self.batch, self.seq_len = stream, batch, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []
        self.epochs = 0

    def _refill(self) -> None:
        offset = int(torch.randint(0, self.seq_len, (1,), generator=self.generator))
        starts = torch.arange(offset, len(self.stream) - self.seq_len - 1, self.seq_len)
        self.queue.extend(starts[torch.randperm(len(starts), generator=self.generator)].tolist())
        self.epochs += 1

    def next(self) -> torch.Tensor:
        while len(self.queue) < self.batch:
            self._refill()
        starts, self.queue = self.queue[: self.batch], self.queue[self.batch :]
        return torch.stack([self.stream[s : s + self.seq_len + 1] for s in starts])


# -- model and optimiser -------------------------------------------------------------------------


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,Dv]: causal SDPA, GQA by repeat_interleave, scale D^-0.5."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=q.shape[-1] ** -0.5).transpose(1, 2)


def width_multiplier(config: dict) -> float:
    return config["hidden_size"] / config["dim_model_base"]


def build_model(config: dict, settings: Settings) -> CausalLM:
    """A CausalLM with MiniCPM's muP initialisation: N(0, init_std) embeddings, N(0, init_std/sqrt(m))
    hidden matrices (m the width multiplier), unit norm gains; tied embeddings."""
    model = CausalLM(ModelConfig.from_hf_dict(config), max_seq_len=settings.seq_len)
    model.tie_embeddings()
    std = settings.init_std / math.sqrt(width_multiplier(config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name == "embed_tokens.weight":
                param.normal_(0.0, settings.init_std)
            else:
                param.normal_(0.0, std)
    return model


def make_optimizer(model: CausalLM, config: dict, settings: Settings) -> torch.optim.Optimizer:
    hidden, other = [], []
    for name, param in model.named_parameters():
        (other if name.endswith("norm.weight") or name == "embed_tokens.weight" else hidden).append(param)
    groups = [
        {"params": hidden, "lr_scale": 1.0 / width_multiplier(config), "weight_decay": settings.weight_decay},
        {"params": other, "lr_scale": 1.0, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, settings: Settings) -> float:
    """Warmup-stable-decay (MiniCPM's WSD): linear warmup, constant, then exponential decay."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    decay_start = int(settings.steps * (1 - settings.decay_fraction))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, settings.steps - decay_start)
    return settings.final_lr_ratio**progress


# -- training ------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(name: str, config: dict, stream: torch.Tensor, settings: Settings, console: Console) -> tuple[CausalLM, RunResult]:
    seed_everything(settings.seed)
    model = build_model(config, settings)
    model.train()
    optimizer = make_optimizer(model, config, settings)
    batches = Batches(stream, settings.batch, settings.seq_len, settings.seed)
    blockffn = config.get("ffn_type") == "block_linear"
    logits_by_layer: list[torch.Tensor] = []
    hooks = []
    if blockffn:
        for layer in model.layers:
            hooks.append(layer.mlp.router_proj.register_forward_hook(lambda _m, _i, out: logits_by_layer.append(out)))
    coefficient = AdaptiveCoefficient(
        start=settings.lambda_start,
        target_rate=1.0 - settings.target_cls,
        stable_steps=settings.lambda_stable,
        window=settings.lambda_window,
        max_factor=settings.lambda_max_factor,
    )
    positions = torch.arange(settings.seq_len)
    attends = [causal_attend] * len(model.layers)
    result = RunResult(name, settings.steps, 0, 0.0)
    columns = (
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    start = time.perf_counter()
    recent: list[dict] = []
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(name, total=settings.steps, info="")
        for step in range(settings.steps):
            factor = lr_factor(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * factor * group["lr_scale"]
            batch = batches.next()
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits_by_layer.clear()
            logits = model.decode(inputs, positions, attends)
            lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            loss = lm_loss
            stats = {"lm": lm_loss.item()}
            if blockffn:
                boundary = inputs == BOS_ID
                lam = coefficient.value
                locality = torch.stack([activation_locality_loss(s, boundary, settings.locality_alpha) for s in logits_by_layer]).mean()
                chunk = torch.stack([chunk_sparsification_loss(s, settings.chunk_size) for s in logits_by_layer]).mean()
                loss = loss + settings.locality_weight * locality + lam * chunk
                with torch.no_grad():
                    tls = 1.0 - float(torch.stack([(s > 0).float().mean() for s in logits_by_layer]).mean())
                    rate = sum(chunk_activation_rate(s.detach(), settings.track_chunk) for s in logits_by_layer) / len(logits_by_layer)
                coefficient.step(rate)
                stats.update(al=locality.item(), cs=chunk.item(), lam=lam, tls=tls, cls=1.0 - rate)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
            optimizer.step()
            result.losses.append(round(loss.item(), 6))
            result.tokens_seen += inputs.numel()
            recent.append(stats)
            recent = recent[-settings.log_every :]
            mean = {k: sum(r[k] for r in recent) / len(recent) for k in stats}
            info = f"lm {mean['lm']:.3f}"
            if blockffn:
                info += f" TLS {100 * mean['tls']:.1f}% CLS{settings.track_chunk} {100 * mean['cls']:.1f}% λ {stats['lam']:.3g}"
            progress.update(task, advance=1, info=info)
            if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
                elapsed = time.perf_counter() - start
                progress.console.log(
                    f"{name} step {step + 1}/{settings.steps} {info} lr {settings.lr * factor:.2e} "
                    f"{result.tokens_seen / elapsed:.0f} tok/s"
                )
    for hook in hooks:
        hook.remove()
    result.wall_s = time.perf_counter() - start
    result.final = {k: round(v, 5) for k, v in mean.items()}
    result.final["epochs"] = round(result.tokens_seen / len(stream), 2)
    model.eval()
    return model, result


# -- saving and measuring ------------------------------------------------------------------------


def save_model(folder: Path, model: CausalLM, config: dict, tokenizer) -> Path:
    write_checkpoint(folder, config, checkpoint_state(model), dtype=STORE_DTYPE, layout="safetensors")
    save_tokenizer(tokenizer, folder, MAX_POSITIONS)
    generation = {
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, IM_END_ID],
        "do_sample": False,
        "max_new_tokens": 64,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder


def sample_prompt(corpus: Corpus) -> str:
    """The first words of the first held-out document (cut at a word boundary)."""
    text = corpus.heldout_docs[0][:PROMPT_CHARS]
    return text[: text.rfind(" ")]


def measure(folder: Path, heldout: str, prompt: str) -> dict:
    """Metrics of the checkpoint as stored (bf16 weights loaded back by load_model)."""
    from cpm_mobile.exporter.analysis.sparsity import profile_sparsity

    model, checkpoint = load_model(folder, max_seq_len=MAX_POSITIONS)
    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode(heldout).ids
    metrics = {
        "parameters": sum(t.numel() for t in checkpoint.state.values()),
        "weights_bytes": (folder / "model.safetensors").stat().st_size,
        "heldout_tokens": len(ids),
        "heldout_ppl": round(perplexity(model, ids), 3),
        "sample_prompt": prompt,
        "sample_continuation": greedy_text(model, tokenizer, prompt, max_new_tokens=48),
    }
    if checkpoint.config.ffn == "blockffn":
        profile = profile_sparsity(folder, heldout, max_tokens=None)
        metrics["tls"] = round(profile.mean_tls, 4)
        metrics["cls"] = {s: round(profile.mean_cls(s), 4) for s in profile.chunk_sizes}
        metrics["per_layer"] = [
            {
                "layer": layer.layer,
                "tls": round(layer.tls, 4),
                "cls": {s: round(v, 4) for s, v in layer.cls.items()},
                "experts_used": sum(rate >= 0.01 for rate in layer.expert_rates),
                "expert_rates": sorted((round(rate, 3) for rate in layer.expert_rates), reverse=True),
            }
            for layer in profile.layers
        ]
    return metrics


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_report(out: Path, corpus: Corpus, settings: Settings, runs: dict, metrics: dict, timings: dict, argv: list[str]) -> None:
    mini, block = metrics["minicpm-tiny"], metrics["blockffn-tiny"]
    ratio = block["heldout_ppl"] / mini["heldout_ppl"]
    summary = corpus.summary()
    lines = [
        "# Embedded fixture models",
        "",
        "Two tiny models trained from scratch on CPython's own documentation, shipped so every command",
        "works offline. Same backbone (MiniCPM GQA + muP), different FFN: `minicpm-tiny` (gated SiLU MLP)",
        f"and `blockffn-tiny` (BlockFFN: ReLU router + RMSNorm, {BLOCKFFN['num_experts']} experts of width"
        f" {BLOCKFFN['expert_size']}; gated MLP width {MLP['intermediate_size']}). Weights are stored",
        f"as {STORE_DTYPE}; every number below was measured on the stored weights loaded with `load_model`.",
        "",
        "## Reproduce",
        "",
        "```bash",
        "python -m bench.training.train_fixtures " + " ".join(argv),
        "```",
        "",
        f"- seed {settings.seed}; torch {torch.__version__}; {corpus.python_version} on {platform.machine()};"
        f" {THREADS} threads; torch.use_deterministic_algorithms(True)",
        f"- corpus sha256 `{corpus.sha256}` ({summary['documents']} documents: {summary['sources']})",
        f"- train {summary['train_documents']} documents / {summary['train_chars']} chars;"
        f" held-out every 10th document: {summary['heldout_documents']} documents / {summary['heldout_chars']} chars"
        f" ({100 * summary['heldout_fraction']:.1f}%), in `heldout.txt`",
        f"- tokenizer: byte-level BPE, vocab {VOCAB_SIZE}; <unk>=0 <s>=1 </s>=2 <|im_start|>=3 <|im_end|>=4",
        f"- durations: total {timings['total_s']:.0f} s (tokenizer {timings['tokenizer_s']:.1f} s,"
        f" minicpm-tiny {runs['minicpm-tiny'].wall_s:.0f} s, blockffn-tiny {runs['blockffn-tiny'].wall_s:.0f} s,"
        f" measuring {timings['measure_s']:.0f} s)",
        "",
        "## Training",
        "",
        f"- {settings.steps} steps x {settings.batch} x {settings.seq_len} tokens"
        f" ({runs['minicpm-tiny'].tokens_seen} tokens, {runs['minicpm-tiny'].final['epochs']} epochs);"
        f" AdamW (0.9, 0.95), wd {settings.weight_decay}; muP: lr {settings.lr} for embeddings and norms,"
        f" lr / {width_multiplier(BACKBONE):g} for hidden matrices; WSD schedule (warmup {settings.warmup_steps},"
        f" last {int(100 * settings.decay_fraction)}% exponential decay to {settings.final_lr_ratio}x); clip {settings.clip}",
        f"- blockffn-tiny adds activation locality ({settings.locality_weight} x BCE, alpha {settings.locality_alpha:g})"
        f" and chunk sparsification (chunk {settings.chunk_size} tokens, lambda from {settings.lambda_start}, adapted every"
        f" {settings.lambda_window} steps toward CLS_{settings.track_chunk} = {settings.target_cls:.0%}; final lambda"
        f" {runs['blockffn-tiny'].final.get('lam', float('nan')):.3g})",
        f"- final training loss (mean of last {settings.log_every} steps): " + ", ".join(
            f"{name} {run.final['lm']:.3f}" for name, run in runs.items()
        ),
        f"- loss sha256 (reproducibility): "
        + ", ".join(f"{name} `{hashlib.sha256(json.dumps(run.losses).encode()).hexdigest()[:16]}`" for name, run in runs.items()),
        "",
        "## Results (held-out text)",
        "",
        "| model | parameters | weights | held-out ppl | TLS | CLS_8 |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        tls = f"{100 * m['tls']:.1f}%" if "tls" in m else "-"
        cls8 = f"{100 * m['cls'][8]:.1f}%" if "cls" in m else "-"
        lines.append(
            f"| {name} | {m['parameters']:,} | {m['weights_bytes'] / 1e6:.2f} MB | {m['heldout_ppl']:.2f} | {tls} | {cls8} |"
        )
    lines += [
        "",
        f"Held-out perplexity ratio blockffn / minicpm: {ratio:.3f} ({block['heldout_tokens']} tokens of heldout.txt,"
        f" windows of {MAX_POSITIONS} through the cached forward).",
        "",
        "blockffn-tiny sparsity per layer (%):",
        "",
        "| layer | TLS | " + " | ".join(f"CLS_{s}" for s in block["cls"]) + " | experts firing on >= 1% of tokens |",
        "|---|---|" + "---|" * len(block["cls"]) + "---|",
    ]
    for layer in block["per_layer"] + [{"layer": "mean", "tls": block["tls"], "cls": block["cls"]}]:
        used = layer.get("experts_used", "")
        lines.append(
            f"| {layer['layer']} | {100 * layer['tls']:.1f} | "
            + " | ".join(f"{100 * v:.1f}" for v in layer["cls"].values())
            + f" | {used}{'/' + str(BLOCKFFN['num_experts']) if used != '' else ''} |"
        )
    lines += ["", "## Greedy continuation of a held-out prompt", ""]
    for name, m in metrics.items():
        lines += [f"**{name}**, prompt `{m['sample_prompt']!r}`:", "", "```", m["sample_prompt"] + m["sample_continuation"], "```", ""]
    lines += [f"Size of exporter/embedded: {timings['embedded_bytes'] / 1e6:.2f} MB.", ""]
    lines += ["## Metrics (JSON)", "", "```json", json.dumps({"metrics": metrics, "settings": asdict(settings)}, indent=1), "```", ""]
    (out / "TRAINING.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (e.g. exporter/embedded)")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--only", choices=["minicpm-tiny", "blockffn-tiny"], help="train one model only (no report)")
    parser.add_argument("--losses-json", type=Path, help="also write the per-step losses here (reproducibility checks)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a Settings field")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4): a deeper model of the same width, "
                                                   "for measurements at real depth (bench.quality --model)")
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args(argv)
    raw_argv = list(sys.argv[1:] if argv is None else argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    # Filling every fresh tensor with NaN (the deterministic mode's default) only costs time here.
    torch.utils.deterministic.fill_uninitialized_memory = False
    settings = Settings(steps=args.steps, seed=args.seed)
    for item in args.set:
        key, value = item.split("=", 1)
        settings = replace(settings, **{key: type(getattr(settings, key))(value)})
    console = Console()
    total_start = time.perf_counter()

    corpus = build_corpus()
    console.log(f"corpus: {corpus.summary()}")
    tokenizer_start = time.perf_counter()
    tokenizer = train_tokenizer(corpus.train_docs, VOCAB_SIZE)
    tokenizer_s = time.perf_counter() - tokenizer_start
    stream = token_stream(tokenizer, corpus.train_docs)
    console.log(f"tokenizer: vocab {tokenizer.get_vocab_size()}, {len(stream)} training tokens ({tokenizer_s:.1f} s)")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = [args.only] if args.only else ["minicpm-tiny", "blockffn-tiny"]
    runs: dict[str, RunResult] = {}
    for name in names:
        config = model_config(name)
        if args.layers:
            config["num_hidden_layers"] = args.layers
        model, runs[name] = train(name, config, stream, settings, console)
        save_model(out / name, model, config, tokenizer)
        console.log(f"{name}: {runs[name].wall_s:.0f} s, final {runs[name].final}")
    if args.losses_json:
        args.losses_json.write_text(json.dumps({n: r.losses for n, r in runs.items()}))

    (out / "heldout.txt").write_text(corpus.heldout_text + "\n")
    measure_start = time.perf_counter()
    prompt = sample_prompt(corpus)
    metrics = {name: measure(out / name, corpus.heldout_text, prompt) for name in names}
    measure_s = time.perf_counter() - measure_start
    for name, m in metrics.items():
        console.log(name, {k: v for k, v in m.items() if k != "per_layer"})
    if len(names) == 2:
        timings = {
            "total_s": time.perf_counter() - total_start,
            "tokenizer_s": tokenizer_s,
            "measure_s": measure_s,
            "embedded_bytes": 0,
        }
        write_report(out, corpus, settings, runs, metrics, timings, raw_argv)
        timings["embedded_bytes"] = folder_bytes(out)
        write_report(out, corpus, settings, runs, metrics, timings, raw_argv)
        console.log(f"wrote {out} ({timings['embedded_bytes'] / 1e6:.2f} MB) in {timings['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
