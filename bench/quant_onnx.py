"""ONNX quantisation schemes on trained weights: quality vs fp32 next to llama.cpp's Q8_0 / Q4_0
rounding of the same weights, size, twin agreement, and onnxruntime decode speed, in one run.

python -m bench.quant_onnx --model exporter/embedded/minicpm-tiny --scheme '{"scheme": "int4"}' ...

Quality: 8 windows x 256 held-out tokens (2048), one prefill each. Q8_0 / Q4_0 are the llama.cpp
rules applied to every 2-D weight (blocks of 32, fp16 scale; Q4_0 d = max / -8), with and without
the Q8_0 activation rounding llama.cpp's CPU dot products apply. Speed: prefill 64, decode 32,
2 threads, best of 3, every artifact in this process one after another.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from pydantic import TypeAdapter

from cpm_mobile.exporter.models.loader import load_model
from cpm_mobile.exporter.models.variant import derive, with_weights
from cpm_mobile.exporter.targets.onnx.quant import Int8ActivationLinear, fp32_activations, onnx_twin, quantize_onnx
from cpm_mobile.exporter.targets.onnx.target import CacheLayout, build_onnx, save_onnx
from cpm_mobile.exporter.tokenizer import TextTokenizer
from cpm_mobile.exporter.targets.onnx.spec import OnnxQuantization
from cpm_mobile.runtimes.metrics import max_abs_error, mean_kl_divergence, perplexity, sqnr_db, top1_agreement
from cpm_mobile.runtimes.torch_session import TorchSession

HELDOUT = Path(__file__).resolve().parents[1] / "exporter" / "embedded" / "heldout.txt"
WINDOW, WINDOWS = 256, 8


def ggml_rounding(model, kind: str):
    """llama.cpp's Q8_0 / Q4_0 on every 2-D weight (a reference rule, not a shipped quantiser)."""
    weights = {}
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        x = p.detach().float().reshape(-1, 32)
        if kind == "q8_0":
            d = (x.abs().amax(1, keepdim=True) / 127).half().float()
            q = torch.round(x / torch.where(d > 0, d, torch.ones_like(d)))
        else:
            signed_max = torch.gather(x, 1, x.abs().argmax(1, keepdim=True))
            d = signed_max / -8
            inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
            q = torch.clamp(torch.floor(x * inverse + 8.5), max=15) - 8
            d = d.half().float()
        weights[name] = (q * d).reshape(p.shape)
    if model.tied:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    return with_weights(model, weights)


def torch_logits(model, windows):
    session = TorchSession(model)
    out = []
    for tokens in windows:
        session.reset()
        out.append(session.forward(tokens, 0))
    return out


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(sess, tokens, past_len=0, presents=None):
    end = past_len + len(tokens)
    feed = {"input_ids": np.asarray(tokens, np.int64)[None], "attention_mask": np.ones((1, end), np.int64),
            "position_ids": np.arange(past_len, end)[None]}
    past = [value for value in sess.get_inputs() if value.name.startswith("past_key_values")]
    for index, value in enumerate(past):
        feed[value.name] = presents[index] if presents else np.zeros((1, value.shape[1], 0, value.shape[3]), np.float32)
    return feed


def onnx_logits(sess, windows):
    return [sess.run(["logits"], _feed(sess, tokens))[0][0] for tokens in windows]


def speed(sess, prefill=64, decode=32, reps=3) -> tuple[float, float]:
    outputs = [value.name for value in sess.get_outputs()]
    best_decode = best_prefill = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        result = sess.run(outputs, _feed(sess, [5] * prefill))
        best_prefill = max(best_prefill, prefill / (time.perf_counter() - start))
        start = time.perf_counter()
        for step in range(decode):
            token = int(result[0][0, -1].argmax())
            result = sess.run(outputs, _feed(sess, [token], prefill + step, result[1:]))
        best_decode = max(best_decode, decode / (time.perf_counter() - start))
    return best_decode, best_prefill


def quality(reference, actual, windows) -> dict[str, float]:
    ref, act = np.concatenate(reference), np.concatenate(actual)
    ppl = lambda logits: np.exp(np.mean([np.log(perplexity(l, w)[0]) for l, w in zip(logits, windows)]))  # noqa: E731
    return {"kl": mean_kl_divergence(ref, act), "ppl_delta": ppl(actual) / ppl(reference) - 1,
            "top1": top1_agreement(ref, act), "sqnr_db": sqnr_db(ref, act)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--scheme", action="append", required=True, help="a JSON scheme (recipes/quant_onnx.py)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, _ = load_model(args.model, max_seq_len=WINDOW)
    tokens = TextTokenizer.from_folder(args.model).encode(HELDOUT.read_text())
    windows = [np.asarray(tokens[i * WINDOW:(i + 1) * WINDOW]) for i in range(WINDOWS)]
    reference = torch_logits(model, windows)
    rows = []
    for kind in ("q8_0", "q4_0"):
        rounded = ggml_rounding(model, kind)
        rows.append({"row": f"llama.cpp {kind} weights", **quality(reference, torch_logits(rounded, windows), windows)})
        with_activations = derive(rounded, lambda n, m: Int8ActivationLinear(m, 32) if isinstance(m, torch.nn.Linear) else None)
        rows.append({"row": f"llama.cpp {kind} + q8_0 activations",
                     **quality(reference, torch_logits(with_activations, windows), windows)})
    graph = build_onnx(model, CacheLayout.of(model, torch.float32, pad_values=True))
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"fp32": Path(tmp) / "fp32"}
        folders["fp32"].mkdir()
        save_onnx(graph, folders["fp32"], external_data=False)
        fp32_size = (folders["fp32"] / "model.onnx").stat().st_size
        for text in args.scheme:
            scheme = TypeAdapter(OnnxQuantization).validate_python(json.loads(text))
            quantized = quantize_onnx(graph, scheme)
            folder = folders[text] = Path(tmp) / f"q{len(folders)}"
            folder.mkdir()
            save_onnx(quantized, folder, external_data=False)
            shipped = onnx_logits(session(folder / "model.onnx"), windows)
            exact_path = Path(tmp) / "exact.onnx"
            ir.save(fp32_activations(quantized), exact_path)
            exact = onnx_logits(session(exact_path), windows)
            twin = torch_logits(onnx_twin(model, quantized, scheme, activations=False), windows)
            rounding_twin = torch_logits(onnx_twin(model, quantized, scheme), windows)
            size = (folder / "model.onnx").stat().st_size
            tensors = sum(len(t.raw_data) for t in onnx.load(folder / "model.onnx").graph.initializer)
            rows.append({"row": f"onnx {text}", **quality(reference, shipped, windows), "size": size,
                         "size_vs_fp32": size / fp32_size, "tensor_bytes": tensors,
                         "weights_max_abs": max_abs_error(np.concatenate(twin), np.concatenate(exact)),
                         "kernel_sqnr_db": sqnr_db(np.concatenate(rounding_twin), np.concatenate(shipped)),
                         "kernel_kl": mean_kl_divergence(np.concatenate(rounding_twin), np.concatenate(shipped))})
        rows.append({"row": "onnx fp32", "size": fp32_size})
        for name, folder in folders.items():
            decode, prefill = speed(session(folder / "model.onnx"))
            row = next(r for r in rows if r["row"] == f"onnx {name}")
            row.update(decode_tok_s=decode, prefill_tok_s=prefill)
    for row in rows:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
