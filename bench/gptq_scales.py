"""What ExecuTorch's bf16 block scales cost a GPTQ checkpoint (fp16 scales), measured eagerly.

python -m bench.gptq_scales [--group 64] [--windows 8] [--window 256]
The embedded minicpm-tiny is written as a symmetric GPTQ checkpoint (AutoGPTQ's rounding, fp16
scales), loaded as the dequantised model (the fidelity reference), and compared on held-out text
with: the .pte's twin (torchao int4 codes = the checkpoint's, bf16-rounded scales, int8 dynamic
activations) and the same twin with the exact fp16 scales, so the scale rounding's share shows
apart from the int8 activations XNNPACK applies anyway. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from cpm_mobile.exporter.defaults import HELDOUT_TEXT
    from cpm_mobile.exporter.models import load_checkpoint, load_model
    from cpm_mobile.exporter.models.loader import checkpoint_state, build_model
    from bench.synthetic import write_gptq_checkpoint
    from cpm_mobile.exporter.models.variant import derive
    from cpm_mobile.exporter.targets.executorch import quant as et_quant
    from cpm_mobile.exporter.tokenizer import TextTokenizer
    from cpm_mobile.exporter.targets.executorch.spec import Int4Scheme
    from cpm_mobile.runtimes.metrics import mean_kl_divergence, perplexity, top1_agreement

    embedded = Path(__file__).resolve().parents[1] / "exporter" / "embedded" / "minicpm-tiny"
    source = build_model(load_checkpoint(embedded), max_seq_len=args.window)
    config = json.loads((embedded / "config.json").read_text())
    with tempfile.TemporaryDirectory() as folder:
        path = write_gptq_checkpoint(Path(folder), config, sym=True, group_size=args.group,
                                     state=checkpoint_state(source))
        model, _ = load_model(path, max_seq_len=args.window)
    scheme = Int4Scheme(scheme="int4", embedding="fp32", lm_head="fp32")
    pte_twin = et_quant.quantize_for_executorch(model, scheme)
    exact_scales = derive(pte_twin, lambda name, module: _with_scales(module, model.config.weight_grid, name))

    tokens = TextTokenizer.from_folder(embedded).encode(Path(HELDOUT_TEXT).read_text())
    windows = [np.asarray(tokens[i * args.window:(i + 1) * args.window]) for i in range(args.windows)]

    def logits(m) -> np.ndarray:
        rows = []
        for window in windows:
            m.reset_cache()
            with torch.no_grad():
                rows.append(m(torch.from_numpy(window)[None], torch.tensor([0]))[0].numpy())
        return np.concatenate(rows)

    def ppl(values: np.ndarray) -> float:
        per = [perplexity(values[i * args.window:(i + 1) * args.window], w)[0] for i, w in enumerate(windows)]
        return float(np.exp(np.mean(np.log(per))))

    reference, original = logits(model), logits(source)
    result = {"tokens": int(sum(map(len, windows))), "group_size": args.group,
              "dequantised_ppl": ppl(reference), "fp32_source_ppl": ppl(original),
              "gptq_vs_fp32_source_kl": mean_kl_divergence(original, reference)}
    scales = torch.cat([g.scales.flatten() for g in model.config.weight_grid.linears.values()])
    rel = (scales.to(torch.bfloat16).float() - scales).abs() / scales
    result["scale_rel_change_max"], result["scale_rel_change_mean"] = float(rel.max()), float(rel.mean())
    for label, variant in (("pte_twin_bf16_scales", pte_twin), ("twin_fp16_scales", exact_scales)):
        values = logits(variant)
        result[label] = {"kl": mean_kl_divergence(reference, values), "top1": top1_agreement(reference, values),
                         "ppl_rel_delta": ppl(values) / result["dequantised_ppl"] - 1,
                         "max_rel_logits": float(np.abs(values - reference).max() / np.abs(reference).max())}
    print(json.dumps(result, indent=2))


def _with_scales(module, grid, name):
    """The twin's linear with the grid's exact fp16 scales instead of their bf16 rounding."""
    from cpm_mobile.exporter.targets.executorch.quant import _linear

    entry = grid.linears.get(f"{name}.weight")
    if entry is None:
        return None
    weight = module.weight
    exact = type(weight)(weight.qdata, entry.scales.clone(), weight.zero_point, weight.target_dtype,
                         weight.block_size, weight.dtype, weight.activation_quantization)
    return _linear(module, exact)


if __name__ == "__main__":
    main()
