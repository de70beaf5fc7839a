"""The recipe schema. Unknown keys are errors everywhere: a typo must never silently loosen a bound.

A recipe names its targets; each target has a typed spec (its precision, options, passes,
quantisation scheme) and two sets of tolerances, one per gate of the check:

- faithfulness: the artifact against its twin, the eager module the target says its artifact
  computes (fp16 KV cache for Core ML, the quantised weights it stores, the sparse form). Tight:
  a breach is an implementation fault (a wrong kernel, a silently fp32 file, a corrupted weight).
- fidelity: the artifact against the fp32 reference of the checkpoint, with the recipe's quality
  bounds. A breach means the recipe costs more quality than it allows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.recipes import quantization as quant

TargetName = Literal["executorch", "onnx", "coreml"]
TARGET_NAMES: tuple[str, ...] = ("executorch", "onnx", "coreml")
RECIPES_DIR = Path(__file__).resolve().parent


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class PassSpec(Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class _TargetSpec(Strict):
    precision: Literal["fp32"] = "fp32"
    passes: list[PassSpec] = Field(default_factory=list, description="applied for this target only, after the recipe's")
    faithfulness: Tolerances
    fidelity: Tolerances


class ExecuTorchOptions(Strict):
    backend: Literal["xnnpack"] = "xnnpack"
    attention: Literal["custom_sdpa", "plain"] = Field(
        "custom_sdpa", description="custom_sdpa: ExecuTorch's LLM custom ops; plain: portable kernels only")


class ExecuTorchSpec(_TargetSpec):
    target: Literal["executorch"] = "executorch"
    options: ExecuTorchOptions = ExecuTorchOptions()
    quantization: quant.ExecuTorchQuantization = None


class OnnxOptions(Strict):
    opset: int = Field(20, ge=20, le=23)
    # Weights go to model.onnx.data above 1 GiB by default. protobuf cannot serialise a message over 2 GiB, and
    # the graph, names and per-tensor overhead ride on top of the weights, so the limit must sit well below
    # 2 GiB. Below 1 GiB one file is simpler to ship and every consumer (netron, onnx.checker, onnx.load)
    # handles it; above, external data also lets ORT memory-map the weights (tensors over 1 MiB are 64
    # KiB-aligned for that) instead of holding a parsed protobuf copy during load.
    external_data_threshold_bytes: int = Field(1 << 30, ge=0)
    pad_mla_values: bool = Field(True, description="zero-pad MLA value heads to the key width (onnxruntime-genai needs it)")


class OnnxSpec(_TargetSpec):
    target: Literal["onnx"] = "onnx"
    precision: Literal["fp32", "fp16"] = "fp32"
    options: OnnxOptions = OnnxOptions()
    quantization: quant.OnnxQuantization = None


class CoreMLOptions(Strict):
    deployment_target: Literal["iOS18"] = Field("iOS18", description="Core ML states need iOS18")


class CoreMLSpec(_TargetSpec):
    target: Literal["coreml"] = "coreml"
    precision: Literal["fp32", "fp16"] = "fp32"
    options: CoreMLOptions = CoreMLOptions()
    quantization: quant.CoreMLQuantization = None


TargetSpec = Annotated[Union[ExecuTorchSpec, OnnxSpec, CoreMLSpec], Field(discriminator="target")]
SPEC_TYPES = {"executorch": ExecuTorchSpec, "onnx": OnnxSpec, "coreml": CoreMLSpec}


class CheckSpec(Strict):
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    # 16 x 256 tokens: the spread of an int4-like ppl delta is ~0.15 % there (0.6 % at 2 windows), well
    # under the recipes' perplexity bounds; measured by `python -m bench.heldout_windows`.
    heldout_windows: int = Field(16, ge=0)
    heldout_tokens: int = Field(256, ge=2, description="tokens per held-out window (capped by max_seq_len)")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    max_seq_len: int = Field(256, ge=8)
    dtype: Literal["float32"] = "float32"
    weights: Literal["any", "checkpoint_grid"] = Field(
        "any", description="checkpoint_grid: only for checkpoints whose weights already lie on an integer grid "
                           "(GPTQ, QAT fake-quant, BitCPM); any other checkpoint is refused before work")
    passes: list[PassSpec] = Field(default_factory=list, description="applied for every target")
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
        return self

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
