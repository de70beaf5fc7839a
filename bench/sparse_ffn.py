"""Dense vs sparse BlockFFN (the `blockffn_sparse` pass) in eager, onnxruntime and ExecuTorch.

python -m bench.sparse_ffn [--model DIR | --synthetic] [--out DIR] [--threads 1]

--model defaults to exporter/embedded/blockffn-tiny when that checkpoint exists, else (or with
--synthetic) a random checkpoint with blockffn-small's widths (H 768, 48 experts of 64; 4 layers,
vocab 8000). Random router weights fire about half the experts per token, far more than a trained
BlockFFN, so the measured active fraction is printed next to every speed, and a sweep with planted
routers (exactly k of E experts active) shows where the sparse form starts to pay in each runtime.

Every speed is time(sparse) / time(dense) measured in the same run (< 1: the sparse form is faster):
- layer: one FFN layer on the model's own FFN inputs (captured from a text), one token per call
  (decode, T1) and 8-token chunks (T8);
- sweep: the same layer with a router planted so that a fixed fraction of experts fires;
- whole_model: one decode step after a prefill, and one 8-token chunk after the prefill.
Also the largest sparse-vs-dense output difference in each runtime. Writes sparse_ffn.json and
sparse_ffn.png to --out. Weights are cache-resident in the layer timings (the same layer runs
again and again), which favours the dense form; the whole model reads each layer once per step.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exporter.models import load_checkpoint, write_synthetic_checkpoint
from exporter.models.ffn import BlockFFN
from exporter.models.loader import build_model
from exporter.models.transformer import CausalLM
from exporter.passes.blockffn_sparse import SparseBlockFFN, blockffn_sparse
from exporter.targets import ExportContext, get_target

EMBEDDED = Path(__file__).resolve().parents[1] / "exporter" / "embedded" / "blockffn-tiny"
RUNTIMES = ("eager", "onnx", "executorch")
CHUNK = 8
CALLS = ("T1", f"T{CHUNK}")
SYNTHETIC = dict(num_hidden_layers=4, vocab_size=8000)  # blockffn-small widths otherwise
SWEEP_FRACTIONS = (0.125, 0.25, 0.5, 1.0)

Runner = Callable[[np.ndarray], np.ndarray]


# -- model and inputs ----------------------------------------------------------------------------


def resolve_model(path: Path | None, synthetic: bool, scratch: Path) -> tuple[Path, str]:
    if path is not None:
        return path, str(path)
    if not synthetic and (EMBEDDED / "config.json").is_file():
        return EMBEDDED, str(EMBEDDED)
    folder = write_synthetic_checkpoint(scratch / "blockffn-synthetic", "blockffn-small", **SYNTHETIC)
    return folder, f"synthetic blockffn-small {SYNTHETIC}"


def text_tokens(checkpoint_folder: Path, vocab_size: int, count: int) -> np.ndarray:
    """Token ids of English text when the checkpoint has a tokenizer, else random ids."""
    tokenizer_file = checkpoint_folder / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        text = " ".join(__doc__.split()) * 4
        ids = [i for i in Tokenizer.from_file(str(tokenizer_file)).encode(text).ids if i < vocab_size]
        if len(ids) >= count:
            return np.asarray(ids[:count], dtype=np.int64)
    return np.random.default_rng(0).integers(3, vocab_size, size=count, dtype=np.int64)


def ffn_inputs(model: CausalLM, tokens: np.ndarray) -> list[torch.Tensor]:
    """Each layer's FFN input [T, H] for the tokens, from the model's own forward."""
    captured: list[torch.Tensor] = [torch.empty(0)] * len(model.layers)

    def keep(index: int):
        return lambda _module, args: captured.__setitem__(index, args[0][0].detach().clone())

    hooks = [layer.mlp.register_forward_pre_hook(keep(i)) for i, layer in enumerate(model.layers)]
    try:
        model.reset_cache()
        with torch.no_grad():
            model(torch.from_numpy(tokens)[None], torch.tensor([0]))
    finally:
        for hook in hooks:
            hook.remove()
        model.reset_cache()
    return captured


def union_fraction(ffn: BlockFFN, x: torch.Tensor, chunk: int) -> float:
    """Mean fraction of experts active for some token of a call of `chunk` consecutive tokens."""
    with torch.no_grad():
        active = ffn.router_scores(x) != 0  # [T, E]
    calls = active[: len(active) // chunk * chunk].reshape(-1, chunk, active.shape[-1]).any(1)
    return float(calls.float().mean())


def calls_of(x: torch.Tensor) -> dict[str, list[np.ndarray]]:
    """The FFN inputs cut into decode calls [1, 1, H] and chunk calls [1, CHUNK, H]."""
    tokens = x.numpy()[None]
    return {"T1": [tokens[:, i : i + 1] for i in range(tokens.shape[1])],
            f"T{CHUNK}": [tokens[:, i : i + CHUNK] for i in range(0, tokens.shape[1] - CHUNK + 1, CHUNK)]}


def planted(dense: BlockFFN, x: torch.Tensor, fraction: float) -> tuple[BlockFFN, torch.Tensor]:
    """A copy of the layer whose router fires exactly the first round(fraction * E) experts for
    every token, and inputs whose first feature is 1 (the router reads only that feature)."""
    ffn = copy.deepcopy(dense)
    experts = ffn.num_experts
    active = max(1, round(fraction * experts))
    signs = torch.where(torch.arange(experts) < active, 1.0, -1.0)
    with torch.no_grad():
        ffn.router_proj.weight.zero_()
        ffn.router_proj.weight[:, 0] = signs
    x = x.clone()
    x[:, 0] = 1.0
    return ffn, x


# -- timing --------------------------------------------------------------------------------------


def seconds_per_call(calls: list[Callable[[], object]], repeats: int) -> float:
    """Median over repeats of the mean time of one pass over the calls (after one warm-up pass)."""
    for call in calls:
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call()
        samples.append((time.perf_counter() - start) / len(calls))
    return statistics.median(samples)


def timed(runner: Runner, inputs: list[np.ndarray], repeats: int) -> float:
    return seconds_per_call([lambda b=b: runner(b) for b in inputs], repeats)


def set_threads(threads: int) -> None:
    """The same number of compute threads in every runtime (ORT sessions here read torch's)."""
    torch.set_num_threads(threads)
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)


