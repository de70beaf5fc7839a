"""Vision-language speed and memory: per-slice vision encoding, time to first token after an image, decode,
peak memory, for each artifact of a MiniCPM-V bundle and PyTorch eager, as ratios to eager in the same run.

python -m bench.vlm --preset small --out bench/reports/vlm-small            # synthetic MiniCPM-V 4.6 (hybrid LLM)
python -m bench.vlm --model FOLDER --out DIR                                  # a real MiniCPM-V 4.6 / 4.7 folder
python -m bench.vlm --recipe fp32 --recipe vlm-int4 --out DIR                 # each recipe's bundle, side by side

Each recipe's bundle is timed whatever its check's verdict (a random-weight preset's int4 LLM may breach
fidelity bounds sized for trained checkpoints); the verdict and the artifact sizes are in results.json.

Each runtime runs in its own process (peak RSS is its VmHWM) with 2 threads. Time to first token is from
the image file's pixels to the first generated token: the bundle's slicing and placeholders, every slice
through the vision encoder (one call each, as the MultimodalRunner does), the prompt's embeddings, one
prefill from embeddings and the argmax. Two images: 448x448 (one slice) and 1344x896 (overview + a 2x3 grid).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.measure import peak_rss_mb

# A small synthetic MiniCPM-V 4.6: a SigLIP-base-sized tower (the released one is SigLIP2-400M: 27 x 1152) and
# a narrow 8-layer hybrid Qwen3.5 LLM (the released one is Qwen3.5-0.8B), over the embedded tokenizer.
PRESETS = {
    "small": {
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=448, patch_size=14),
        "text": dict(model_type="qwen3_5_text", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=4,
                     linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
                     linear_conv_kernel_dim=4, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2),
        "top": dict(insert_layer_id=5),
    },
}
IMAGES = {"448x448": (448, 448), "1344x896": (896, 1344)}
PROMPT = "Describe the picture in one sentence."


def write_preset(name: str, folder: Path) -> Path:
    from bench.synthetic_vlm import image_tokenizer, write_minicpmv
    from cpm_mobile.exporter.defaults import DEFAULT_MODEL

    preset = PRESETS[name]
    tokenizer = image_tokenizer(DEFAULT_MODEL / "tokenizer.json")
    text = {**preset["text"], "vocab_size": -(-len(tokenizer) // 64) * 64}
    write_minicpmv(folder, tokenizer, text, preset["vision"], perturb=False, **preset["top"])
    return folder


def _eager(bundle: Path, model: Path):
    from cpm_mobile.exporter.models import load_model
    from cpm_mobile.exporter.models.vision import load_vision_encoder
    from cpm_mobile.runtimes.multimodal import TorchMultimodalSession

    manifest = json.loads((bundle / "manifest.json").read_text())
    llm, _ = load_model(model, max_seq_len=manifest["model"]["max_seq_len"])
    return TorchMultimodalSession(llm, load_vision_encoder(model))


def measure(runtime: str, bundle: Path, model: Path, repeats: int, decode: int) -> dict:
    import torch

    from cpm_mobile.exporter.vlm_bundle import check_image
    from cpm_mobile.exporter.vlm_generate import open_image_prompt, open_vision_language

    torch.set_num_threads(2)
    vl = open_vision_language(bundle, None if runtime == "eager" else runtime,
                              session=_eager(bundle, model) if runtime == "eager" else None)
    result: dict = {"runtime": runtime}
    slice_pixels = None
    for label, (height, width) in IMAGES.items():
        path = bundle.parent / f".bench-{label}.png"
        check_image(height, width).save(path)
        times = []
        for repeat in range(repeats + 1):  # the first run warms up
            start = time.perf_counter()
            session, ids = open_image_prompt(vl, path, PROMPT)
            session.reset()
            logits = session.forward(np.asarray(ids, dtype=np.int64), 0)
            int(np.argmax(logits[-1]))
            if repeat:
                times.append(time.perf_counter() - start)
        result[f"ttft_s_{label}"] = statistics.median(times)
        result[f"prompt_tokens_{label}"] = len(ids)
        result[f"slices_{label}"] = len(next(iter(session.prompts.values())))
        slice_pixels = slice_pixels if slice_pixels is not None else next(iter(session.prompts.values()))[0]
    encode = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        vl.session.encode_image(slice_pixels)
        if repeat:
            encode.append(time.perf_counter() - start)
    result["slice_ms_448"] = statistics.median(encode) * 1e3
    token, position, steps = int(np.argmax(logits[-1])), len(ids), []
    for _ in range(decode):
        start = time.perf_counter()
        logits = vl.session.forward(np.array([token], dtype=np.int64), position)
        steps.append(time.perf_counter() - start)
        token, position = int(np.argmax(logits[-1])), position + 1
    result["decode_tok_per_s"] = 1.0 / statistics.median(steps)
    result["peak_rss_mb"] = peak_rss_mb()  # before the batched call below, which holds every slice's activations
    if hasattr(vl.session, "encode_images"):  # BlueLM-V's batched slice encoding: the 2x3 grid in one call
        grid = next(iter(session.prompts.values()))[1:]  # the last image's slices, the overview left out
        for label, run in (("sequential", lambda: [vl.session.encode_image(p) for p in grid]),
                           ("batched", lambda: vl.session.encode_images(grid))):
            times = []
            for repeat in range(repeats + 1):
                start = time.perf_counter()
                run()
                if repeat:
                    times.append(time.perf_counter() - start)
            result[f"grid_ms_{label}"] = statistics.median(times) * 1e3
        result["grid_slices"] = len(grid)
    return result


def _bundle(out: Path, recipe, targets: list[str], model: Path, verdicts: dict) -> Path:
    """The recipe's bundle in `out` (exported unless there), passed or rejected; its check's verdict noted."""
    from cpm_mobile.exporter.pipeline import export_bundle

    name = "bundle" if recipe.name == "fp32" else f"bundle-{recipe.name}"
    for folder in (out / name, out / f"{name}.rejected"):
        if (folder / "manifest.json").is_file():
            break
    else:
        start = time.perf_counter()
        folder = export_bundle(model, recipe.select(targets), out, name=name).bundle
        print(f"{recipe.name}: exported in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    report = json.loads((folder / "report.json").read_text())
    verdicts[recipe.name] = {target: {"passed": entry["passed"], "breaches": entry["breaches"],
                                      "fidelity_kl": entry["fidelity"]["metrics"].get("kl"),
                                      "vision_sqnr_db_vs_fp32": entry["fidelity"]["metrics"].get("vision_sqnr_db")}
                             for target, entry in report["artifacts"].items()}
    return folder


def _artifact_bytes(bundle: Path, target: str) -> int:
    manifest = json.loads((bundle / "manifest.json").read_text())
    [artifact] = [a for a in manifest["artifacts"] if a["target"] == target]
    return sum((bundle / name).stat().st_size for name in artifact["files"])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("slice_ms_448", "vision slice\n(eager time / ours)", True),
               ("ttft_s_448x448", "TTFT 448x448", True), ("ttft_s_1344x896", "TTFT 1344x896", True),
               ("decode_tok_per_s", "decode tok/s", False), ("peak_rss_mb", "peak RSS\n(ours / eager)", None)]
    eager = next(r for r in rows if r["runtime"] == "eager")
    others = [r for r in rows if r["runtime"] != "eager"]
    figure, axis = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(others), 1)
    for index, row in enumerate(others):
        values = []
        for key, _, faster_is_lower in metrics:
            if faster_is_lower is None:
                values.append(row[key] / eager[key])
            else:
                values.append(eager[key] / row[key] if faster_is_lower else row[key] / eager[key])
        label = row["runtime"] if row["recipe"] in ("-", "fp32") else f"{row['runtime']} {row['recipe']}"
        axis.bar(np.arange(len(metrics)) + index * width, values, width, label=label)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks(np.arange(len(metrics)) + width * (len(others) - 1) / 2, [m[1] for m in metrics])
    axis.set_ylabel("x PyTorch eager (speed: higher is faster)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="small")
    source.add_argument("--model", type=Path, help="a MiniCPM-V folder instead of a preset")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--targets", default="executorch,onnx")
    parser.add_argument("--recipe", action="append", help="recipes to export and time (default fp32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one runtime in this process
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.bundle, args.model, args.repeats, args.decode)))
        return

    from bench.provenance import provenance
    from cpm_mobile.recipes import load_recipe

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or write_preset(args.preset, args.out / f"minicpmv-{args.preset}")
    targets = args.targets.split(",")
    rows, verdicts = [], {}
    for recipe_name in args.recipe or ["fp32"]:
        recipe = load_recipe(recipe_name)
        bundle = _bundle(args.out, recipe, [t for t in targets if t in recipe.targets], model, verdicts)
        for runtime in (["eager"] if not rows else []) + [t for t in targets if t in recipe.targets]:
            command = [sys.executable, "-m", "bench.vlm", "--measure", runtime, "--bundle", str(bundle), "--model",
                       str(model), "--repeats", str(args.repeats), "--decode", str(args.decode), "--out",
                       str(args.out)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = {**json.loads(output.strip().splitlines()[-1]), "recipe": "-" if runtime == "eager" else recipe.name}
            if runtime != "eager":
                row["artifact_bytes"] = _artifact_bytes(bundle, runtime)
            rows.append(row)
            print(json.dumps(rows[-1]), file=sys.stderr)
    eager = rows[0]
    for row in rows:
        row["x_eager"] = {"slice": eager["slice_ms_448"] / row["slice_ms_448"],
                          **{f"ttft_{k}": eager[f"ttft_s_{k}"] / row[f"ttft_s_{k}"] for k in IMAGES},
                          "decode": row["decode_tok_per_s"] / eager["decode_tok_per_s"],
                          "peak_rss": row["peak_rss_mb"] / eager["peak_rss_mb"]}
    for row in rows:  # each quantised artifact against the fp32 artifact of its format, same run
        fp32 = next((r for r in rows if r["runtime"] == row["runtime"] and r["recipe"] == "fp32"), None)
        if fp32 is not None and row is not fp32 and "artifact_bytes" in row:
            row["x_fp32"] = {"bytes": row["artifact_bytes"] / fp32["artifact_bytes"],
                             **{f"ttft_{k}": fp32[f"ttft_s_{k}"] / row[f"ttft_s_{k}"] for k in IMAGES},
                             "decode": row["decode_tok_per_s"] / fp32["decode_tok_per_s"],
                             "peak_rss": row["peak_rss_mb"] / fp32["peak_rss_mb"]}
    (args.out / "results.json").write_text(json.dumps({"provenance": provenance(), "checks": verdicts, "rows": rows},
                                                      indent=2) + "\n")
    plot(rows, args.out / "vlm_vs_eager.png")


if __name__ == "__main__":
    main()
