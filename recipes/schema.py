"""The recipe schema. Unknown keys are errors everywhere: a typo must never silently loosen a bound.

A recipe names its targets; each target has a typed spec (its precision, options, passes,
quantisation scheme) and two sets of tolerances, one per gate of the check:

- faithfulness: the artifact against its twin, the eager module the target says its artifact
  computes (fp16 KV cache for Core ML, the quantised weights it stores, the sparse form). Tight:
  a breach is an implementation fault (a wrong kernel, a silently fp32 file, a corrupted weight).
- fidelity: the artifact against the fp32 reference of the checkpoint, with the recipe's quality
  bounds. A breach means the recipe costs more quality than it allows.

The targets' specs (exporter/targets/<name>/spec.py) come from the target registry: this file names no target.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.targets import registry
from cpm_mobile.exporter.targets.spec import PassSpec, Strict, Tolerances

TARGET_NAMES: tuple[str, ...] = registry.TARGET_NAMES
TargetName = Literal[TARGET_NAMES]  # type: ignore[valid-type]
RECIPES_DIR = Path(__file__).resolve().parent
SPEC_TYPES = {name: registry.spec_type(name) for name in TARGET_NAMES}
TargetSpec = Annotated[Union[tuple(SPEC_TYPES.values())], Field(discriminator="target")]  # type: ignore[valid-type]


class CheckSpec(Strict):
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    # 16 x 256 tokens: the spread of an int4-like ppl delta is ~0.15 % there (0.6 % at 2 windows), well
    # under the recipes' perplexity bounds; measured by `python -m bench.heldout_windows`.
    heldout_windows: int = Field(16, ge=0)
    heldout_tokens: int = Field(256, ge=2, description="tokens per held-out window (capped by max_seq_len)")


class MixedPrecisionSpec(Strict):
    """Which body linears keep 8-bit codes, chosen by measured sensitivity under a size budget
    (exporter/sensitivity.py): each linear alone rounded to the calibration's bits (to nearest) on the first
    `windows` calibration windows, its KL against the float model's logits per weight it would save; the
    most costly per weight stay at `high_bits` while the body's mean code width stays within the budget."""

    high_bits: Literal[8] = 8
    bits_per_weight: float = Field(5.0, gt=4, le=8, description="the body linears' mean code width (scales "
                                                                "not counted): 5.0 keeps a quarter of the "
                                                                "weights at 8 bits")
    windows: int = Field(8, ge=1, description="calibration windows the sensitivities are measured on")


class CalibrationSpec(Strict):
    """A calibrated rounding of the body's linears, done once before the targets (exporter/calibration.py).

    The result is an integer grid (codes, scales, zero points) that every target carries exactly, as it
    carries a checkpoint's own grid; the fidelity gate still measures against the float checkpoint.
    Calibration text: `export --calibration FILE`, else the embedded held-out text; windows are taken from the
    END of that text and, when it is the text the check measures perplexity on, must not overlap the
    check's held-out windows (its first heldout_windows x heldout_tokens tokens): refused otherwise.
    """

    method: Literal["gptq"] = Field("gptq", description="GPTQ (Frantar et al. 2022): Hessian-aware rounding with "
                                                        "error propagation, layer by layer")
    bits: Literal[4] = 4
    group_size: Literal[32, 64, 128] = Field(32, description="input columns per scale (XNNPACK needs multiples of 32)")
    symmetric: bool = Field(True, description="no zero points: the one grid ExecuTorch (XNNPACK) can carry; "
                                              "false only for recipes without an executorch target")
    windows: int = Field(32, ge=1, description="calibration windows")
    tokens: int = Field(256, ge=16, description="tokens per calibration window (BOS + text; capped by max_seq_len)")
    sequential: bool = Field(True, description="true: layer by layer, each linear's Hessian from the inputs the "
                                               "linears already rounded give it (GPTQ's own order, a re-run per "
                                               "stage); false: every Hessian from the float model in one forward")
    damp: float = Field(0.01, gt=0, lt=1, description="dampening of the Hessian: this fraction of its mean diagonal")
    block_size: int = Field(128, ge=1, description="GPTQ's lazy-batch width (columns updated together)")
    awq: bool = Field(False, description="activation-aware scaling (AWQ) searched per layer on the calibration "
                                         "text and folded into the norms and producing linears before GPTQ "
                                         "(exporter/activation_scaling.py); the float model is unchanged")
    mixed: MixedPrecisionSpec | None = Field(None, description="keep the most sensitive linears at 8 bits "
                                                               "(GPTQ at 8 bits for those) under a size budget")

    @model_validator(mode="after")
    def _blocks_hold_groups(self) -> "CalibrationSpec":
        if self.block_size % self.group_size:
            raise ValueError(f"block_size {self.block_size} must be a multiple of group_size {self.group_size}")
        if self.mixed is not None and self.mixed.windows > self.windows:
            raise ValueError(f"mixed.windows {self.mixed.windows} exceeds the calibration's {self.windows} windows")
        return self