# -- one FFN layer in each runtime ---------------------------------------------------------------


def layer_runner(runtime: str, module: torch.nn.Module, hidden: int, folder: Path) -> Runner:
    """A function x [1, T, H] float32 -> FFN output, running the module in the runtime."""
    module = module.eval()
    if runtime == "eager":
        def run_eager(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()

        return run_eager
    example = torch.zeros(1, 2, hidden)
    seq = torch.export.Dim("T", min=1, max=256)
    folder.mkdir(parents=True, exist_ok=True)
    if runtime == "onnx":
        import onnxruntime as ort

        path = folder / "ffn.onnx"
        with torch.no_grad():
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=20, input_names=["x"],
                                        dynamic_shapes=({1: seq},), verbose=False)
        program.save(str(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"x": x})[0]
    from executorch.runtime import Runtime

    from exporter.targets.executorch import emit, lower, write_program

    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=({1: seq},), strict=False)
    path = folder / "ffn.pte"
    write_program(emit(lower(program, {})), path)
    method = Runtime.get().load_program(path).load_method("forward")
    return lambda x: method.execute([torch.from_numpy(x)])[0].numpy()


def compare_forms(dense: Runner, sparse: Runner, calls: dict[str, list[np.ndarray]], repeats: int,
                  dense_ms: dict[str, float] | None = None) -> dict:
    result = {}
    for name, inputs in calls.items():
        dense_time = dense_ms[name] / 1e3 if dense_ms else timed(dense, inputs, repeats)
        sparse_time = timed(sparse, inputs, repeats)
        max_diff = max(float(np.abs(sparse(b) - dense(b)).max()) for b in inputs)
        result[name] = {"dense_ms": dense_time * 1e3, "sparse_ms": sparse_time * 1e3,
                        "ratio": sparse_time / dense_time, "max_abs_diff": max_diff}
    return result


