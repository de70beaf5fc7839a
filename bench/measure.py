"""Time one runtime on one artifact, in its own process so peak memory is its own.

python -m bench.measure --runtime eager|executorch|onnx|coreml --bundle DIR --model CKPT --prefill 128 --decode 32
Prints one JSON object: prefill and decode tokens per second and this process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np


def _session(runtime: str, bundle: Path, model_path: Path, max_seq_len: int):
    if runtime == "eager":
        from cpm_mobile.exporter.models import load_model
        from cpm_mobile.runtimes.torch_session import TorchSession

        return TorchSession(load_model(model_path, max_seq_len=max_seq_len)[0])
    from cpm_mobile.runtimes.base import open_session

    manifest = json.loads((bundle / "artifacts.json").read_text())
    return open_session(bundle, next(a for a in manifest if a["target"] == runtime))


def peak_rss_mb() -> float:
    """This process's own high-water RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from
    the forking parent across exec, so a child of a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(session, prefill: int, decode: int, repeats: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, vocab, size=prefill, dtype=np.int64)
    session.reset()
    session.forward(prompt, 0)  # warm-up: first-call allocations and kernel selection
    prefill_times, decode_times = [], []
    for _ in range(repeats):
        session.reset()
        start = time.perf_counter()
        logits = session.forward(prompt, 0)
        prefill_times.append(time.perf_counter() - start)
        token = np.asarray([int(logits[-1].argmax())], dtype=np.int64)
        start = time.perf_counter()
        for step in range(decode):
            logits = session.forward(token, prefill + step)
            token = np.asarray([int(logits[-1].argmax())], dtype=np.int64)
        decode_times.append((time.perf_counter() - start) / decode)
    prefill_s, decode_s = statistics.median(prefill_times), statistics.median(decode_times)
    return {
        "prefill_tokens": prefill,
        "prefill_s": prefill_s,
        "prefill_tok_per_s": prefill / prefill_s,
        "decode_ms_per_token": decode_s * 1e3,
        "decode_tok_per_s": 1.0 / decode_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--max-seq-len", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    session = _session(args.runtime, args.bundle, args.model, args.max_seq_len)
    print(json.dumps(measure(session, args.prefill, args.decode, args.repeats, args.vocab)))


if __name__ == "__main__":
    main()
