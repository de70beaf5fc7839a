"""llama.cpp's own quality measure of its roundings of a checkpoint: KL divergence and perplexity ratio against
its F32 model, measured by llama-perplexity itself, with and without an importance matrix (llama-imatrix).

    python -m bench.llamacpp_kld [--model exporter/embedded/minicpm-tiny ...] [--type Q4_K_M ...] [--out DIR]

The peer's numbers as llama.cpp computes them (its kernels, q8_0 activation rounding included), on the first
16 x 256 tokens of the embedded held-out text (llama-perplexity scores the second half of each 256-token
chunk). The importance matrix is computed by llama-imatrix on the held-out text from character 40000 on,
past the scored chunks (about 16 k characters), as our calibrated recipes leave the check's windows out.
The protocol differs from bench.quality's (which scores every position of its windows with our tokenizer
windows), so compare rows within one report; bench.quality's own Q8_0 / Q4_0 rows (llama.cpp's rounding
in PyTorch) bridge the two. Writes llamacpp_kld.json and .md to --out.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

from bench import llamacpp
from cpm_mobile.exporter.defaults import DEFAULT_MODEL, HELDOUT_TEXT

TYPES = ("Q8_0", "Q4_0", "Q4_K_M")
CONTEXT, CHUNKS = 256, 16
CALIBRATION_FROM = 40_000  # characters: past the scored chunks


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed:\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"llama-perplexity printed no {pattern!r}")
    return float(match.group(1))


def measure(model: Path, types: list[str], folder: Path, llama: llamacpp.LlamaCpp) -> list[dict]:
    f32 = llamacpp.convert(llama, model, folder / "f32.gguf")
    perplexity = [str(llama.tool("llama-perplexity")), "-c", str(CONTEXT), "--chunks", str(CHUNKS), "-t", "2"]
    base = folder / "base.kld"
    _run([*perplexity, "-m", str(f32), "-f", str(HELDOUT_TEXT), "--kl-divergence-base", str(base)])
    calibration = folder / "calibration.txt"
    calibration.write_text(HELDOUT_TEXT.read_text()[CALIBRATION_FROM:])
    imatrix = folder / "imatrix.gguf"
    _run([str(llama.tool("llama-imatrix")), "-m", str(f32), "-f", str(calibration), "-o", str(imatrix),
          "-c", str(CONTEXT), "-t", "2"])
    rows = []
    for qtype in types:
        for with_imatrix in (False, True):
            out = folder / f"{qtype}{'-imatrix' if with_imatrix else ''}.gguf"
            _run([str(llama.tool("llama-quantize")), *(["--imatrix", str(imatrix)] if with_imatrix else []),
                  str(f32), str(out), qtype])
            text = _run([*perplexity, "-m", str(out), "--kl-divergence-base", str(base), "--kl-divergence"])
            rows.append({"model": model.name, "type": qtype, "imatrix": with_imatrix,
                         "kl": _number(r"Mean\s+KLD:\s+([0-9.eE+-]+)", text),
                         "ppl_ratio": _number(r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([0-9.]+)", text),
                         "same_top_pct": _number(r"Same top p:\s*([0-9.]+)", text),
                         "size_mb": out.stat().st_size / 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", type=Path)
    parser.add_argument("--type", action="append")
    parser.add_argument("--out", type=Path, default=Path("bench/reports/llamacpp_kld"))
    args = parser.parse_args()
    llama = llamacpp.find_or_build()
    rows = []
    for model in args.model or [DEFAULT_MODEL, DEFAULT_MODEL.parent / "blockffn-tiny"]:
        try:
            llamacpp.check_supported(model)
        except llamacpp.UnsupportedModel as why:
            print(f"{model.name}: skipped ({why})")
            continue
        with tempfile.TemporaryDirectory(prefix="cpm-kld-") as temp:
            rows += measure(model, args.type or list(TYPES), Path(temp), llama)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llamacpp_kld.json").write_text(json.dumps({**llama.versions(), "context": CONTEXT, "chunks": CHUNKS,
                                                            "rows": rows}, indent=2))
    lines = ["| model | type | imatrix | KL | ppl ratio | same top-1 % | file MB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['type']} | {'yes' if r['imatrix'] else 'no'} | {r['kl']:.2e} | {r['ppl_ratio']:.4f} "
              f"| {r['same_top_pct']:.1f} | {r['size_mb']:.2f} |" for r in rows]
    (args.out / "llamacpp_kld.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
