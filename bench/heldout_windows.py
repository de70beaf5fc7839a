"""How many held-out tokens the check needs: spread of the perplexity delta against window count.

For each embedded model, a round-to-nearest 8- and 4-bit copy (blocks of 32, symmetric) stands in
for a quantised artifact; the relative perplexity delta is measured on n consecutive 256-token
windows, over disjoint groups of n, and the spread of those measurements says how stable a check
with n windows is. The recipes' default (16 windows, ~4k tokens) keeps it well under their tightest
perplexity bounds (0.5 % for int8, a few % for int4).

    python -m bench.heldout_windows
"""
from __future__ import annotations

import numpy as np
import torch

from cpm_mobile.exporter.defaults import DEFAULT_MODEL, DEFAULT_SPARSE_MODEL, HELDOUT_TEXT
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint
from cpm_mobile.exporter.models.variant import with_weights
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.runtimes import metrics

WINDOW, TOTAL_WINDOWS, GROUP_SIZES = 256, 64, (2, 8, 16, 32)


def round_to_nearest(weight: torch.Tensor, bits: int, block: int = 32) -> torch.Tensor:
    blocks = weight.reshape(-1, block)
    scale = blocks.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
    return (torch.round(blocks / scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale).reshape(weight.shape)


def window_nll(model, window: list[int]) -> float:
    model.reset_cache()
    with torch.no_grad():
        logits = model(torch.tensor([window]), torch.tensor([0]))[0].numpy()
    log_probs = metrics.log_softmax(logits[:-1])
    return float(-log_probs[np.arange(len(window) - 1), window[1:]].mean())


def main() -> None:
    torch.set_num_threads(2)
    print("model          bits  windows  tokens  ppl delta  spread (sd)")
    for path in (DEFAULT_MODEL, DEFAULT_SPARSE_MODEL):
        model = build_model(load_checkpoint(path), max_seq_len=WINDOW)
        ids = TextTokenizer.from_folder(path).encode(HELDOUT_TEXT.read_text(encoding="utf-8"))
        windows = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(TOTAL_WINDOWS)]
        reference = np.array([window_nll(model, w) for w in windows])
        for bits in (8, 4):
            rounded = with_weights(model, {n: round_to_nearest(p.detach(), bits) for n, p in model.named_parameters()
                                           if p.dim() == 2 and "embed" not in n})
            delta = np.array([window_nll(rounded, w) for w in windows]) - reference
            for n in GROUP_SIZES:
                groups = [np.exp(delta[i:i + n].mean()) - 1 for i in range(0, TOTAL_WINDOWS - n + 1, n)]
                print(f"{path.name:14s} {bits:4d}  {n:7d}  {n * (WINDOW - 1):6d}  {np.mean(groups) * 100:+8.2f} %"
                      f"  {np.std(groups) * 100:8.2f} %")


if __name__ == "__main__":
    main()