def bench_layer(runtime: str, dense: BlockFFN, x: torch.Tensor, folder: Path, repeats: int,
                sweep: bool) -> tuple[dict, dict]:
    """Timings on the model's own inputs, then (optionally) on planted routers."""
    hidden = x.shape[-1]
    dense_run = layer_runner(runtime, dense, hidden, folder / "dense")
    sparse_run = layer_runner(runtime, SparseBlockFFN(dense), hidden, folder / "sparse")
    own = compare_forms(dense_run, sparse_run, calls_of(x), repeats)
    dense_ms = {name: entry["dense_ms"] for name, entry in own.items()}
    swept = {}
    for fraction in SWEEP_FRACTIONS if sweep else ():
        ffn, planted_x = planted(dense, x, fraction)
        runner = layer_runner(runtime, SparseBlockFFN(ffn), hidden, folder / f"sparse-{fraction}")
        reference = layer_runner("eager", ffn, hidden, folder)
        # Dense time does not depend on the router's values: the dense runner's time is reused.
        swept[str(fraction)] = compare_forms(reference, runner, calls_of(planted_x), repeats, dense_ms)
    return own, swept


# -- the whole model -----------------------------------------------------------------------------


def model_session(runtime: str, model: CausalLM, folder: Path):
    from runtimes.base import open_session
    from runtimes.onnx import open_onnx
    from runtimes.torch_session import TorchSession

    if runtime == "eager":
        return TorchSession(model)
    config = model.config
    context = ExportContext(model.max_seq_len, config.vocab_size, config.bos_token_id, config.eos_token_ids)
    info = get_target(runtime).export(model, folder, context, lambda *a: None)
    if runtime == "onnx":
        return open_onnx(folder, asdict(info), threads=torch.get_num_threads())
    return open_session(folder, asdict(info))


def bench_model(runtime: str, dense: CausalLM, sparse: CausalLM, tokens: np.ndarray, prefill: int, folder: Path,
                repeats: int) -> dict:
    sessions = {form: model_session(runtime, model, folder / form)
                for form, model in (("dense", dense), ("sparse", sparse))}
    prompt, rest = tokens[:prefill], tokens[prefill:]
    steps = [rest[i : i + 1] for i in range(min(len(rest), 16))]
    chunk = rest[:CHUNK]
    result: dict = {"T1": {}, f"T{CHUNK}": {}}
    outputs = {}
    for form, session in sessions.items():
        # Teacher-forced steps: dense and sparse do the same work whatever their argmax.
        session.reset()
        session.forward(prompt, 0)
        decode = [lambda s=s, i=i: session.forward(s, prefill + i) for i, s in enumerate(steps)]
        result["T1"][f"{form}_ms"] = seconds_per_call(decode, repeats) * 1e3
        session.reset()
        session.forward(prompt, 0)
        chunk_call = [lambda: session.forward(chunk, prefill)]
        result[f"T{CHUNK}"][f"{form}_ms"] = seconds_per_call(chunk_call, repeats * 4) * 1e3
        outputs[form] = session.forward(chunk, prefill)
    for entry in result.values():
        entry["ratio"] = entry["sparse_ms"] / entry["dense_ms"]
    result["max_abs_logits_diff"] = float(np.abs(outputs["sparse"] - outputs["dense"]).max())
    return result


