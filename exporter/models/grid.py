"""Integer weight grids a checkpoint already carries, and finding them in float weights.

A grid is what a quantised (GPTQ) or quantisation-aware-trained checkpoint stores per linear:
integer codes, one scale per group of `group_size` input columns and one zero point per group, with
weight = scale * (code - zero). Exporting the grid itself, instead of rounding the float weights
again, makes the artifact compute what the trained model computes.

`detect_grid` finds a grid in float weights (fake-quantised QAT checkpoints, BitCPM's ternary
ones): per group of input columns it looks for a scale s with every w / s within the storage
dtype's rounding of an integer (bf16(s * q) is not exactly s * q), then refits s by least squares
and checks again against one rounding of the stored value. Trained or random float weights fail
this at the first group: one value off the grid is enough.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

# Unit roundoff of each storage dtype: |stored - exact| <= ROUNDOFF * |exact|.
ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
GROUP_SIZES = (None, 128, 64, 32)  # tried largest first; None = one group per output channel
SCREEN_ROWS = 64  # rows of the first linear tried for every candidate before the full check


@dataclass(frozen=True, eq=False)
class LinearGrid:
    """One linear's grid: weight[o, i] = scales[o, i // group_size] * (codes[o, i] - zeros[o, i // group_size])."""

    codes: torch.Tensor  # uint8 [out, in], in [0, 2**bits)
    scales: torch.Tensor  # float32 [out, in / group_size], values exactly as the checkpoint holds them
    zeros: torch.Tensor  # uint8 [out, in / group_size]; 2**(bits-1) everywhere when symmetric
    bits: int  # 4, or 2 for ternary (codes 1, 2, 3 around zero 2) and GPTQ's 2-bit
    group_size: int  # input columns per scale (= in_features when per output channel)
    scale_dtype: torch.dtype  # the dtype the scales are exact in (GPTQ: fp16)
    act_order: bool = False  # GPTQ desc_act: groups follow a permutation of the inputs (g_idx)

    @property
    def symmetric(self) -> bool:
        return bool((self.zeros == 1 << (self.bits - 1)).all())

    @property
    def ternary(self) -> bool:
        return self.bits == 2 and self.symmetric and bool(((self.codes >= 1) & (self.codes <= 3)).all())

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] the grid stands for (contiguous groups only)."""
        if self.act_order:
            raise ValueError("an act-order grid's groups follow g_idx, not contiguous input columns")
        expand = lambda t: t.repeat_interleave(self.group_size, dim=1)  # noqa: E731
        return expand(self.scales) * (self.codes.to(torch.float32) - expand(self.zeros).to(torch.float32))


@dataclass(frozen=True, eq=False)
class WeightGrid:
    """The grid of every quantised linear of a checkpoint, by CausalLM parameter name
    ("layers.0.self_attn.q_proj.weight"); embeddings, lm_head and norms stay float."""

    source: str  # "gptq", "float weights on a grid", or "gptq calibrated on N tokens" (exporter/calibration.py)
    linears: Mapping[str, LinearGrid] = field(repr=False)
    max_rel_deviation: float = 0.0  # max |stored - grid| / |stored| of detected grids (storage rounding)
    # Float tensors that replace the checkpoint's beside the grid: norm gains an activation scaling folded into
    # (exporter/activation_scaling.py), by CausalLM parameter name.
    floats: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def first(self) -> LinearGrid:
        return next(iter(self.linears.values()))

    @property
    def bits(self) -> int:
        return max(g.bits for g in self.linears.values())

    @property
    def ternary(self) -> bool:
        return all(g.ternary for g in self.linears.values())

    @property
    def group_sizes(self) -> set[int]:
        return {g.group_size for g in self.linears.values()}

    def describe(self) -> str:
        """One line for inspect and the manifest: 'weights lie on a 4-bit grid, groups of 128'."""
        grid = self.first()
        per_channel = all(g.group_size == g.codes.shape[1] for g in self.linears.values())
        groups = "one scale per output channel" if per_channel else \
            "groups of " + "/".join(str(s) for s in sorted(self.group_sizes))
        if self.ternary:
            kind = "ternary grid {-s, 0, +s}"
        else:
            widths = sorted({g.bits for g in self.linears.values()})
            wide = sum(g.bits == widths[-1] for g in self.linears.values())
            width = f"{widths[0]}-bit grid ({wide} linears at {widths[-1]} bits)" if len(widths) > 1 \
                else f"{self.bits}-bit grid"
            kind = width + ", " + ("symmetric" if all(g.symmetric for g in self.linears.values())
                                   else "affine (zero points)")
        order = ", act-order (g_idx permuted)" if any(g.act_order for g in self.linears.values()) else ""
        scales = ", " + "/".join(sorted({str(g.scale_dtype).removeprefix("torch.") for g in self.linears.values()})) \
            + " scales"
        if self.source == "gptq":
            where = "GPTQ checkpoint: "
        elif self.source == "float weights on a grid":
            where = "weights lie on a "
        else:  # a grid computed here (exporter/calibration.py): "gptq calibrated on N tokens"
            where = f"{self.source}: "
        text = f"{where}{kind}, {groups}{scales}{order}, {len(self.linears)} linears"
        if self.source == "float weights on a grid":
            text += f" (max deviation from the stored weights {self.max_rel_deviation:.1e} relative: storage rounding)"
        return text


# -- detection -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    name: str  # "ternary" | "int4-symmetric" | "int4-affine"
    bits: int


KINDS = (_Kind("ternary", 2), _Kind("int4-symmetric", 4), _Kind("int4-affine", 4))


def detect_grid(weights: Mapping[str, torch.Tensor], storage: torch.dtype) -> WeightGrid | None:
    """The grid every weight (name -> [out, in] tensor as stored) lies on, or None.

    One kind and one group size for all linears: the first (kind, group size) under which the
    first linear's leading rows lie on a grid is then required of every linear.
    """
    if not weights or storage not in ROUNDOFF:
        return None
    names = list(weights)
    first = weights[names[0]].to(torch.float32)
    for kind in KINDS:
        for group in GROUP_SIZES:
            if _fit(first[:SCREEN_ROWS], kind, group, storage) is None:
                continue
            linears: dict[str, LinearGrid] = {}
            deviation = 0.0
            for name in names:
                weight = weights[name].to(torch.float32)
                fitted = _fit(weight, kind, group, storage)
                if fitted is None:
                    return None  # one kind and group size for all, or no grid
                linears[name] = fitted
                deviation = max(deviation, _relative_deviation(weight, fitted.dequantize()))
            return WeightGrid("float weights on a grid", linears, deviation)
    return None


def _relative_deviation(stored: torch.Tensor, grid: torch.Tensor) -> float:
    nonzero = stored != 0
    if not nonzero.any():
        return 0.0
    return float(((stored - grid).abs()[nonzero] / stored.abs()[nonzero]).max())


def _fit(weight: torch.Tensor, kind: _Kind, group: int | None, storage: torch.dtype) -> LinearGrid | None:
    """The grid of `kind` with groups of `group` that `weight` lies on, or None."""
    rows, columns = weight.shape
    size = group or columns
    if columns % size:
        return None
    blocks = weight.reshape(rows, columns // size, size)
    roundoff = ROUNDOFF[storage]
    levels = _levels(kind)
    found = None
    # Candidate scales per group: the group's extreme over the integer it stands for.
    for scale in _candidate_scales(blocks, kind):
        ok, codes = _on_grid(blocks, scale, roundoff, kind)
        if found is None:
            found = (torch.where(ok, scale, torch.zeros_like(scale)), codes, ok)
        else:
            take = ok & ~found[2]
            found = (torch.where(take, scale, found[0]), torch.where(take[..., None], codes, found[1]), found[2] | ok)
        if bool(found[2].all()):
            break
    if found is None or not bool(found[2].all()):
        return None
    _, signed, _ = found
    scales = _refit(blocks, signed, storage, roundoff)
    if scales is None:
        return None
    zero = _zero_points(signed, kind, levels)
    if zero is None:
        return None
    codes = (signed + zero[..., None]).reshape(rows, columns).to(torch.uint8)
    return LinearGrid(codes, scales, zero.to(torch.uint8), kind.bits, size,
                      storage if _exact_in(scales, storage) else torch.float32)


def _levels(kind: _Kind) -> int:
    return 1 << kind.bits


def _candidate_scales(blocks: torch.Tensor, kind: _Kind):
    amax = blocks.abs().amax(-1)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))  # an all-zero group: any scale, codes 0
    if kind.name == "ternary":
        yield safe
    elif kind.name == "int4-symmetric":
        for top in range(1, 9):  # max |code| in the group: 7 for absmax quantisers, 8 if -8 is used
            yield safe / top
    else:
        spread = blocks.amax(-1) - blocks.amin(-1)
        spread = torch.where(spread > 0, spread, safe)
        for span in range(1, 16):
            yield spread / span


def _on_grid(blocks: torch.Tensor, scale: torch.Tensor, roundoff: float, kind: _Kind):
    """Per group: whether every w / scale is an integer in range, up to storage rounding of w and
    of the extreme the scale came from; and those integers."""
    ratio = blocks / scale[..., None]
    signed = torch.round(ratio)
    slack = 4 * roundoff * signed.abs() + 1e-6
    ok = ((ratio - signed).abs() <= slack).all(-1)
    if kind.name == "ternary":
        ok &= (signed.abs() <= 1).all(-1)
    elif kind.name == "int4-symmetric":
        ok &= ((signed >= -8) & (signed <= 7)).all(-1)
    else:
        ok &= (signed.amax(-1) - signed.amin(-1) <= 15)
    return ok, signed


def _refit(blocks: torch.Tensor, signed: torch.Tensor, storage: torch.dtype, roundoff: float) -> torch.Tensor | None:
    """Least-squares scale per group, in the storage dtype when that still fits; None when some
    weight is further than three roundings from scale * code."""
    weight = blocks.to(torch.float64)
    codes = signed.to(torch.float64)
    norm = (codes * codes).sum(-1)
    scale = torch.where(norm > 0, (weight * codes).sum(-1) / torch.where(norm > 0, norm, torch.ones_like(norm)),
                        torch.ones_like(norm))
    # A scale in the storage dtype is taken only when it reproduces the stored weights to one rounding
    # (the training run's scales were in that dtype): then runtimes with bf16 scales carry it exactly.
    for candidate, roundings in ((scale.to(storage).to(torch.float64), 1.0), (scale.to(torch.float32).to(torch.float64), 3.0)):
        error = (weight - candidate[..., None] * codes).abs()
        if bool((error <= roundings * roundoff * weight.abs() + 1e-12).all()):
            return candidate.to(torch.float32)
    return None


def _zero_points(signed: torch.Tensor, kind: _Kind, levels: int) -> torch.Tensor | None:
    if kind.name != "int4-affine":
        return torch.full(signed.shape[:-1], levels // 2, dtype=torch.int64)
    low = (-signed.amin(-1)).clamp(min=0)
    high = levels - 1 - signed.amax(-1)
    if bool((low > high).any()) or bool((low > levels - 1).any()):
        return None
    return low.to(torch.int64)


def _exact_in(scales: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(scales.to(dtype).to(torch.float32), scales))
