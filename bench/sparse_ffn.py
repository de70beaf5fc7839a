"""Dense vs sparse BlockFFN artifacts, same runtime, same run: FFN layer and whole-model latency.

python -m bench.sparse_ffn [--models tiny,small] [--runtimes executorch,onnx] [--quant int8,int4] [--threads 2] [--out DIR]

Sparse form per runtime: ExecuTorch runs the fused kernel (cpm_mobile::sparse_expert_ffn, exporter/
kernels), onnxruntime the gather form (exporter/passes/blockffn_sparse.py). Models:
- tiny: the embedded blockffn-tiny with its trained routers;
- small-planted: the same shape, each token firing a random 9 of the 48 experts drawn from one
  fixed pool of 14 (TLS 80 %, CLS_8 about 70 %: the issue's sparsity levels, for the end-to-end
  target; blockffn-tiny's layer 0 is less sparse);
- small: a random model with blockffn-small's shape (H 768, 48 experts of 64, --small-layers layers,
  blockffn-tiny's vocabulary) whose routers reproduce blockffn-tiny's layer-0 activation pattern on
  the text: every layer fires, for each token, the experts layer 0 of blockffn-tiny fires for it
  (its 32 experts mapped onto 48, e -> 2e // 3), so TLS and 8-token CLS match that layer's; see
  route_by_token.
Text: exporter/embedded/heldout.txt through blockffn-tiny's tokenizer.

Every timing is the mean over a pass's calls of each call's minimum over --repeats (the machine is
shared: the minimum is the run least disturbed by others), dense and sparse calls interleaved. Reported as speedup = dense / sparse:
- layer: the timed layer on the model's own FFN inputs, one token per call (T1, decode) and
  8-token calls (T8, verifying 8 draft tokens), with the inputs' TLS and CLS_8;
- sweep (small): the same layer with routers planted so that a fixed fraction of experts fires for
  every token (the fraction is then the T1 and the T8 active fraction alike);
- model: one decode step after a prefill (T1) and one 8-token verify call after it (T8), the dense
  artifact against the sparse artifact of the same model, exported by our targets;
- quantised (--quant, default int8,int4): the same comparisons with the int8-sparse / int4-sparse
  recipes' weights, dense quantised artifact against sparse quantised artifact of the same model in
  the same runtime: "layer_quant" (ExecuTorch: XNNPACK's 8da8w / 8da4w linears against
  cpm_mobile::sparse_expert_ffn_int8 / _int4; onnxruntime layers are not quantised on their own,
  the quantiser works on the whole graph) and "model_quant" (both runtimes: MatMulNBits against
  GatherBlockQuantized expert tables on ONNX). Their max differences are the quantisation's
  (the dense and sparse forms round activations differently), not a check;
plus each pair's largest output difference. Writes sparse_ffn.json and sparse_ffn.png to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cpm_mobile.exporter.targets.registry import capabilities
from cpm_mobile.exporter.analysis.sparsity import sparsity_metrics
from cpm_mobile.exporter.defaults import DEFAULT_SPARSE_MODEL, HELDOUT_TEXT
from cpm_mobile.exporter.kernels.fused_ffn import FusedSparseBlockFFN
from cpm_mobile.exporter.models import load_checkpoint, load_model
from bench.synthetic import write_synthetic_checkpoint
from cpm_mobile.exporter.models.ffn import BlockFFN
from cpm_mobile.exporter.models.loader import build_model
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.passes.blockffn_sparse import SparseBlockFFN, blockffn_sparse
from cpm_mobile.exporter.targets.base import ExportContext
from cpm_mobile.exporter.targets.registry import get_target
from cpm_mobile.exporter.tokenizer import TextTokenizer

RUNTIMES = ("executorch", "onnx")
QUANT = ("int8", "int4")  # the int8-sparse / int4-sparse recipes' per-target quantisation
MODELS = ("tiny", "small", "small-planted")
PLANTED_POOL, PLANTED_PER_TOKEN = 0.30, 0.20  # small-planted: at most these fractions (CLS_8 >= 70 %, TLS >= 80 %)
CHUNK = 8
CALLS = ("T1", f"T{CHUNK}")
SWEEP_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 1.0)
PATTERN_LAYER = 0  # blockffn-tiny's layer that routes by token (its later layers route near-constantly)
# The targets: (scope, call, minimum sparsity the target applies at, minimum speedup).
TARGETS = (("layer", "T1", "TLS", 0.80, 3.0), ("layer", f"T{CHUNK}", f"CLS_{CHUNK}", 0.70, 1.8),
           ("model", "T1", None, None, 2.0))

Runner = Callable[[np.ndarray], np.ndarray]


# -- models --------------------------------------------------------------------------------------


def sparse_layer(runtime: str, dense: BlockFFN) -> torch.nn.Module:
    """The layer form the blockffn_sparse pass gives the runtime's target."""
    if runtime == "executorch":
        return FusedSparseBlockFFN(dense)
    return SparseBlockFFN(dense, capabilities(runtime).sparse_experts != "gather")


