"""Why round to nearest could not reach Q4_0 through XNNPACK, on the trained hybrid (eager, weights only, the fp32
recipe's check plan: 16 x 256 held-out tokens):

    PYTHONPATH=. python bench/reports/quality-qwen35-hybrid24/rounding_rules.py [MODEL]

Prints the KL of llama.cpp's Q4_0 rounding (bench.ggml) and of the .pte's former round-to-nearest rule (symmetric,
positive bf16 block scales searched for the least squared error: XNNPACK's constraint), both with Q4_0's Q6_K
embedding, and the ratio of their squared weight errors over the body's linears.
"""
import copy
import sys
from pathlib import Path

import torch

from bench.ggml import llamacpp_rounded
from cpm_mobile.exporter import estimate as est
from cpm_mobile.exporter.defaults import HELDOUT_TEXT, read_heldout
from cpm_mobile.exporter.models.loader import build_model, load_checkpoint
from cpm_mobile.exporter.targets.executorch.quant import _mse_int4
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.verify import build_plan
from cpm_mobile.recipes import load_recipe
from cpm_mobile.runtimes.check import compare, teacher_forced_runs
from cpm_mobile.runtimes.torch_session import TorchSession

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/cpm-mobile/qwen35-hybrid24").expanduser()
checkpoint = load_checkpoint(folder)
tokenizer = TextTokenizer.from_folder(checkpoint.folder)
recipe = load_recipe("fp32")
plan = build_plan(recipe, tokenizer, read_heldout(None), recipe.max_seq_len, checkpoint.config.eos_token_ids,
                  HELDOUT_TEXT)
reference = build_model(checkpoint, max_seq_len=recipe.max_seq_len)
expected = est.reference_runs(reference, plan)


def kl(model) -> str:
    metrics = compare(expected, teacher_forced_runs(TorchSession(model), plan, expected), plan)
    return f"KL {metrics['kl']:.3e}, ppl {metrics['ppl_rel_delta'] * 100:+.2f} %"


q4_0 = llamacpp_rounded(reference, "Q4_0")
ours = copy.deepcopy(q4_0)  # Q4_0's embedding (Q6_K), the body rounded our way
ours_error = q4_0_error = 0.0
with torch.no_grad():
    q4_0_modules = dict(q4_0.named_modules())
    reference_modules = dict(reference.named_modules())
    for name, module in ours.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            weight = reference_modules[name].weight
            codes, scales = _mse_int4(weight, 32)
            rounded = (codes.float().reshape(-1, 32) * scales.float().reshape(-1, 1)).reshape(weight.shape)
            ours_error += ((rounded - weight) ** 2).sum().item()
            q4_0_error += ((q4_0_modules[name].weight - weight) ** 2).sum().item()
            module.weight.copy_(rounded)
print(f"Q4_0 (signed scales, extreme on -8): {kl(q4_0)}")
print(f"positive bf16 scales, least squares: {kl(ours)}")
print(f"squared weight error, ours / Q4_0's: {ours_error / q4_0_error:.3f}")
