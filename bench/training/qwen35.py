"""A trained Qwen3.5-style hybrid model for the quality benches: Gated DeltaNet and gated attention layers
(3:1), trained with transformers' own Qwen3_5ForCausalLM on the embedded fixtures' corpus and tokenizer.

    python -m bench.training.qwen35 --out ~/.cache/cpm-mobile/qwen35-hybrid12 --layers 12 --steps 600

Writes the checkpoint as save_pretrained does (bf16, tied embeddings) with the embedded models' tokenizer.
transformers' model is the one trained (its chunked delta rule has a backward; our export module's
recurrence op has none), so the checkpoint is a real Qwen3.5 folder that no code of ours produced.
Then, for example:

    python -m bench.quality --model OUT --recipe int8 --recipe int4 --recipe int4-gptq --target executorch
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.deterministic

from bench.training.corpus import build_corpus
from bench.training.train_fixtures import MAX_POSITIONS, SEED, Batches, Settings, lr_factor, seed_everything, token_stream
from bench.training.tokenizer import BOS_ID, EOS_ID, IM_END_ID, load_tokenizer

EMBEDDED_TOKENIZER = Path(__file__).resolve().parents[2] / "exporter" / "embedded" / "minicpm-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def text_config(layers: int, vocab_size: int) -> dict:
    """MiniCPM-V 4.6's LLM shape (Qwen3.5-0.8B) scaled to minicpm-tiny's width: 3 linear layers per full one."""
    return dict(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=4,
        linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True, bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, IM_END_ID], rms_norm_eps=1e-6,
    )


def train(model: torch.nn.Module, stream: torch.Tensor, settings: Settings, log=print) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=settings.weight_decay)
    batches = Batches(stream, settings.batch, settings.seq_len, settings.seed)
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step, settings)
        batch = batches.next()
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            recent = losses[-settings.log_every:]
            log(f"step {step + 1}/{settings.steps} loss {sum(recent) / len(recent):.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.utils.deterministic.fill_uninitialized_memory = False
    seed_everything(SEED)
    corpus = build_corpus()
    tokenizer = load_tokenizer(EMBEDDED_TOKENIZER)
    stream = token_stream(tokenizer, corpus.train_docs)
    config = transformers.Qwen3_5TextConfig(**text_config(args.layers, tokenizer.get_vocab_size()))
    model = transformers.Qwen3_5ForCausalLM(config)
    settings = Settings(steps=args.steps, lr=args.lr, batch=4, seq_len=256, warmup_steps=40, log_every=25)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(stream)} training tokens")
    started = time.perf_counter()
    train(model, stream, settings)
    model.eval()
    if args.out.exists():
        shutil.rmtree(args.out)
    model.to(torch.bfloat16).save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        shutil.copy(EMBEDDED_TOKENIZER / name, args.out / name)
    (args.out / "training.json").write_text(json.dumps({
        "layers": args.layers, "steps": args.steps, "lr": args.lr, "seed": SEED, "threads": args.threads,
        "wall_s": round(time.perf_counter() - started), "corpus_sha256": corpus.summary().get("sha256"),
    }, indent=2) + "\n")
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