def text_ids(tokenizer: TextTokenizer, count: int) -> np.ndarray:
    ids = tokenizer.encode(HELDOUT_TEXT.read_text())[:count]
    return np.asarray(ids, dtype=np.int64)


def activity(model: CausalLM, ids: np.ndarray) -> list[torch.Tensor]:
    """Per layer, which experts fire for each token of one forward over ids: bool [T, E]."""
    return [(layer.mlp.router_scores(x) != 0) for layer, x in zip(model.layers, ffn_inputs(model, ids))]


def ffn_inputs(model: CausalLM, ids: np.ndarray) -> list[torch.Tensor]:
    """Each layer's FFN input [T, H] for ids, from the model's own forward."""
    captured: list[torch.Tensor] = [torch.empty(0)] * len(model.layers)
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda _m, args, i=i: captured.__setitem__(i, args[0][0].detach().clone()))
        for i, layer in enumerate(model.layers)]
    try:
        model.reset_cache()
        with torch.no_grad():
            model(torch.from_numpy(ids)[None], torch.tensor([0]))
    finally:
        for hook in hooks:
            hook.remove()
        model.reset_cache()
    return captured


def route_by_token(model: CausalLM, masks: torch.Tensor) -> None:
    """Make every layer fire, for token id v, exactly the experts masks[v] (bool [V, E]) marks.

    The first E features of the residual stream carry the mask's signs: they are written by the
    embedding (+1 active, -1 idle) and by nothing else (the rows of every attention output and
    FFN down projection that would write them are zeroed), the RMSNorm before each FFN keeps their
    signs (weights set to 1), and router row e reads feature e alone. Attention, expert and head
    weights stay random: the cost of every matmul is unchanged.
    """
    experts = masks.shape[1]
    with torch.no_grad():
        model.embed_tokens.weight[:, :experts] = torch.where(masks, 1.0, -1.0)
        for layer in model.layers:
            layer.self_attn.o_proj.weight[:experts] = 0.0
            layer.mlp.down_proj.weight[:experts] = 0.0
            layer.post_attention_layernorm.weight[:experts] = 1.0
            layer.mlp.router_proj.weight.zero_()
            layer.mlp.router_proj.weight[torch.arange(experts), torch.arange(experts)] = 1.0


