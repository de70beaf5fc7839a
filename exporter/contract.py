"""The bundle contract: manifest.json and report.json as typed models, one version number for both.

An export writes a bundle folder whose manifest.json says what is in it (source checkpoint,
recipe, artifacts with their I/O contracts, tokenizer files, sha256 of every file) and whose
report.json says how each artifact fared in the check. This module is the one description of
both files: the exporter builds them from these models, and everything that reads a bundle (the
check, generate, an app's build script through the JSON schema) reads them through
`read_manifest` / `read_report`.

One cache vocabulary serves every target: `CacheContract.kind` says how the KV cache lives
("mutable_buffers": inside an ExecuTorch program; "past_present": graph inputs and outputs the
caller feeds back, ONNX; "coreml_states": Core ML MLState), and `value_dim` is always the model's
value head width, `stored_value_dim` the width the stored cache tensor has when it differs.
Format 1 bundles (targets' own words: executorch `kv_cache`, onnx `cache.form` with
`model_value_dim`, coreml `kv_cache.form`) are upgraded to it in memory by `normalise_io`.

Only the standard library and pydantic are imported here: an app's tooling can read a bundle
without torch, numpy or any exporter.
"""
from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator,
)

from cpm_mobile.exporter.errors import InputError  # re-exported: the runtimes import errors from the contract only

FORMAT_VERSION = 2
FORMAT_PREFIX = "cpm-mobile-bundle/"
BUNDLE_FORMAT = f"{FORMAT_PREFIX}{FORMAT_VERSION}"  # the manifest's "format" string, kept for old readers
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
MANIFEST_SCHEMA_FILE = "manifest.schema.json"
MANIFEST_SCHEMA_ID = f"urn:cpm-mobile:bundle-manifest:{FORMAT_VERSION}"
# A vision-language .pte: the methods ExecuTorch's MultimodalRunner calls, and the constant methods
# stating the slice shapes vision_encoder takes (sides multiples of one, at most the other).
VISION_METHOD = "vision_encoder"
EMBEDDING_METHOD = "token_embedding"
DECODER_METHOD = "text_decoder"
VISION_SIDE_MULTIPLE = "get_vision_side_multiple"
VISION_MAX_SIDE = "get_vision_max_side"

CacheKind = Literal["mutable_buffers", "past_present", "coreml_states"]
CACHE_KINDS: tuple[str, ...] = ("mutable_buffers", "past_present", "coreml_states")
# The cache kind each target wrote in format 1 when its io named none.
TARGET_CACHE_KINDS: dict[str, str] = {
    "executorch": "mutable_buffers",
    "onnx": "past_present",
    "coreml": "coreml_states",
}

