"""What every target's typed spec shares, and what a target declares it can carry (pydantic only).

A target's own spec (`exporter/targets/<name>/spec.py`) subclasses TargetSpec with its precision,
options and quantisation schemes; recipes/schema.py builds the recipe's union of specs from the
registry (exporter/targets/registry.py). Nothing heavy is imported here: a recipe is parsed before
any library that exports is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Spread(Strict):
    """Faithfulness calibrated per export for twins that match their runtime only statistically
    (exporter/spread.py): the twin is run `perturbations` times with each linear's input moved by
    `relative` (2**-19: 16 fp32 ulps), and each stated bound is loosened to the worst such run's metric
    plus `margin_db` (6 dB: twice the amplitude, four times the KL)."""

    perturbations: int = Field(3, ge=1, le=8)
    relative: float = Field(2.0**-19, gt=0, le=1e-3)
    margin_db: float = Field(6.0, ge=0)


class Tolerances(Strict):
    """Bounds on the check's metrics; None leaves a metric unchecked (it is still reported).

    max_rel_logits is max |artifact - expected| over all logits divided by max |expected|: it
    scales with logit magnitude (trained 30-layer models have logits ~10x the embedded models'),
    where an absolute bound tuned on small models rejects faithful exports of deep ones.
    min_greedy is the fraction of teacher-forced greedy steps whose argmax agrees, counting only
    steps where the expected top-2 margin exceeds tie_margin_rel x max |expected logit| of that
    row: a flipped near-tie is reported (with its margin) but does not fail a faithful artifact.
    """

    max_abs_logits: float | None = Field(None, gt=0)
    max_rel_logits: float | None = Field(None, gt=0)
    min_sqnr_db: float | None = None
    max_kl: float | None = Field(None, ge=0)
    min_top1: float | None = Field(None, ge=0, le=1)
    min_greedy: float | None = Field(None, ge=0, le=1)
    tie_margin_rel: float = Field(0.0, ge=0)
    max_ppl_rel_delta: float | None = Field(None, ge=0)
    spread: Spread | None = Field(None, description="loosen the bounds to the twin's measured spread at this "
                                                     "model's depth (statistical twins only)")


class PassSpec(Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class TargetSpec(Strict):
    """A target's part of a recipe: its precision, the passes for it alone, and one set of tolerances per gate."""

    precision: Literal["fp32"] = "fp32"
    passes: list[PassSpec] = Field(default_factory=list, description="applied for this target only, after the recipe's")
    faithfulness: Tolerances
    fidelity: Tolerances


SparseExpertForm = Literal["fused_kernel", "gather_tokens_transposed", "gather"]


@dataclass(frozen=True)
class GridCarrier:
    """How a target's kernels carry a checkpoint's own integer grid (GPTQ, QAT, BitCPM), for the one grid
    checker (exporter/targets/grid.py)."""

    kernel: str  # named in refusals: "XNNPACK", "MatMulNBits", "Core ML"
    scheme_bits: dict[str, int]  # scheme -> the code width it carries a grid in; other schemes are refused
    refused_schemes: dict[str, str] = field(default_factory=dict)  # scheme -> why it cannot carry a grid
    group_field: str = "group_size"  # the scheme's field naming input columns per scale
    block_sizes: tuple[int, ...] | None = None  # the only group sizes the kernel runs (None: any)
    block_multiple: int | None = None  # group sizes must be a multiple of this (per channel always allowed)
    min_ternary_block: int | None = None
    symmetric_only: str | None = None  # why zero points cannot be carried, when they cannot
    rerounding_fields: dict[str, str] = field(default_factory=dict)  # field -> its only value that keeps the grid
    checks_zero_range: bool = True  # GPTQ v1's zero of -1 stored as 2**bits - 1 is beyond the grid's width
    symmetric_field: bool = True  # the scheme has a `symmetric` switch that must not contradict the grid
    fp16_scales_exact: bool = False  # scales must be exact in fp16 for an fp16 artifact
    covers_all_linears: bool = True  # refuse a grid missing one of the body linears
    wide_bits: tuple[int, ...] = ()  # code widths carried for single linears beyond the scheme's (a mixed grid)


@dataclass(frozen=True)
class Capabilities:
    """What a target can carry, asked by passes and by the pre-flight (never its name)."""

    sparse_experts: SparseExpertForm | None = None  # the BlockFFN sparse form its runtime runs
    sparse_experts_refusal: str = ""  # why not, when None
    grid: GridCarrier | None = None  # None: checkpoint grids are refused
    tokenizer_client: str | None = None  # the stock client that runs the artifact with its own tokenizer
    tokenizer_client_refusal: str = ""  # why there is none, when None
    # Its quantised twin is built from the recipe alone, no artifact written (exporter/estimate.py's estimates)
    # and, as the most activation rounding of the targets, the costliest for a grid.
    twin_from_spec: bool = False
