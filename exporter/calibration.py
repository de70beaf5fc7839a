"""Calibrated int4 rounding of the body's linears (GPTQ), done once before the targets.

Why our own GPTQ: torchao 0.18's `torchao.prototype.gptq` runs on CUDA only ("GPTQ only supports CUDA
currently"), its int4 path needs the `mslk` kernels package and yields packed `Int4Tensor`s for CUDA
kernels, and it quantises every layer from float inputs (no sequential calibration). What we need is
plain nn.Linear on CPU and the integer codes, scales and zero points themselves, as a `WeightGrid`
(exporter/models/grid.py) that every target already carries exactly. The algorithm is the standard one
(Frantar et al. 2022, "GPTQ", Algorithm 1, as in the authors' reference code), in float64 on CPU:

- per linear, H = 2/n X^T X over the calibration tokens' inputs to it;
- dampening `damp` x mean(diag H) on the diagonal, dead inputs (H_ii = 0) zeroed;
- the upper Cholesky factor of H^-1; columns quantised left to right in lazy batches of `block_size`,
  each column's rounding error propagated to the columns not yet quantised;
- groups of `group_size` input columns: the group's scale (and zero) computed when the group starts,
  from the weights as the propagated errors have left them, by a small search for the scale with the
  least squared rounding error (GPTQ's "mse" option); scales rounded to bf16 (what XNNPACK stores, so
  the .pte carries them exactly too).

Sequential, as GPTQ does: layer L's inputs are computed with layers < L already quantised, and inside a
layer each linear's inputs with the linears before it quantised (q/k/v share one input and one Hessian,
then o_proj, then gate/up, then down).

The grid is stored in the bundle (`calibration.safetensors`): `cpm-mobile check` rebuilds the ExecuTorch
twin from it (the ONNX and Core ML twins are read back from their own files). Re-running GPTQ at check
time instead would depend on the calibration file still existing and on float summation order (threads,
BLAS) not flipping a code at a rounding boundary; the stored codes are exact and hashed in the manifest.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from cpm_mobile.exporter.activation_scaling import scale_layer
from cpm_mobile.exporter.defaults import HELDOUT_TEXT, read_text
from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.models.grid import LinearGrid, WeightGrid
from cpm_mobile.exporter.models.kv_cache import causal_mask
from cpm_mobile.exporter.models.transformer import CausalLM, bind_state
from cpm_mobile.exporter.models.variant import empty_like, with_weights
from cpm_mobile.exporter.sensitivity import body_linears, choose, sensitivities
from cpm_mobile.exporter.targets.base import Progress, no_progress

GRID_FILE = "calibration.safetensors"
GRID_FORMAT = "cpm-mobile-grid/1"
SCALE_DTYPE = torch.bfloat16  # XNNPACK stores 4-bit block scales as bf16: the grid's scales are exact in it
# Scale search: the group's absmax scale shrunk by these factors; the least squared rounding error wins.
SHRINK = tuple(1.0 - 0.04 * i for i in range(11))  # 1.0 .. 0.6
# Not wider: also trying max|W| / 6 .. / 8.5 (what the .pte's round-to-nearest int4 searches) lowered int4-gptq's
# KL on minicpm-tiny (eager 2.47e-3 -> 2.30e-3) but raised it on a trained 24-layer model at logit scale 41
# (.pte 2.5e-3 -> 3.3e-3, .onnx 2.3e-3 -> 2.9e-3; bench.training.deep, bench.quality).


# -- the calibration text --------------------------------------------------------------------------


def calibration_windows(tokens: list[int], windows: int, length: int, bos_id: int | None,
                        reserved: int = 0, source: str | Path = "calibration text") -> list[list[int]]:
    """`windows` windows of `length` tokens (BOS + text) cut from the END of `tokens`.

    reserved: how many leading tokens belong to the check (its held-out windows) when the calibration
    text is the text the check measures: the windows must not reach into them.
    """
    body = length - (1 if bos_id is not None else 0)
    needed = windows * body
    available = len(tokens) - reserved
    if available < needed:
        where = f" after the check's first {reserved} held-out tokens" if reserved else ""
        raise InputError(source, f"calibration needs {windows} windows x {body} tokens = {needed} tokens{where}; "
                                 f"the text has {max(available, 0)}: give a longer --calibration text or fewer "
                                 f"calibration windows")
    tail = tokens[len(tokens) - needed:]
    prefix = [bos_id] if bos_id is not None else []
    return [prefix + tail[i * body:(i + 1) * body] for i in range(windows)]


# -- GPTQ on one linear ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupRounding:
    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    scale_dtype: torch.dtype = SCALE_DTYPE
    divisors: tuple[float, ...] | None = None  # symmetric only: try max|W| / each instead of the SHRINK search

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def params(self, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of `group` [rows, g]: (scale, zero), the scale in scale_dtype, by the least squared
        rounding error over SHRINK x the full-range scale (or max|W| / each of `divisors`)."""
        top = self.levels - 1
        best_err = best_scale = best_zero = None
        if self.symmetric:
            amax = group.abs().amax(1)
            amax = torch.where(amax > 0, amax, torch.ones_like(amax))
            base, zero_of = amax / (top // 2), None  # codes -7..7 around zero 8 (-8 reached only by shrinking)
        else:
            low = group.amin(1).clamp(max=0)
            high = group.amax(1).clamp(min=0)
            span = torch.where(high > low, high - low, torch.ones_like(high))
            base, zero_of = span / top, low
        searched = ([(amax / divisor, 1.0) for divisor in self.divisors] if self.symmetric and self.divisors
                    else [(base * shrink, shrink) for shrink in SHRINK])
        for candidate, shrink in searched:
            scale = candidate.to(self.scale_dtype).to(group.dtype)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            if zero_of is None:
                zero = torch.full_like(scale, self.levels // 2)
            else:
                zero = torch.round(-zero_of * shrink / scale).clamp(0, top)
            err = ((self.dequantize(group, scale, zero) - group) ** 2).sum(1)
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
        return best_scale, best_zero

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """w [rows] or [rows, g] with per-row scale/zero -> codes in [0, levels)."""
        if w.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return torch.clamp(torch.round(w / scale) + zero, 0, self.levels - 1)

    def dequantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        codes = self.codes(w, scale, zero)
        if w.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return scale * (codes - zero)


def gptq_linear(weight: torch.Tensor, hessian: torch.Tensor | None, rounding: GroupRounding,
                damp: float = 0.01, block_size: int = 128) -> LinearGrid:
    """GPTQ of one weight [out, in] given H [in, in] (module docstring); hessian None = round to nearest
    with the same group rounding (the baseline GPTQ improves on)."""
    W = weight.detach().to(torch.float64).clone()
    rows, columns = W.shape
    g = rounding.group_size
    if columns % g:
        raise InputError("calibration.group_size", f"{g} does not divide the input width {columns}")
    groups = columns // g
    if hessian is None:
        blocks, scale, zero = _group_params(W, rounding)
        codes = rounding.codes(blocks, scale, zero).reshape(rows, columns)
        return _grid(codes, scale.reshape(rows, groups), zero.reshape(rows, groups), rounding)
    codes = torch.zeros(rows, columns, dtype=torch.float64)
    scales = torch.zeros(rows, groups, dtype=torch.float64)
    zeros = torch.zeros(rows, groups, dtype=torch.float64)
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += torch.eye(columns, dtype=torch.float64) * (damp * torch.mean(torch.diag(H)))
    # Upper Cholesky factor of H^-1: row i holds what quantising column i does to the columns after it.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    block_size = max(g, block_size - block_size % g)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if column % g == 0:  # a group starts: its scale from the weights as the errors have left them
                j = column // g
                scales[:, j], zeros[:, j] = rounding.params(W1[:, i:i + g])
            j = column // g
            w = W1[:, i]
            q = rounding.codes(w, scales[:, j], zeros[:, j])
            codes[:, column] = q
            err = (w - scales[:, j] * (q - zeros[:, j])) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return _grid(codes, scales, zeros, rounding)


def round_to_nearest(weight: torch.Tensor, rounding: GroupRounding) -> torch.Tensor:
    """`weight` [out, in] after `rounding` to nearest with its scale search, in its own dtype (no Hessian, no
    grid): the activation-scaling search's measure, cheap enough to try every exponent on every linear."""
    blocks, scale, zero = _group_params(weight, rounding)
    return rounding.dequantize(blocks, scale, zero).reshape(weight.shape)


def _group_params(weight: torch.Tensor, rounding: GroupRounding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every group of `weight` [out, in] as one row [out * in / g, g], with its (scale, zero): row-wise, so the
    same numbers as group by group, at once."""
    blocks = weight.reshape(-1, rounding.group_size)
    return (blocks, *rounding.params(blocks))


def _grid(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, rounding: GroupRounding) -> LinearGrid:
    return LinearGrid(codes.to(torch.uint8), scales.to(torch.float32), zeros.to(torch.uint8), rounding.bits,
                      rounding.group_size, rounding.scale_dtype)


# -- the model, layer by layer ---------------------------------------------------------------------


class _Hessian:
    """Running 2/n X^T X of one linear's inputs (float64)."""

    def __init__(self, width: int):
        self.sum = torch.zeros(width, width, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum += x.T @ x
        self.count += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.count, 1))


def rounding_for(bits: int, spec: Any) -> GroupRounding:
    """The group rounding of a linear with `bits`-bit codes: bf16 scales at the calibration's width (XNNPACK's), a
    mixed grid's wider linears in the scale dtype of our weight-only kernel's tiles (fp16 at 8 bits, as Q8_0)."""
    if bits == spec.bits:
        return GroupRounding(bits, spec.group_size, spec.symmetric, SCALE_DTYPE)
    from cpm_mobile.exporter.kernels.ops import SCALE_DTYPES

    return GroupRounding(bits, spec.group_size, spec.symmetric, SCALE_DTYPES[bits])


def calibrate(model: CausalLM, windows: list[list[int]], spec: Any, progress: Progress = no_progress,
              source: str = "", bits: Mapping[str, int] | None = None) -> WeightGrid:
    """The GPTQ grid of every body linear of `model` (not changed), calibrated on `windows` of token ids.

    spec: the recipe's CalibrationSpec (bits, group_size, symmetric, damp, block_size).
    bits: weight name -> code width for the linears not at spec.bits (a mixed-precision choice)."""
    roundings = {b: rounding_for(b, spec) for b in {spec.bits, *(bits or {}).values()}}
    n_tokens = sum(len(w) for w in windows)
    config = model.config
    linears: dict[str, LinearGrid] = {}
    floats: dict[str, torch.Tensor] = {}
    nearest = roundings[spec.bits]
    with torch.no_grad():
        hidden = [model.embed_tokens(torch.tensor([w])) * config.scale_emb for w in windows]
        for index, source_layer in enumerate(model.layers):
            layer = _working_copy(source_layer)
            cache = empty_like(model.kv_caches[index])
            run = lambda h: _run_layer(model, layer, cache, h)  # noqa: E731
            if spec.awq:
                progress(f"calibrate: activation scaling layer {index + 1}/{len(model.layers)}",
                         index / len(model.layers))
                gains = scale_layer(layer, run, hidden, lambda w: round_to_nearest(w, nearest))
                floats.update({f"layers.{index}.{name}": gain for name, gain in gains.items()})
            progress(f"calibrate: gptq layer {index + 1}/{len(model.layers)}", index / len(model.layers))
            stages = _stages(layer, run, hidden[0])
            if not spec.sequential:  # every Hessian from the float layer, in the pass that gives the next input
                hidden = _one_pass(stages, hidden, run, linears, index, roundings, bits, spec)
                continue
            for stage in stages:
                # one Hessian per stage: its linears read the same input
                hessian = _Hessian(stage[0][1].in_features)
                handles = [stage[0][1].register_forward_hook(lambda m, inputs, output: hessian.add(inputs[0]))]
                # The rest of the layer's forward is not needed once the stage's linears have seen their inputs.
                handles.append(stage[-1][1].register_forward_hook(_stop))
                try:
                    for h in hidden:
                        try:
                            run(h)
                        except _StageDone:
                            pass
                finally:
                    for handle in handles:
                        handle.remove()
                _round_stage(stage, hessian, linears, index, roundings, bits, spec)
            hidden = [run(h) for h in hidden]
    progress("calibrate: done", 1.0)
    how = ("awq + " if spec.awq else "") + ("gptq" if spec.sequential else "gptq (float inputs, one pass)")
    return WeightGrid(source or f"{how} calibrated on {n_tokens} tokens", linears, floats=floats)


def _round_stage(stage, hessian: _Hessian, linears, index, roundings, bits, spec) -> None:
    """GPTQ of each linear of `stage` on the stage's Hessian; the working layer's weights become the rounded ones."""
    value = hessian.value()
    for name, module in stage:
        key = f"layers.{index}.{name}.weight"
        rounding = roundings[(bits or {}).get(key, spec.bits)]
        grid = gptq_linear(module.weight, value, rounding, spec.damp, spec.block_size)
        module.weight.copy_(grid.dequantize().to(module.weight.dtype))
        linears[key] = grid


def _one_pass(stages, hidden, run, linears, index, roundings, bits, spec) -> list[torch.Tensor]:
    """One pass of the float layer over every window: the next layer's inputs, and one Hessian per stage (its
    linears share their input) from the float inputs; then every linear of the layer rounded. GPTQ without the
    sequential re-runs: one forward of the model in all."""
    hessians = [_Hessian(stage[0][1].in_features) for stage in stages]
    handles = [stage[0][1].register_forward_hook(lambda m, inputs, output, h=h: h.add(inputs[0]))
               for stage, h in zip(stages, hessians)]
    try:
        outputs = [run(h) for h in hidden]
    finally:
        for handle in handles:
            handle.remove()
    for stage, hessian in zip(stages, hessians):
        _round_stage(stage, hessian, linears, index, roundings, bits, spec)
    return outputs


class _StageDone(Exception):
    """Raised after a stage's last linear: its inputs are all the stage needs from the forward."""


def _stop(module: nn.Module, inputs: Any, output: Any) -> None:
    raise _StageDone


def _working_copy(layer: nn.Module) -> nn.Module:
    """The layer with its own weight tensors (quantised in place during calibration), source untouched."""
    import copy

    clone = copy.deepcopy(layer)
    for parameter in clone.parameters():
        parameter.requires_grad_(False)
    return clone


def _run_layer(model: CausalLM, layer: nn.Module, cache: nn.Module, h: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(h.shape[1])
    mask = causal_mask(positions, model.max_seq_len)
    cache.reset()
    cos = model.rope_cos.index_select(0, positions)
    sin = model.rope_sin.index_select(0, positions)
    return layer(h, cos, sin, bind_state(cache, positions, mask))


def _stages(layer: nn.Module, run: Callable[[torch.Tensor], torch.Tensor],
            sample: torch.Tensor) -> list[list[tuple[str, nn.Linear]]]:
    """The layer's linears in the order the forward calls them, grouped by shared input (q/k/v; gate/up)."""
    calls: list[tuple[str, nn.Linear, torch.Tensor]] = []
    modules = [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(lambda m, inputs, output, name=name: calls.append((name, m, inputs[0])))
               for name, m in modules]
    try:
        run(sample)
    finally:
        for handle in handles:
            handle.remove()
    seen = {name for name, _, _ in calls}
    missing = [name for name, _ in modules if name not in seen]
    if missing or len(calls) != len(seen):
        raise RuntimeError(f"calibration: linears not called exactly once per forward: {missing or calls}")
    stages: list[list[tuple[str, nn.Linear]]] = []
    last_input = None
    for name, module, x in calls:
        if last_input is not None and x is last_input:
            stages[-1].append((name, module))
        else:
            stages.append([(name, module)])
        last_input = x
    return stages


# -- the calibrated model, and the grid in the bundle ----------------------------------------------


def calibrated_model(reference: CausalLM, grid: WeightGrid) -> CausalLM:
    """A variant of `reference` whose linears hold the grid's dequantised weights and whose config carries the
    grid (every target's quantiser then exports its codes as they are); `reference` is not changed."""
    weights = {name: linear.dequantize() for name, linear in grid.linears.items()}
    model = with_weights(reference, {**weights, **grid.floats})
    model.config = dataclasses.replace(reference.config, weight_grid=grid)
    return model


def save_grid(grid: WeightGrid, path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Codes packed two per byte (first in the low nibble), fp32 scales, uint8 zeros; safetensors."""
    from safetensors.torch import save_file

    tensors = {}
    for name, linear in grid.linears.items():
        if linear.bits not in (4, 8):
            raise ValueError(f"{name}: only 4- and 8-bit grids are stored")
        codes = linear.codes
        tensors[f"{name}.codes"] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous() if linear.bits == 4 \
            else codes.contiguous()
        tensors[f"{name}.scales"] = linear.scales.contiguous()
        tensors[f"{name}.zeros"] = linear.zeros.contiguous()
    for name, tensor in grid.floats.items():
        tensors[f"{name}.float"] = tensor.detach().to(torch.float32).contiguous()
    first = grid.first()
    wide = {name: [linear.bits, _dtype_name(linear.scale_dtype)] for name, linear in grid.linears.items()
            if linear.bits != first.bits}
    header = {"format": GRID_FORMAT, "source": grid.source, "bits": str(first.bits),
              "group_size": str(first.group_size), "scale_dtype": _dtype_name(first.scale_dtype),
              "linears": json.dumps(list(grid.linears)), **({"wide": json.dumps(wide)} if wide else {}),
              **({"floats": json.dumps(list(grid.floats))} if grid.floats else {}),
              **(metadata or {})}
    save_file(tensors, str(path), metadata=header)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_grid(path: Path) -> WeightGrid:
    from safetensors import safe_open

    if not path.is_file():
        raise InputError(path, "calibrated grid missing (the recipe has a calibration step)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != GRID_FORMAT:
                raise InputError(path, f"not a calibrated grid ({GRID_FORMAT})")
            group = int(header["group_size"])
            narrow = (int(header["bits"]), header["scale_dtype"])
            wide = json.loads(header.get("wide", "{}"))  # a mixed grid: name -> [bits, scale dtype]
            linears = {}
            for name in json.loads(header["linears"]):
                bits, scale_dtype = wide.get(name, narrow)
                stored = handle.get_tensor(f"{name}.codes")
                codes = torch.stack([stored & 0x0F, stored >> 4], dim=-1).reshape(stored.shape[0], -1) \
                    if bits == 4 else stored
                linears[name] = LinearGrid(codes, handle.get_tensor(f"{name}.scales"),
                                           handle.get_tensor(f"{name}.zeros"), int(bits), group,
                                           getattr(torch, scale_dtype))
            floats = {name: handle.get_tensor(f"{name}.float") for name in json.loads(header.get("floats", "[]"))}
    except (OSError, KeyError, ValueError, TypeError, AttributeError, json.JSONDecodeError) as error:
        raise InputError(path, f"unreadable calibrated grid ({error})") from None
    return WeightGrid(header["source"], linears, floats=floats)


# -- what the recipe asks, before any work -----------------------------------------------------------


def planned_grid(model: CausalLM, spec: Any) -> WeightGrid:
    """A stand-in for the grid calibration will give `model` (every body linear, the spec's group size and
    symmetry, tiny tensors): the targets' grid checks judge it before any work, as they judge a checkpoint's."""
    g = spec.group_size
    sizes = {name: module.weight.numel() for name, module in body_linears(model).items()}
    widths = dict.fromkeys(sizes, spec.bits)
    if spec.mixed is not None:
        # Which linears stay wide is measured at calibration; the sizes depend only on how many weights the budget
        # allows: the same choice with every linear equally costly per weight (module order).
        planned = choose({name: float(size) for name, size in sizes.items()}, sizes, spec.bits,
                         spec.mixed.high_bits, spec.mixed.bits_per_weight)
        widths.update(dict.fromkeys(planned.high, spec.mixed.high_bits))
    linears = {}
    for name, bits in widths.items():
        zero = (1 << (bits - 1)) if spec.symmetric else 0
        linears[name] = LinearGrid(torch.zeros(1, 2 * g, dtype=torch.uint8), torch.ones(1, 2),
                                   torch.full((1, 2), zero, dtype=torch.uint8), bits, g,
                                   rounding_for(bits, spec).scale_dtype)
    return WeightGrid("gptq calibration (planned)", linears)


def calibration_refusals(recipe: Any, model: CausalLM) -> list[str]:
    """Why the recipe's calibration cannot run on a model of these shapes (and this checkpoint grid)."""
    spec = recipe.calibration
    if spec is None:
        return []
    if model.config.weight_grid is not None:
        return [f"recipe {recipe.name} calibrates float weights; this checkpoint's linears already carry a grid "
                f"({model.config.weight_grid.describe()}): use --recipe checkpoint-grid to export it as it is"]
    return [f"calibration.group_size: {spec.group_size} does not divide the input width {module.in_features} of "
            f"{name.removesuffix('.weight')}"
            for name, module in body_linears(model).items() if module.in_features % spec.group_size][:1]


def with_planned_grid(model: CausalLM, recipe: Any) -> CausalLM:
    """The shapes model of a calibration recipe, carrying the planned grid (for pre-flight and size rules)."""
    if recipe.calibration is None:
        return model
    import copy

    planned = copy.copy(model)
    planned.config = dataclasses.replace(model.config, weight_grid=planned_grid(model, recipe.calibration))
    return planned


def calibrated_spec(spec: Any, calibration: Any) -> Any:
    """A target spec as its artifact will be laid out with the calibrated grid (the grid's group size and
    symmetry in the scheme's own fields), for the size rules, which read the spec."""
    from cpm_mobile.exporter.targets import registry

    scheme = spec.quantization
    carrier = registry.capabilities(spec.target).grid
    if calibration is None or scheme is None or carrier is None:
        return spec
    update = {carrier.group_field: calibration.group_size}
    if "symmetric" in type(scheme).model_fields:
        update["symmetric"] = calibration.symmetric
    return spec.model_copy(update={"quantization": scheme.model_copy(update=update)})


def read_calibration_text(path: Path) -> str:
    text = read_text(path, "calibration text")
    if not text.strip():
        raise InputError(path, "calibration text is empty")
    return text


@dataclasses.dataclass(frozen=True)
class CalibrationText:
    text: str
    source: str | Path  # named in errors
    reserved: int  # leading tokens that belong to the check (its held-out windows): never calibrated on


def calibration_text(path: Path | None, heldout_text: str, heldout_windows: list[list[int]]) -> CalibrationText:
    """`path`, else the embedded held-out text. When it is the text the check scores, the check's held-out windows
    (its first tokens) are reserved: calibrating on them would grade the recipe on what it was fitted to."""
    source = path or HELDOUT_TEXT
    text = read_calibration_text(source)
    return CalibrationText(text, source, sum(len(w) for w in heldout_windows) if text == heldout_text else 0)


def calibrate_for_recipe(reference: CausalLM, recipe: Any, tokenizer: Any, calibration: CalibrationText,
                         progress: Progress = no_progress) -> WeightGrid:
    """The recipe's calibration on `calibration`: windows from the text's end (none of its reserved tokens),
    then GPTQ layer by layer."""
    spec = recipe.calibration
    length = min(spec.tokens, reference.max_seq_len)
    windows = calibration_windows(tokenizer.encode(calibration.text), spec.windows, length, tokenizer.bos_id,
                                  calibration.reserved, calibration.source)
    bits = None
    if spec.mixed is not None:
        choice = mixed_choice(reference, windows[:spec.mixed.windows], spec, progress)
        bits = {name: spec.mixed.high_bits for name in choice.high}
    return calibrate(reference, windows, spec, progress, bits=bits)


def mixed_choice(reference: CausalLM, windows: list[list[int]], spec: Any, progress: Progress = no_progress):
    """The linears a mixed-precision calibration keeps at 8 bits (exporter/sensitivity.py)."""
    low = rounding_for(spec.bits, spec)
    measured = sensitivities(reference, windows, lambda w: gptq_linear(w, None, low).dequantize(), progress)
    sizes = {name: module.weight.numel() for name, module in body_linears(reference).items()}
    return choose(measured, sizes, spec.bits, spec.mixed.high_bits, spec.mixed.bits_per_weight)