def small_model(scratch: Path, tiny: CausalLM, ids: np.ndarray, layers: int, max_seq_len: int,
                planted: bool) -> CausalLM:
    """blockffn-small's shape routed by token: with blockffn-tiny's layer-0 pattern on ids, or
    (planted) with random per-token subsets of one fixed pool of experts."""
    folder = write_synthetic_checkpoint(scratch / "blockffn-small", "blockffn-small", num_hidden_layers=layers,
                                        vocab_size=tiny.config.vocab_size)
    model = build_model(load_checkpoint(folder), max_seq_len=max_seq_len).eval()
    experts, vocab = model.config.num_experts, model.config.vocab_size
    masks = torch.zeros(vocab, experts, dtype=torch.bool)
    if planted:
        generator = torch.Generator().manual_seed(0)
        pool = torch.randperm(experts, generator=generator)[: int(PLANTED_POOL * experts)]
        for token in range(vocab):
            chosen = torch.randperm(len(pool), generator=generator)[: int(PLANTED_PER_TOKEN * experts)]
            masks[token, pool[chosen]] = True
    else:
        source = activity(tiny, ids)[PATTERN_LAYER]  # [T, 32]
        mapped = source[:, (torch.arange(experts) * source.shape[1]) // experts]  # [T, 48]
        for position in reversed(range(len(ids))):  # each id keeps the pattern of its first occurrence
            masks[ids[position]] = mapped[position]
    route_by_token(model, masks)
    return model


def pattern(active: torch.Tensor) -> dict[str, float]:
    tls, cls = sparsity_metrics(active, (CHUNK,))
    return {"TLS": tls, f"CLS_{CHUNK}": cls[CHUNK]}


# -- timing --------------------------------------------------------------------------------------


def fastest(calls: dict[str, list[Callable[[], object]]], repeats: int) -> dict[str, float]:
    """Per form, the mean over its calls of each call's minimum time over repeats. The forms take
    turns call by call, so load from other processes hits them alike, and a call's minimum is its
    least disturbed run (the machine is shared)."""
    for group in calls.values():
        for call in group:
            call()
    best = {name: [float("inf")] * len(group) for name, group in calls.items()}
    for _ in range(repeats):
        for index in range(max(len(group) for group in calls.values())):
            for name, group in calls.items():
                if index < len(group):
                    start = time.perf_counter()
                    group[index]()
                    best[name][index] = min(best[name][index], time.perf_counter() - start)
    return {name: sum(times) / len(times) for name, times in best.items()}


def set_threads(threads: int) -> None:
    """The same number of compute threads in every runtime (ORT sessions here read torch's)."""
    torch.set_num_threads(threads)
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)


def layer_runner(runtime: str, module: torch.nn.Module, hidden: int, folder: Path) -> Runner:
    """A function x [1, T, H] float32 -> FFN output, running the module exported to the runtime."""
    module = module.eval()
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

    from cpm_mobile.runtimes.kernels.loader import load_kernels
    from cpm_mobile.exporter.targets.executorch.target import emit, lower, write_program

    load_kernels()
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=({1: seq},), strict=False)
    path = folder / "ffn.pte"
    write_program(emit(lower(program, {})), path)
    method = Runtime.get().load_program(path).load_method("forward")
    return lambda x: method.execute([torch.from_numpy(x)])[0].numpy()


def calls_of(x: torch.Tensor) -> dict[str, list[np.ndarray]]:
    """The FFN inputs cut into decode calls [1, 1, H] and chunk calls [1, CHUNK, H]."""
    tokens = x.numpy()[None]
    return {"T1": [tokens[:, i : i + 1] for i in range(tokens.shape[1])],
            f"T{CHUNK}": [tokens[:, i : i + CHUNK] for i in range(0, tokens.shape[1] - CHUNK + 1, CHUNK)]}


def compare_layers(dense: Runner, sparse: Runner, x: torch.Tensor, repeats: int) -> dict:
    result = {}
    for call, inputs in calls_of(x).items():
        times = fastest({form: [lambda b=b, r=r: r(b) for b in inputs] for form, r in
                         (("dense", dense), ("sparse", sparse))}, repeats)
        diff = max(float(np.abs(sparse(b) - dense(b)).max()) for b in inputs)
        result[call] = {"dense_ms": times["dense"] * 1e3, "sparse_ms": times["sparse"] * 1e3,
                        "speedup": times["dense"] / times["sparse"], "max_abs_diff": diff}
    return result


def planted(dense: BlockFFN, x: torch.Tensor, fraction: float) -> tuple[BlockFFN, torch.Tensor]:
    """A copy of the layer whose router fires exactly the first round(fraction * E) experts for
    every token, and inputs whose first feature is 1 (the router reads only that feature)."""
    ffn = copy.deepcopy(dense)
    experts = ffn.num_experts
    active = max(1, round(fraction * experts))
    with torch.no_grad():
        ffn.router_proj.weight.zero_()
        ffn.router_proj.weight[:, 0] = torch.where(torch.arange(experts) < active, 1.0, -1.0)
    x = x.clone()
    x[:, 0] = 1.0
    return ffn, x


