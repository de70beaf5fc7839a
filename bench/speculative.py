"""Speculative decoding vs plain decoding of the same artifact, same run: tokens/s, ratio, acceptance.

python -m bench.speculative [--model DIR] [--recipe fp32-sparse] [--bundle DIR] [--draft-tokens 4,8]

Exports the model (default: the embedded blockffn-tiny with the fp32-sparse recipe, so each
verification call computes the union of its tokens' active experts once) unless --bundle names
one, then for each runtime decodes prompts of repetitive text (windows of the Python docs in
exporter/embedded/heldout.txt) greedily, alternating plain decoding (one call per token) and
speculative decoding with prompt-lookup drafts (one call per k drafts), and checks that both give
the same tokens. Decode tokens/s sum every call after the prefill; the ratio is speculative over
plain. Writes bench/results/speculative/speculative.json with the command, versions and host load.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

RUNTIMES = ("executorch", "onnx")


def export(model: Path, recipe_name: str, max_seq_len: int, folder: Path) -> Path:
    from cpm_mobile.exporter.pipeline import export_bundle
    from cpm_mobile.recipes import load_recipe
    from cpm_mobile.recipes.schema import recipe_from_dict

    data = load_recipe(recipe_name).model_dump(mode="json")
    data["max_seq_len"] = max_seq_len
    data["targets"] = {k: v for k, v in data["targets"].items() if k in RUNTIMES}
    # A short check: this bench times decoding, the full check is `cpm-mobile export`'s job.
    data["check"].update(prompts=data["check"]["prompts"][:1], max_new_tokens=8, heldout_windows=1, heldout_tokens=32)
    result = export_bundle(model, recipe_from_dict(data), folder, name="bench")
    if not result.passed:
        raise SystemExit(f"{result.bundle}: the bundle failed its check")
    return result.bundle


def prompts_from_heldout(tokenizer, count: int, length: int) -> list[list[int]]:
    from cpm_mobile.exporter.defaults import HELDOUT_TEXT

    ids = tokenizer.encode(HELDOUT_TEXT.read_text(encoding="utf-8"))
    stride = (len(ids) - length) // count
    return [ids[i * stride : i * stride + length] for i in range(count)]


def open_session(bundle: Path, runtime: str, threads: int):
    from cpm_mobile.exporter.generate import select_artifact
    from cpm_mobile.runtimes.base import open_session as open_any

    _, artifact = select_artifact(bundle, runtime)
    if runtime == "onnx":
        from cpm_mobile.runtimes.onnx import open_onnx

        return open_onnx(bundle, artifact, threads=threads)
    return open_any(bundle, artifact)


def decode(session, source, prompt: list[int], new_tokens: int, eos: list[int]):
    from cpm_mobile.exporter.generate import Timings, greedy

    timings = Timings()
    session.reset()
    tokens = list(source(session, prompt, 0, new_tokens, greedy, eos, timings))
    return tokens, timings


def bench_runtime(session, prompts, new_tokens: int, eos: list[int], ks: list[int], repeats: int) -> dict:
    from cpm_mobile.exporter.generate import decode_tokens
    from cpm_mobile.exporter.speculative import NgramDrafter, SpeculativeDecoder

    plain = {"decode_tokens": 0, "decode_s": 0.0}
    speculative = {k: {"decode_tokens": 0, "decode_s": 0.0, "decoder": SpeculativeDecoder(NgramDrafter(), k)}
                   for k in ks}
    same = True
    decode(session, decode_tokens, prompts[0], 4, eos)  # warm-up
    for _ in range(repeats):
        for prompt in prompts:  # interleaved, so load on the machine hits both alike
            expected, timings = decode(session, decode_tokens, prompt, new_tokens, eos)
            plain["decode_tokens"] += timings.decode_tokens
            plain["decode_s"] += timings.decode_s
            for entry in speculative.values():
                tokens, timings = decode(session, entry["decoder"], prompt, new_tokens, eos)
                same &= tokens == expected
                entry["decode_tokens"] += timings.decode_tokens
                entry["decode_s"] += timings.decode_s
    plain_rate = plain["decode_tokens"] / plain["decode_s"]
    result = {"plain_tokens_per_s": plain_rate, "same_tokens": same, "speculative": {},
              "call_ms": call_ms(session, prompts[0], [1, *(k + 1 for k in ks)])}
    for k, entry in speculative.items():
        stats = entry["decoder"].stats
        rate = entry["decode_tokens"] / entry["decode_s"]
        result["speculative"][str(k)] = {
            "tokens_per_s": rate, "ratio": rate / plain_rate, "acceptance_rate": stats.acceptance_rate,
            "tokens_per_call": stats.tokens_per_call,
        }
    return result


def call_ms(session, prompt: list[int], sizes: list[int], calls: int = 30) -> dict[str, float]:
    """Median wall time of one forward call of T tokens after the prompt: what a verification costs vs a decode."""
    session.reset()
    session.forward(np.asarray(prompt, dtype=np.int64), 0)
    times: dict[int, list[float]] = {t: [] for t in sizes}
    for _ in range(calls):
        for t in sizes:  # interleaved, as in speculative decoding
            started = time.perf_counter()
            session.forward(np.asarray(prompt[:t], dtype=np.int64), len(prompt))
            times[t].append(time.perf_counter() - started)
    return {f"T={t}": float(np.median(v)) * 1e3 for t, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    from cpm_mobile.exporter.defaults import DEFAULT_SPARSE_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_SPARSE_MODEL)
    parser.add_argument("--recipe", default="fp32-sparse")
    parser.add_argument("--bundle", type=Path, default=None, help="an exported bundle to use instead of exporting")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--draft-tokens", default="4,8", help="k values, comma-separated")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/speculative"))
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.draft_tokens.split(",") if k]
    runtimes = [r for r in args.runtimes.split(",") if r]
    if not ks or min(ks) < 1:
        parser.error("--draft-tokens needs positive integers")
    if set(runtimes) - set(RUNTIMES):
        parser.error(f"--runtimes: known are {', '.join(RUNTIMES)}")

    import torch

    torch.set_num_threads(args.threads)
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(args.threads)
    from cpm_mobile.exporter.generate import select_artifact
    from cpm_mobile.exporter.tokenizer import TextTokenizer

    with tempfile.TemporaryDirectory(prefix="speculative-") as scratch:
        started = time.perf_counter()
        bundle = args.bundle or export(args.model, args.recipe, args.max_seq_len, Path(scratch))
        export_s = time.perf_counter() - started
        manifest, _ = select_artifact(bundle)
        eos = list(manifest.get("model", {}).get("eos_ids", []))
        prompts = prompts_from_heldout(TextTokenizer.from_folder(bundle), args.prompts, args.prompt_tokens)
        results: dict = {
            "model": str(args.model) if args.bundle is None else None, "recipe": args.recipe if args.bundle is None
            else None, "bundle": str(args.bundle) if args.bundle else None, "threads": args.threads,
            "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "drafting": "ngram (prompt lookup, n <= 3)", "runtimes": {},
        }
        if args.bundle is None:
            print(f"exported {args.model.name} with {args.recipe} in {export_s:.0f} s")
        for runtime in runtimes:
            entry = bench_runtime(open_session(bundle, runtime, args.threads), prompts, args.new_tokens, eos, ks,
                                  args.repeats)
            results["runtimes"][runtime] = entry
            cells = [f"k={k}: {v['tokens_per_s']:.0f} tok/s, {v['ratio']:.2f}x, acceptance {v['acceptance_rate']:.0%}, "
                     f"{v['tokens_per_call']:.2f} tokens/call" for k, v in entry["speculative"].items()]
            print(f"{runtime:<11} plain {entry['plain_tokens_per_s']:.0f} tok/s | " + " | ".join(cells)
                  + ("" if entry["same_tokens"] else " | OUTPUT DIFFERS"))
            print(f"{'':<11} median call: " + ", ".join(f"{t} {ms:.2f} ms" for t, ms in entry["call_ms"].items()))
    from bench.provenance import provenance

    results["provenance"] = provenance(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "speculative.json"
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(results, indent=2) + "\n")
    staging.replace(path)
    print(f"wrote {path}")
    if not all(entry["same_tokens"] for entry in results["runtimes"].values()):
        raise SystemExit("speculative decoding did not reproduce plain greedy decoding")
    return results


if __name__ == "__main__":
    main()
