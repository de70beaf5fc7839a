"""Held-out measurements of a checkpoint through its real cached forward: perplexity, greedy text."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from cpm_mobile.exporter.models.reference import greedy_generate
from cpm_mobile.exporter.models.transformer import CausalLM


@torch.no_grad()
def perplexity(model: CausalLM, ids: Sequence[int], window: int | None = None) -> float:
    """exp(mean next-token NLL) over `ids`, in non-overlapping windows of max_seq_len tokens, each run
    from an empty cache with model(tokens, input_pos) (the first token of a window is not scored)."""
    window = window or model.max_seq_len
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = list(ids[start : start + window])
        if len(chunk) < 2:
            continue
        model.reset_cache()
        logits = model(torch.tensor([chunk]), torch.tensor([0]))[0].float()
        total += F.cross_entropy(logits[:-1], torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    model.reset_cache()
    return math.exp(total / count)


def greedy_text(model: CausalLM, tokenizer, prompt: str, max_new_tokens: int = 48, stop_ids: Sequence[int] = (2,)) -> str:
    """The greedy continuation of `prompt` (decoded, prompt excluded)."""
    ids = tokenizer.encode(prompt).ids
    run = greedy_generate(model, ids, max_new_tokens, stop_ids=stop_ids)
    return tokenizer.decode(run.generated, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.training.evaluate [MODEL ...]`: held-out perplexity as TRAINING.md reports it."""
    import argparse
    from pathlib import Path

    from cpm_mobile.exporter.defaults import DEFAULT_MODEL, DEFAULT_SPARSE_MODEL, HELDOUT_TEXT
    from cpm_mobile.exporter.models import load_model
    from bench.training.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("models", nargs="*", type=Path, default=[DEFAULT_MODEL, DEFAULT_SPARSE_MODEL])
    parser.add_argument("--text", type=Path, default=HELDOUT_TEXT, help="held-out text (default: the embedded one)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (the models hold 512 positions)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    text = args.text.read_text(encoding="utf-8")
    for folder in args.models:
        model, _ = load_model(folder, max_seq_len=args.window)
        ids = load_tokenizer(folder).encode(text).ids
        print(f"{folder.name}: held-out perplexity {perplexity(model, ids):.2f} over {len(ids)} tokens "
              f"(windows of {args.window})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