def quant_spec(runtime: str, scheme: str):
    """The target spec of the `<scheme>-sparse` recipe, without its pass (the bench applies it)."""
    from cpm_mobile.recipes.schema import load_recipe

    return load_recipe(f"{scheme}-sparse").targets[runtime].model_copy(update={"passes": []})


def quantised_layers(model: CausalLM, scheme: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The timed layer of the ExecuTorch int8/int4 variants of the model: dense (torchao linears)
    and fused sparse (the same codes in our kernel), as the recipe quantises them."""
    from cpm_mobile.exporter.targets.executorch.quant import _plan

    quantization = quant_spec("executorch", scheme).quantization
    name = f"layers.{PATTERN_LAYER}.mlp"
    with torch.no_grad():
        builders = _plan(model, quantization)  # only this layer's builders run (the whole model is not needed)
        dense = copy.copy(model.layers[PATTERN_LAYER].mlp)
        dense._modules = {child: builders[f"{name}.{child}"](module) if f"{name}.{child}" in builders else module
                          for child, module in dense._modules.items()}
        fused = blockffn_sparse(model, {}, capabilities("executorch"))
        sparse = _plan(fused, quantization)[name](fused.layers[PATTERN_LAYER].mlp)
    return dense, sparse


def model_session(runtime: str, model: CausalLM, folder: Path, spec=None):
    from cpm_mobile.runtimes.base import open_session
    from cpm_mobile.runtimes.onnx import open_onnx

    config = model.config
    context = ExportContext(config.bos_token_id, tuple(config.eos_token_ids))
    info = get_target(runtime).export(model, folder, spec, context).info
    if runtime == "onnx":
        return open_onnx(folder, asdict(info), threads=torch.get_num_threads())
    return open_session(folder, asdict(info))


def compare_models(runtime: str, dense: CausalLM, ids: np.ndarray, prefill: int, folder: Path,
                   repeats: int, spec=None) -> dict:
    sessions = {"dense": model_session(runtime, dense, folder / "dense", spec),
                "sparse": model_session(runtime, blockffn_sparse(dense, {}, capabilities(runtime)), folder / "sparse", spec)}
    prompt, rest = ids[:prefill], ids[prefill:]
    steps = rest[:16]
    chunk = rest[:CHUNK]
    for session in sessions.values():
        session.reset()
        session.forward(prompt, 0)

    # Teacher-forced steps at fixed positions after the prefill: rewriting a slot is what the
    # next decode would do, so every repeat does the same work, whatever the argmax.
    def decode(session):
        return [lambda s=s, i=i: session.forward(s[None], prefill + i) for i, s in enumerate(steps)]

    t1 = fastest({form: decode(s) for form, s in sessions.items()}, repeats)
    t8 = fastest({form: [lambda s=s: s.forward(chunk, prefill)] for form, s in sessions.items()}, repeats * 4)
    outputs = {form: s.forward(chunk, prefill) for form, s in sessions.items()}
    return {"T1": {"dense_ms": t1["dense"] * 1e3, "sparse_ms": t1["sparse"] * 1e3,
                   "speedup": t1["dense"] / t1["sparse"]},
            f"T{CHUNK}": {"dense_ms": t8["dense"] * 1e3, "sparse_ms": t8["sparse"] * 1e3,
                          "speedup": t8["dense"] / t8["sparse"]},
            "max_abs_logits_diff": float(np.abs(outputs["sparse"] - outputs["dense"]).max())}


# -- one model -----------------------------------------------------------------------------------


def bench(name: str, model: CausalLM, ids: np.ndarray, runtimes: list[str], args, scratch: Path) -> dict:
    inputs = ffn_inputs(model, ids)
    x = inputs[PATTERN_LAYER]
    ffn = model.layers[PATTERN_LAYER].mlp
    with torch.no_grad():
        active = [(layer.mlp.router_scores(v) != 0) for layer, v in zip(model.layers, inputs)]
    result: dict = {"hidden": model.config.hidden_size, "experts": model.config.num_experts,
                    "expert_size": model.config.expert_size, "layers": model.config.num_layers,
                    "timed_layer": PATTERN_LAYER, "timed_layer_pattern": pattern(active[PATTERN_LAYER]),
                    "pattern_per_layer": [pattern(a) for a in active], "layer": {}, "sweep": {}, "model": {},
                    "layer_quant": {}, "model_quant": {}}
    print(f"{name}: H={result['hidden']} E={result['experts']} de={result['expert_size']} "
          f"layers={result['layers']}; layer {PATTERN_LAYER} "
          + ", ".join(f"{k} {v:.1%}" for k, v in result["timed_layer_pattern"].items()))
    hidden = model.config.hidden_size
    for runtime in runtimes:
        folder = scratch / name / runtime
        dense_run = layer_runner(runtime, ffn, hidden, folder / "dense")
        sparse_run = layer_runner(runtime, sparse_layer(runtime, ffn), hidden, folder / "sparse")
        result["layer"][runtime] = compare_layers(dense_run, sparse_run, x, args.repeats)
        _print_row(f"  layer {runtime}", result["layer"][runtime])
        if name == "small" and not args.no_sweep:  # planted routers on the small layer
            sweep = {}
            for fraction in SWEEP_FRACTIONS:
                planted_ffn, planted_x = planted(ffn, x, fraction)
                runner = layer_runner(runtime, sparse_layer(runtime, planted_ffn), hidden, folder / f"sweep-{fraction}")
                sweep[str(fraction)] = compare_layers(dense_run, runner, planted_x, args.repeats)
                _print_row(f"    planted {fraction:.0%} active", sweep[str(fraction)])
            result["sweep"][runtime] = sweep
        if not args.no_model:
            result["model"][runtime] = compare_models(runtime, model, ids, args.prefill, folder / "model",
                                                      args.repeats)
            _print_row(f"  model {runtime}", result["model"][runtime])
        for scheme in args.quant:
            if runtime == "executorch":
                dense_q, sparse_q = quantised_layers(model, scheme)
                result["layer_quant"].setdefault(runtime, {})[scheme] = compare_layers(
                    layer_runner(runtime, dense_q, hidden, folder / f"dense-{scheme}"),
                    layer_runner(runtime, sparse_q, hidden, folder / f"sparse-{scheme}"), x, args.repeats)
                _print_row(f"  layer {runtime} {scheme}", result["layer_quant"][runtime][scheme])
            if not args.no_model:
                result["model_quant"].setdefault(runtime, {})[scheme] = compare_models(
                    runtime, model, ids, args.prefill, folder / f"model-{scheme}", args.repeats,
                    quant_spec(runtime, scheme))
                _print_row(f"  model {runtime} {scheme}", result["model_quant"][runtime][scheme])
    return result


def target_verdicts(results: dict) -> list[dict]:
    """Each target: the layer targets at the small model's sweep point of the target's sparsity,
    end-to-end decode on each blockffn-small-shaped model."""
    models = results["models"]
    verdicts = []

    def add(target, runtime, where, entry):
        if entry is not None:
            verdicts.append({"target": target, "runtime": runtime, "where": where, "speedup": entry["speedup"],
                             "met": entry["speedup"] >= float(target.split(">= ")[1].rstrip("x"))})

    for scope, call, measure, sparsity, wanted in TARGETS:
        target = f"{scope} {call} >= {wanted}x"
        for runtime in results["runtimes"]:
            if scope == "layer":
                entry = models.get("small", {}).get("sweep", {}).get(runtime, {}).get(str(round(1 - sparsity, 2)), {})
                add(target, runtime, f"small layer, planted {1 - sparsity:.0%} active ({measure} {sparsity:.0%})",
                    entry.get(call))
                continue
            for name in ("small", "small-planted"):
                if name in models:
                    here = models[name]["timed_layer_pattern"]
                    add(target, runtime, f"{name}, TLS {here['TLS']:.0%} CLS_8 {here[f'CLS_{CHUNK}']:.0%}",
                        models[name].get("model", {}).get(runtime, {}).get(call))
    return verdicts


# -- report --------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {"executorch": "tab:blue", "onnx": "tab:orange"}
    small = results["models"].get("small", {})
    for runtime, sweep in small.get("sweep", {}).items():
        sparsity = [1 - float(f) for f in sweep]
        for call, style in zip(CALLS, ("-o", "--s")):
            ax.plot(sparsity, [sweep[f][call]["speedup"] for f in sweep], style, color=colours.get(runtime),
                    label=f"{runtime} layer {call} (planted)")
    markers = {"tiny": "^", "small": "D", "small-planted": "s"}
    for name, entry in results["models"].items():
        measured = entry["timed_layer_pattern"]
        for runtime, layer in entry["layer"].items():
            for call, key in zip(CALLS, ("TLS", f"CLS_{CHUNK}")):
                ax.scatter([measured[key]], [layer[call]["speedup"]], marker=markers.get(name, "x"),
                           facecolors="none" if call != "T1" else colours.get(runtime),
                           edgecolors=colours.get(runtime), s=60,
                           label=f"{runtime} {name} layer {PATTERN_LAYER} {call}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("sparsity of the call (T1: TLS, T8: CLS_8)")
    ax.set_ylabel("speedup of the sparse FFN (dense time / sparse time)")
    ax.set_title(f"{results['threads']} threads; {results['machine']}", fontsize=8)
    ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_row(name: str, entry: dict) -> None:
    parts = [f"{call}: dense {v['dense_ms']:.3f} ms, sparse {v['sparse_ms']:.3f} ms, x{v['speedup']:.2f}"
             for call, v in entry.items() if isinstance(v, dict)]
    print(f"{name:<28}" + " | ".join(parts))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--out", type=Path, default=Path("bench/results/sparse_ffn"))
    parser.add_argument("--tokens", type=int, default=160, help="text tokens: the prefill, then decode inputs")
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--small-layers", type=int, default=16, help="layers of the blockffn-small-shaped model")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="compute threads in every runtime")
    parser.add_argument("--no-sweep", action="store_true", help="skip the planted-sparsity sweep")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model timings")
    parser.add_argument("--quant", default=",".join(QUANT),
                        help="quantised rows: int8 and/or int4 ('' for none), dense vs sparse at those weights")
    args = parser.parse_args(argv)
    args.quant = [q for q in args.quant.split(",") if q]
    runtimes = [r for r in args.runtimes.split(",") if r]
    models = [m for m in args.models.split(",") if m]
    for given, known in ((runtimes, RUNTIMES), (models, MODELS), (args.quant, QUANT)):
        if set(given) - set(known):
            parser.error(f"unknown: {', '.join(sorted(set(given) - set(known)))} (known: {', '.join(known)})")
    set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    import os

    results: dict = {"threads": args.threads, "runtimes": runtimes, "tokens": args.tokens, "prefill": args.prefill,
                     "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
                     "models": {}}
    tiny, _ = load_model(DEFAULT_SPARSE_MODEL, max_seq_len=args.max_seq_len, dtype=torch.float32)
    ids = text_ids(TextTokenizer.from_folder(DEFAULT_SPARSE_MODEL), args.tokens)
    with tempfile.TemporaryDirectory(prefix="sparse-ffn-") as scratch_name:
        scratch = Path(scratch_name)
        for name in models:
            model = tiny if name == "tiny" else small_model(scratch, tiny, ids, args.small_layers, args.max_seq_len,
                                                            planted=name == "small-planted")
            results["models"][name] = bench(name, model.eval(), ids, runtimes, args, scratch)
    results["targets"] = target_verdicts(results)
    for verdict in results["targets"]:
        print(f"target {verdict['target']:<20} {verdict['runtime']:<11} x{verdict['speedup']:.2f} "
              f"{'met' if verdict['met'] else 'MISSED'} ({verdict['where']})")
    from bench.provenance import provenance

    results["provenance"] = provenance(argv)
    (args.out / "sparse_ffn.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "sparse_ffn.png")
    print(f"wrote {args.out / 'sparse_ffn.json'} and {args.out / 'sparse_ffn.png'}")
    return results


if __name__ == "__main__":
    main()