_SHA256 = r"^[0-9a-f]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def _drop_none(data: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """An optional field a target does not use is left out of the JSON, not written as null."""
    return {k: v for k, v in data.items() if not (k in fields and v is None)}


# -- I/O contract ----------------------------------------------------------------------------------


class TensorSpec(_Strict):
    """One input, output or state: `shape` holds ints and named dynamic dims ("T", "sequence_length")."""

    name: str
    dtype: str
    shape: list[int | str]
    meaning: str | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return _drop_none(handler(self), ("meaning",))


class CacheContract(_Strict):
    """The KV cache, in one vocabulary for every target.

    value_dim is the model's value head width; stored_value_dim is the width of the stored cache
    tensor when it differs (ExecuTorch's custom SDPA stores values at the key width; ONNX pads MLA
    values to the key width for onnxruntime-genai). `stored_value_width` is the one to size
    tensors with.
    """

    kind: CacheKind
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    key_dim: int = Field(ge=1)
    value_dim: int = Field(ge=1)
    stored_value_dim: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=1)
    dtype: str
    layout: str | None = None
    names: dict[str, str] | None = None

    @property
    def stored_value_width(self) -> int:
        return self.stored_value_dim if self.stored_value_dim is not None else self.value_dim

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return _drop_none(handler(self), ("stored_value_dim", "max_seq_len", "layout", "names"))


class IOContract(_Open):
    """What a runtime feeds an artifact and gets back. Targets may add keys of their own."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    cache: CacheContract
    max_seq_len: int = Field(ge=1)
    method: str | None = None  # executorch: the program's method
    function: str | None = None  # coreml: the ML Program function
    names: dict[str, str] | None = None  # onnx: role -> graph name ("%d" = layer index)
    states: list[TensorSpec] | None = None  # coreml: the MLState tensors
    dynamic_dims: dict[str, dict[str, Any]] | None = None
    constraint: str | None = None
    vocab_size: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _no_target_words(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kv_cache" in data:
            raise ValueError("kv_cache is format 1's name: pass the io through normalise_io(target, io)")
        return data

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        return _drop_none(handler(self), ("method", "function", "names", "states", "dynamic_dims", "constraint",
                                          "vocab_size"))


def normalise_io(target: str, io: dict[str, Any]) -> dict[str, Any]:
    """The io dict with its cache under `cache` with a `kind`, whatever the target wrote.

    Format 1 shapes: executorch `kv_cache` (with `kind`, or none: mutable_buffers), onnx `cache`
    with `form: past_present` and `model_value_dim` (its `value_dim` was the padded, stored width),
    coreml `kv_cache` with `form: coreml_states`. Already normalised io comes back equal. The
    cache's max_seq_len is filled from the io's when missing. Does not modify `io`; raises
    ValueError when the cache is ambiguous.
    """
    if not isinstance(io, dict):
        raise ValueError(f"io must be an object, got {type(io).__name__}")
    io = dict(io)
    if "kv_cache" in io:
        if "cache" in io:
            raise ValueError("io has both 'cache' and 'kv_cache'")
        io["cache"] = io.pop("kv_cache")
    cache = io.get("cache")
    if not isinstance(cache, dict):
        return io  # missing or not an object: IOContract says which
    cache = dict(cache)
    if "form" in cache:
        form = cache.pop("form")
        if "kind" in cache and cache["kind"] != form:
            raise ValueError(f"cache has kind {cache['kind']!r} and form {form!r}")
        cache["kind"] = form
    if "kind" not in cache and target in TARGET_CACHE_KINDS:
        cache["kind"] = TARGET_CACHE_KINDS[target]
    if "model_value_dim" in cache:
        # onnx, format 1: value_dim was the stored (possibly zero-padded) width.
        model_value_dim = cache.pop("model_value_dim")
        stored = cache.get("value_dim")
        if cache.get("stored_value_dim") is None and stored is not None and stored != model_value_dim:
            cache["stored_value_dim"] = stored  # zero-padded values; equal widths need no stored_value_dim
        cache["value_dim"] = model_value_dim
    if cache.get("max_seq_len") is None and "max_seq_len" in io:
        cache["max_seq_len"] = io["max_seq_len"]
    io["cache"] = cache
    return io


# -- manifest.json ---------------------------------------------------------------------------------


class ArtifactEntry(_Strict):
    target: str
    files: list[str] = Field(min_length=1)  # relative to the bundle folder
    entry: str  # the file (or package folder) a runtime opens
    io: IOContract
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("io"), dict):
            data = {**data, "io": normalise_io(str(data.get("target", "")), data["io"])}
        return data

    @model_validator(mode="after")
    def _entry_is_a_file(self) -> ArtifactEntry:
        if self.entry not in self.files:
            raise ValueError(f"entry {self.entry!r} is not one of its files {self.files}")
        return self


class SourceInfo(_Strict):
    path: str
    sha256: str = Field(pattern=_SHA256)
    family: str
    dtypes_on_disk: list[str]
    weight_grid: str | None = None  # one line describing the checkpoint's own integer grid


class ModelInfo(_Strict):
    vocab_size: int = Field(ge=1)
    max_seq_len: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    bos_id: int | None
    eos_ids: list[int]
    contract: str
    # the decoding state at max_seq_len as the fp32 module holds it (KV caches grow with it, recurrent states not)
    state_bytes: int | None = Field(None, ge=0)


