"""A trained model at real depth for the quality benches: minicpm-tiny's recipe with 24 layers, and a copy with real
logit scale.

    python -m bench.training.deep --out ~/.cache/cpm-mobile/deep24   # 31 min on 1 thread

Writes OUT/minicpm-deep24 (bench.training.train_fixtures with --layers 24, 1200 steps: held-out ppl 72.7, logits
up to 14) and OUT/minicpm-deep24-sharp (the same weights with the final norm's gain x 3: logits up to 41, as trained
0.1-1B models reach; a sharper model, not a better one). Then, for example:

    python -m bench.quality --model OUT/minicpm-deep24-sharp --recipe int8 --recipe int4-gptq --target executorch
    python -m bench.llamacpp_kld --model OUT/minicpm-deep24-sharp
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from bench.training import train_fixtures

LAYERS, STEPS, SHARPEN = 24, 1200, 3.0


def sharpened(source: Path, target: Path, factor: float) -> Path:
    """A copy of the checkpoint with model.norm.weight x factor: every logit x factor."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    tensors = load_file(str(weights))
    norm = tensors["model.norm.weight"]
    tensors["model.norm.weight"] = (norm.float() * factor).to(norm.dtype)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    train_fixtures.main(["--out", str(args.out), "--only", "minicpm-tiny", "--layers", str(LAYERS),
                         "--steps", str(STEPS), "--threads", str(args.threads)])
    trained = args.out / "minicpm-deep24"
    if trained.exists():
        shutil.rmtree(trained)
    (args.out / "minicpm-tiny").rename(trained)
    sharpened(trained, args.out / "minicpm-deep24-sharp", SHARPEN)


if __name__ == "__main__":
    main()