# -- report --------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = list(results["layer"])
    fractions = results["active_fraction"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    groups = [(scope, call) for scope in ("layer", "whole_model") for call in CALLS if results[scope]]
    width = 0.8 / max(len(runtimes), 1)
    for k, runtime in enumerate(runtimes):
        ratios = [results[scope].get(runtime, {}).get(call, {}).get("ratio", np.nan) for scope, call in groups]
        left.bar(np.arange(len(groups)) + k * width, ratios, width, label=runtime)
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks(np.arange(len(groups)) + width * (len(runtimes) - 1) / 2)
    labels = [f"{scope.replace('_', ' ')} {call}\n(active {fractions[call]:.0%})" for scope, call in groups]
    left.set_xticklabels(labels)
    left.set_ylabel("time sparse / time dense (< 1: sparse faster)")
    left.set_title(results["checkpoint"], fontsize=8)
    left.legend()
    for runtime in runtimes:
        sweep = results["sweep"].get(runtime, {})
        if not sweep:
            continue
        xs = [float(f) for f in sweep]
        for call, style in zip(CALLS, ("-o", "--s")):
            right.plot(xs, [sweep[f][call]["ratio"] for f in sweep], style, label=f"{runtime} {call}")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xlabel("fraction of experts active (planted router)")
    right.set_ylabel("time sparse / time dense")
    right.set_title(f"layer {results['timed_layer']}, planted sparsity", fontsize=9)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="BlockFFN checkpoint folder")
    parser.add_argument("--synthetic", action="store_true", help="the synthetic blockffn-small-width model")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sparse_ffn"))
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--tokens", type=int, default=96, help="text tokens: the prefill, then decode/chunk inputs")
    parser.add_argument("--prefill", type=int, default=48)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="compute threads in every runtime")
    parser.add_argument("--layer", type=int, default=None, help="FFN layer to time alone (default: the middle one)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the planted-sparsity sweep")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model timings")
    args = parser.parse_args(argv)
    runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtime(s) {', '.join(unknown)} (known: {', '.join(RUNTIMES)})")
    set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="sparse-ffn-") as scratch_name:
        scratch = Path(scratch_name)
        model_path, label = resolve_model(args.model, args.synthetic, scratch)
        checkpoint = load_checkpoint(model_path)
        config = checkpoint.config
        if config.ffn != "blockffn":
            parser.error(f"{model_path} is not a BlockFFN model (ffn: {config.ffn})")
        dense = build_model(checkpoint, max_seq_len=args.max_seq_len).eval()
        sparse = blockffn_sparse(dense, {})
        tokens = text_tokens(checkpoint.folder, config.vocab_size, min(args.tokens, args.max_seq_len))
        inputs = ffn_inputs(dense, tokens)
        layer = len(dense.layers) // 2 if args.layer is None else args.layer
        per_layer = {call: [union_fraction(l.mlp, x, int(call[1:])) for l, x in zip(dense.layers, inputs)]
                     for call in CALLS}
        results: dict = {
            "checkpoint": label,
            "hidden": config.hidden_size, "experts": config.num_experts, "expert_size": config.expert_size,
            "layers": config.num_layers, "timed_layer": layer, "tokens": len(tokens), "prefill": args.prefill,
            "threads": args.threads,
            "active_fraction": {call: float(np.mean(v)) for call, v in per_layer.items()},
            "active_fraction_per_layer": per_layer,
            "timed_layer_active_fraction": {call: v[layer] for call, v in per_layer.items()},
            "layer": {}, "sweep": {}, "whole_model": {},
        }
        print(f"{label}: H={config.hidden_size} E={config.num_experts} de={config.expert_size}, "
              f"{args.threads} thread(s)")
        print("union of active experts per call (mean over layers): "
              + ", ".join(f"{call} {v:.1%}" for call, v in results["active_fraction"].items()))
        for runtime in runtimes:
            own, swept = bench_layer(runtime, dense.layers[layer].mlp, inputs[layer], scratch / "layer" / runtime,
                                     args.repeats, sweep=not args.no_sweep)
            results["layer"][runtime], results["sweep"][runtime] = own, swept
            _print_row(f"layer {layer} {runtime}", own)
            for fraction, entry in swept.items():
                _print_row(f"  planted {float(fraction):.1%}", entry)
        for runtime in [] if args.no_model else runtimes:
            entry = bench_model(runtime, dense, sparse, tokens, args.prefill, scratch / "model" / runtime, args.repeats)
            results["whole_model"][runtime] = entry
            _print_row(f"model {runtime}", entry)
    from bench.provenance import provenance

    results["provenance"] = provenance(argv)
    (args.out / "sparse_ffn.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "sparse_ffn.png")
    print(f"wrote {args.out / 'sparse_ffn.json'} and {args.out / 'sparse_ffn.png'}")
    return results


def _print_row(name: str, entry: dict) -> None:
    parts = [f"{call}: dense {v['dense_ms']:.3f} ms, sparse {v['sparse_ms']:.3f} ms, ratio {v['ratio']:.2f}"
             for call, v in entry.items() if isinstance(v, dict)]
    print(f"{name:<22}" + " | ".join(parts))


if __name__ == "__main__":
    main()
