"""The recipe schema. Unknown keys are errors: a typo must not silently loosen a tolerance."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from exporter.errors import InputError

TargetName = Literal["executorch", "onnx", "coreml"]
TARGET_NAMES: tuple[str, ...] = ("executorch", "onnx", "coreml")
RECIPES_DIR = Path(__file__).resolve().parent


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tolerances(Strict):
    """Bounds on the check's metrics; None leaves a metric unchecked (it is still reported)."""

    max_abs_logits: float | None = Field(None, gt=0)
    min_sqnr_db: float | None = None
    max_kl: float | None = Field(None, ge=0)
    min_top1: float | None = Field(None, ge=0, le=1)
    min_greedy_prefix: float | None = Field(None, ge=0, le=1, description="fraction of each greedy continuation")
    max_ppl_rel_delta: float | None = Field(None, ge=0)


class TargetSpec(Strict):
    precision: Literal["fp32", "fp16"] = "fp32"
    quantization: dict[str, Any] | None = None  # target-specific scheme; validated by the target
    options: dict[str, Any] = Field(default_factory=dict)
    tolerances: Tolerances


class PassSpec(Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class CheckSpec(Strict):
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    heldout_windows: int = Field(2, ge=0)
    heldout_tokens: int = Field(256, ge=2, description="tokens per held-out window (capped by max_seq_len)")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    max_seq_len: int = Field(256, ge=8)
    dtype: Literal["float32"] = "float32"
    passes: list[PassSpec] = Field(default_factory=list)
    targets: dict[TargetName, TargetSpec]
    check: CheckSpec

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
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "recipe"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InputError(source, f"invalid recipe: {where}: {first['msg']}{more}") from None
