"""Image slicing rules on the same images: slices and LLM tokens per image for MiniCPM-V's own grid rule,
LLaVA-NeXT's (the largest effective resolution: relaxed_alpha 0) and BlueLM-V-3B's relaxed aspect-ratio
matching (relaxed_alpha 0.1), each at the merger's 16x and 4x token downsampling. Pure preprocessing
(runtimes/image_slicing.py, the bundle's own code), so the counts are exact; a slice's cost in time is
bench/vlm.py's per-slice encoding time, and the prompt's cost grows with its tokens.

python -m bench.vlm_slicing --out bench/reports/vlm-slicing
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cpm_mobile.runtimes.image_slicing import SliceSettings, slice_image

# Photos (4:3, 3:2, 16:9 at phone-camera and downscaled sizes), screenshots (portrait phone, desktop), a document
# page, and MiniCPM-V's own test sizes.
SIZES = [(448, 448), (600, 900), (768, 1024), (720, 1280), (1080, 1920), (1170, 2532), (1200, 1600),
         (2000, 3000), (3024, 4032), (1100, 850), (1000, 1000), (333, 777)]
RULES = {"minicpmv": {}, "llava-next (alpha 0)": {"grid_rule": "relaxed", "relaxed_alpha": 0.0},
         "relaxed (alpha 0.1)": {"grid_rule": "relaxed", "relaxed_alpha": 0.1}}


def count(size: tuple[int, int], settings: SliceSettings) -> dict:
    height, width = size
    sliced = slice_image(Image.fromarray(np.zeros((height, width, 3), np.uint8)), settings)
    return {"grid": list(sliced.grid) if sliced.grid else None, "slices": len(sliced.arrays()),
            "tokens": sum(sliced.tokens(settings))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in ("16x", "4x"):
        for rule, fields in RULES.items():
            settings = SliceSettings(downsample_mode=mode, **fields)
            for size in SIZES:
                rows.append({"mode": mode, "rule": rule, "size": list(size), **count(size, settings)})
    totals = {f"{mode} {rule}": sum(r["tokens"] for r in rows if r["mode"] == mode and r["rule"] == rule)
              for mode in ("16x", "4x") for rule in RULES}
    (args.out / "results.json").write_text(json.dumps({"totals": totals, "rows": rows}, indent=2) + "\n")
    for mode in ("16x", "4x"):
        print(f"{mode}: " + "  ".join(f"{rule} {totals[f'{mode} {rule}']}" for rule in RULES))
    for size in SIZES:
        cells = [next(r for r in rows if r["mode"] == "16x" and r["rule"] == rule and r["size"] == list(size))
                 for rule in RULES]
        print(f"{size[0]}x{size[1]}: " + "  ".join(f"{c['grid']} {c['tokens']}t" for c in cells))
    plot(rows, args.out / "slicing_tokens.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(RULES)
    for index, rule in enumerate(RULES):
        tokens = [next(r["tokens"] for r in rows if r["mode"] == "16x" and r["rule"] == rule and r["size"] == list(s))
                  for s in SIZES]
        axis.bar(np.arange(len(SIZES)) + index * width, tokens, width, label=rule)
    axis.set_xticks(np.arange(len(SIZES)) + width, [f"{h}x{w}" for h, w in SIZES], rotation=45, ha="right")
    axis.set_ylabel("LLM tokens per image (16x)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