class VisionQuantizationSpec(Strict):
    """A vision-language model's vision encoder on an 8-bit grid (exporter/models/vision_grid.py): symmetric
    codes, one fp16 scale per 32 input columns (round to nearest), fp32 activations. Every format carries the
    grid exactly (our weight-only kernel in the .pte, MatMulNBits without activation rounding in the .onnx,
    Core ML blockwise constants), so the vision twin is exact; a linear whose input width 32 does not divide
    stays fp32 and is named in the report."""

    bits: Literal[8] = 8
    group_size: Literal[32] = 32


class SlicingSpec(Strict):
    """How a vision-language bundle slices images (runtimes/image_slicing.py), written into the bundle's
    processor_config.json and manifest: the checkpoint's own processor settings unless changed here."""

    grid: Literal["minicpmv", "relaxed"] = Field("minicpmv", description="relaxed: BlueLM-V-3B's relaxed "
                                                 "aspect-ratio matching (image_slicing.relaxed_grid)")
    relaxed_alpha: float = Field(0.1, ge=0, lt=1, description="relaxed: effective resolution allowed below the "
                                                              "best grid's, for less wasted canvas")
    downsample_mode: Literal["16x", "4x"] | None = Field(None, description="the merger's token downsampling "
                                                         "(BlueLM-V's token downsampler): 16x or 4x fewer tokens "
                                                         "than patches; default the checkpoint's")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    max_seq_len: int = Field(256, ge=8)
    dtype: Literal["float32"] = "float32"
    weights: Literal["any", "checkpoint_grid"] = Field(
        "any", description="checkpoint_grid: only for checkpoints whose weights already lie on an integer grid "
                           "(GPTQ, QAT fake-quant, BitCPM); any other checkpoint is refused before work")
    calibration: CalibrationSpec | None = Field(
        None, description="round the body's linears once with calibration data (GPTQ) before the targets; every "
                          "target then carries that grid exactly")
    passes: list[PassSpec] = Field(default_factory=list, description="applied for every target")
    vision: VisionQuantizationSpec | None = Field(
        None, description="vision-language checkpoints: the vision encoder's weights on an 8-bit grid (text models "
                          "have no vision encoder and ignore it)")
    slicing: SlicingSpec | None = Field(None, description="vision-language checkpoints: the image slicing the "
                                                          "bundle declares (text models ignore it)")
    targets: dict[TargetName, TargetSpec]
    check: CheckSpec

    @field_validator("targets", mode="before")
    @classmethod
    def _tag_targets(cls, value: Any) -> Any:
        # The key names the target; the union needs it inside each entry to pick the spec type.
        if isinstance(value, dict):
            return {k: ({**v, "target": k} if isinstance(v, dict) and k in SPEC_TYPES else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _has_targets(self) -> "Recipe":
        if not self.targets:
            raise ValueError("a recipe needs at least one target")
        if self.calibration is not None and self.weights == "checkpoint_grid":
            raise ValueError("calibration rounds float weights; weights: checkpoint_grid exports a checkpoint's own "
                             "grid instead: use one or the other")
        if self.calibration is not None and not self.calibration.symmetric:
            for name in self.targets:
                carrier = registry.capabilities(name).grid
                if carrier is not None and carrier.symmetric_only:
                    raise ValueError(f"calibration.symmetric: false gives a grid with zero points; the {name} target "
                                     f"carries only symmetric grids ({carrier.symmetric_only})")
        return self

    @property
    def vision_language(self) -> bool:
        """A recipe for vision-language checkpoints only (it sets the vision encoder's grid or the slicing)."""
        return self.vision is not None or self.slicing is not None

    def select(self, targets: list[str]) -> "Recipe":
        """The recipe restricted to some of its targets."""
        unknown = [t for t in targets if t not in self.targets]
        if unknown:
            raise InputError(f"recipe {self.name}", f"has no target {', '.join(unknown)} (has {', '.join(self.targets)})")
        return self.model_copy(update={"targets": {t: self.targets[t] for t in targets}})


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = Path(name_or_path)
    if not path.suffix and (RECIPES_DIR / f"{name_or_path}.yaml").exists():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise InputError(path, f"recipe not found (built-in recipes: {', '.join(recipe_names())})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML ({' '.join(str(exc).split())})") from None
    return recipe_from_dict(data, path)


def recipe_from_dict(data: Any, source: str | Path = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise InputError(source, f"invalid recipe: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    """The first error as 'targets.onnx.options.opsett: extra inputs are not permitted (allowed: ...)'."""
    first = exc.errors()[0]
    loc = list(first["loc"])
    # The discriminated union repeats the target's tag in the location: targets.onnx.onnx.options...
    if len(loc) >= 3 and loc[0] == "targets" and loc[1] == loc[2]:
        del loc[2]
    where = ".".join(str(p) for p in loc) or "recipe"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        message = f"unknown field '{loc[-1]}'" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {message}{more}"


def _allowed_fields(loc: list[Any]) -> list[str]:
    """Field names of the model at a location of the recipe, for an 'unknown field' message."""
    model: Any = Recipe
    for part in loc:
        if model is Recipe and part == "targets":
            model = "targets"
            continue
        if model == "targets":
            model = SPEC_TYPES.get(str(part))
            continue
        if model is None or isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        args = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif args:
            model = args[0]
        else:
            return []
    fields = getattr(model, "model_fields", None) if model not in (None, "targets") else None
    return sorted(name for name in fields if name != "target") if fields else []