class ExportStage(_Strict):
    stage: str
    seconds: float = Field(ge=0)
    peak_rss_mib: float = Field(ge=0)  # the process's peak resident memory when the stage ended


class ExportCost(_Strict):
    """What the export took on the machine that ran it (exporter/export_cost.py): not part of the bundle's contract."""

    seconds: float = Field(ge=0)
    peak_rss_mib: float = Field(ge=0)
    stages: list[ExportStage]


class VisionContract(_Strict):
    """A vision-language bundle's image path, everything an app needs to feed its vision encoder and prompt.

    Preprocessing (runtimes/image_slicing.py, transformers' MiniCPM-V image processor number for number): an
    image becomes an overview resized to about scale_resolution^2 pixels and, when larger, a grid of slices
    (best rows x cols for its aspect ratio among max_slice_nums-bounded counts), each side a multiple of
    side_multiple px, normalised (x * rescale_factor - mean) / std per channel. Each slice gives
    (H/patch_size) * (W/patch_size) / tokens_divisor embeddings. The prompt's image token becomes
    `placeholder`: the overview's run of image tokens between image_start/end, then the slices' runs
    between slice_start/end, slices of a row adjacent, rows joined by a newline; with use_image_id an
    image_id_start i image_id_end tag first (i: the image's index in the prompt)."""

    kind: Literal["minicpmv"] = "minicpmv"
    image_token_id: int = Field(ge=0)
    tokens: dict[str, str]  # image_token, image_start_token, ... as the tokenizer spells them
    processor: dict[str, Any]  # processor_config.json's image_processor settings, as read
    patch_size: int = Field(ge=1)
    tokens_divisor: int = Field(ge=1)
    side_multiple: int = Field(ge=1)
    max_side: int = Field(ge=1)  # the largest slice side the vision encoder was exported for
    hidden_size: int = Field(ge=1)  # the LLM embedding width each image token carries
    placeholder: str


class Manifest(_Strict):
    """manifest.json. A format 1 manifest (format "cpm-mobile-bundle/1", no format_version) is
    upgraded on validation: format_version becomes FORMAT_VERSION, `upgraded_from` says 1."""

    format_version: int = Field(ge=1, le=FORMAT_VERSION, strict=True)
    format: str = BUNDLE_FORMAT  # "cpm-mobile-bundle/<format_version>", for readers of format 1
    name: str
    created: str  # ISO 8601, UTC
    recipe: dict[str, Any]  # the recipe as data: validated by cpm_mobile.recipes, not here
    source: SourceInfo
    model: ModelInfo
    tool: dict[str, str]  # library -> version
    artifacts: list[ArtifactEntry] = Field(min_length=1)
    tokenizer: list[str] | dict[str, Any]  # format 1: the tokenizer file names written
    files: dict[str, str]  # relative path -> sha256, every file but manifest.json
    vision: VisionContract | None = None  # vision-language bundles: the image path's contract
    export_cost: ExportCost | None = None  # bundles written before the field have none

    _upgraded_from: int | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _upgrade(cls, data: Any, handler) -> Manifest:
        upgraded_from = None
        if isinstance(data, dict):
            version, form = data.get("format_version"), data.get("format")
            if version is None:
                if form != f"{FORMAT_PREFIX}1":
                    raise ValueError("format_version missing (and format is not 'cpm-mobile-bundle/1'): "
                                     "not a cpm-mobile bundle manifest")
                upgraded_from = 1
                data = {**data, "format_version": FORMAT_VERSION, "format": BUNDLE_FORMAT}
            elif isinstance(version, int) and not isinstance(version, bool):
                _refuse_newer(version)
                if form is not None and form != f"{FORMAT_PREFIX}{version}":
                    raise ValueError(f"format {form!r} disagrees with format_version {version}")
                data = {**data, "format": f"{FORMAT_PREFIX}{version}"}
        manifest = handler(data)
        if upgraded_from is not None:
            manifest._upgraded_from = upgraded_from
        return manifest

    @field_validator("created")
    @classmethod
    def _iso_time(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an ISO 8601 time: {value!r}") from None
        return value

    @field_validator("files")
    @classmethod
    def _hashes(cls, files: dict[str, str]) -> dict[str, str]:
        for relative, digest in files.items():
            if not re.fullmatch(_SHA256, digest):
                raise ValueError(f"{relative}: not a sha256 hex digest: {digest!r}")
            if relative.startswith("/") or ".." in Path(relative).parts:
                raise ValueError(f"{relative}: not a path inside the bundle")
        return files

    @model_validator(mode="after")
    def _one_artifact_per_target(self) -> Manifest:
        targets = [a.target for a in self.artifacts]
        repeated = sorted({t for t in targets if targets.count(t) > 1})
        if repeated:
            raise ValueError(f"more than one artifact for target {', '.join(repeated)}")
        return self

    @property
    def upgraded_from(self) -> int | None:
        """The format version the manifest was read in, when older than FORMAT_VERSION; else None."""
        return self._upgraded_from

    @property
    def targets(self) -> list[str]:
        return [a.target for a in self.artifacts]

    def artifact(self, target: str) -> ArtifactEntry:
        for artifact in self.artifacts:
            if artifact.target == target:
                return artifact
        raise KeyError(f"bundle has no {target} artifact (has {', '.join(self.targets)})")

    def dump(self) -> dict[str, Any]:
        """The JSON-ready dict (what manifest.json holds); non-finite floats as "nan"/"inf"/"-inf"."""
        absent: dict[str, Any] = {name: True for name in ("vision", "export_cost") if getattr(self, name) is None}
        if self.model.state_bytes is None:  # a bundle written before the field
            absent["model"] = {"state_bytes"}
        return json_safe(self.model_dump(mode="python", exclude=absent or None))


# -- report.json -----------------------------------------------------------------------------------


class GateResult(_Strict):
    """One gate of one artifact: faithfulness (against its twin) or fidelity (against fp32)."""

    against: str
    metrics: dict[str, Any]  # floats, ints, lists, dicts, or "nan"/"inf"/"-inf"; {} when not run
    tolerances: dict[str, float | None]  # the bounds applied; None: reported, not checked
    # Statistical twins (exporter/spread.py): the twin's own spread at this depth, the recipe's stated
    # bounds, and the margin that loosened them into `tolerances`.
    spread: dict[str, Any] | None = None
    breaches: list[str]
    passed: bool

    @model_serializer(mode="wrap")
    def _without_absent_spread(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("spread") is None:
            data.pop("spread", None)  # gates of exact twins: the key stays out, as in reports before it
        return data


class ArtifactReport(_Open):
    entry: str
    verified: str
    precision: str
    quantization: dict[str, Any] | None
    faithfulness: GateResult
    fidelity: GateResult
    breaches: list[str]
    failed_gates: list[str]
    passed: bool


class GreedySample(_Strict):
    prompt: str
    continuation: str


class ReferenceInfo(_Strict):
    runtime: str
    greedy_samples: list[GreedySample]
    host: str


class PlanInfo(_Strict):
    prompts: int = Field(ge=0)
    max_new_tokens: int = Field(ge=0)
    stop_ids: list[int]
    heldout_windows: int = Field(ge=0)
    heldout_tokens: int = Field(ge=0)


class Suggestion(_Strict):
    """After a fidelity failure: the smallest shipped recipe whose eager ExecuTorch twin passes its own fidelity
    bounds (exporter/estimate.py), or recipe None when none does short of fp32."""

    recipe: str | None
    measured_on: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    bounds: dict[str, Any] = Field(default_factory=dict)
    size_vs_fp32: float | None = None
    tried: list[str] = Field(default_factory=list)


class Report(_Strict):
    """report.json. A format 1 report (no format_version) is read as FORMAT_VERSION: same keys."""

    format_version: int = Field(ge=1, le=FORMAT_VERSION, strict=True)
    passed: bool
    artifacts: dict[str, ArtifactReport]
    reference: ReferenceInfo
    plan: PlanInfo
    bundle_breaches: list[str] = Field(default_factory=list)  # files outside any artifact that changed
    suggestion: Suggestion | None = None  # only in a report whose fidelity gate failed
    # a vision-language bundle whose vision encoder is on a grid: the grid, and the linears left in fp32
    vision_quantization: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        version = data.get("format_version")
        if version is None:
            return {**data, "format_version": FORMAT_VERSION}
        if isinstance(version, int) and not isinstance(version, bool):
            _refuse_newer(version)
        return data

    def dump(self) -> dict[str, Any]:
        """The JSON-ready dict (what report.json holds); non-finite floats as "nan"/"inf"/"-inf"."""
        absent = {name for name in ("suggestion", "vision_quantization") if getattr(self, name) is None}
        return json_safe(self.model_dump(mode="python", exclude=absent or None))


# -- reading a bundle ------------------------------------------------------------------------------


class NewerFormat(ValueError):
    def __init__(self, version: int):
        self.version = version
        super().__init__(f"bundle format {version} is newer than this cpm-mobile reads ({FORMAT_VERSION}); "
                         "upgrade cpm-mobile")


def _refuse_newer(version: int) -> None:
    if version > FORMAT_VERSION:
        raise NewerFormat(version)


def read_manifest(bundle: str | Path) -> Manifest:
    """The bundle's manifest.json, validated (and upgraded from format 1); InputError on any problem."""
    path, data = _read_json(Path(bundle), MANIFEST_FILE)
    return _validate(Manifest, path, data)


def read_report(bundle: str | Path) -> Report:
    """The bundle's report.json, validated; InputError on any problem."""
    path, data = _read_json(Path(bundle), REPORT_FILE)
    return _validate(Report, path, data)


def manifest_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a format FORMAT_VERSION manifest.json, for MANIFEST_SCHEMA_FILE."""
    schema = Manifest.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": MANIFEST_SCHEMA_ID,
        **schema,
        "title": f"cpm-mobile bundle manifest (format {FORMAT_VERSION})",
    }


def _read_json(bundle: Path, name: str) -> tuple[Path, dict[str, Any]]:
    path = bundle / name
    if not bundle.is_dir():
        raise InputError(bundle, "no such bundle folder")
    if not path.is_file():
        raise InputError(path, f"{name} not found: not a cpm-mobile bundle")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not valid JSON (not UTF-8: {exc.reason} at byte {exc.start})") from None
    if not isinstance(data, dict):
        raise InputError(path, f"not a JSON object (got {type(data).__name__})")
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise InputError(path, str(NewerFormat(version)))
    return path, data


def _validate(model: type[BaseModel], path: Path, data: dict[str, Any]):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InputError(path, validation_problem(exc)) from None


def validation_problem(exc: ValidationError) -> str:
    """The first error of a ValidationError as one line: 'artifacts.0.io.cache.kind: ... (got 'x')'."""
    error = exc.errors(include_url=False)[0]
    # Union members appear in loc by type ("tokenizer.list[str]", "shape.0.int"): not a field path.
    where = ".".join(str(part) for part in error["loc"] if not _is_type_tag(part))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] not in ("missing", "value_error", "extra_forbidden") and isinstance(
        error.get("input"), (str, int, float, bool, type(None))
    ):
        shown = repr(error["input"])
        message += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    elif error["type"] == "extra_forbidden":
        message = "unknown key"
    problem = f"{where}: {message}" if where else message
    return " ".join(problem.split())


_TYPE_TAGS = {"int", "str", "float", "bool", "none", "list", "dict"}


def _is_type_tag(part: int | str) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or bool(re.fullmatch(r"[a-z-]+\[.*\]", part)))


def json_safe(value: Any) -> Any:
    """NaN and infinities as strings: strict JSON has no literal for them, and a reader must see them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
