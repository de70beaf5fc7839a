"""Core ML weight compression (coremltools.optimize.coreml) and the eager twin of what it stores.

Compression runs on the converted program, between `ct.convert` and `save` (exporter/targets/
coreml.py): `compress_mlmodel(mlmodel, scheme)` quantises every weight constant of the program
(linear weights, the embedding gather's table, the lm_head), and `coreml_twin(model, mlmodel)`
builds the eager CausalLM that holds exactly the weights the program stores: each constexpr op's
value is materialised with coremltools' own value inference and mapped back to its parameter.

Which constants are weights: torch.export names a parameter `p_<qualified name>` ('.' -> '_')
and a buffer `b_<name>`; coremltools keeps that name (adding `_to_fp16` in fp16 programs) and
names a compressed constant `<name>_quantized` / `_palettized` (`_palettized_pcs` for its
per-channel scale). So the program's rank-2 float `p_` constants are the weights; buffers (RoPE
tables) and the zero biases coremltools adds to bias-free linears are left alone. The mapping back
is by that name, checked by shape and by correlation with the fp32 parameter (a wrong match, i.e.
another layer's weight, correlates ~0).

Roles: a constant read by a `gather` is the embedding; the weight of a linear whose output width
is the vocabulary is the lm_head; a tied model has one constant with both roles.

coremltools skips (with a log warning) a constant it cannot compress, e.g. a block size that does
not divide a dimension; `check_scheme` refuses those up front and `compress_mlmodel` verifies that
every selected constant really was compressed, so a silently fp32 weight cannot ship.
"""
from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from cpm_mobile.exporter.errors import InputError
from cpm_mobile.exporter.targets.stored import grid_width
from cpm_mobile.exporter.models.transformer import CausalLM
from cpm_mobile.exporter.targets.coreml.spec import SCHEME_BITS

PARAMETER_PREFIX = "p_"
FP16_SUFFIX = "_to_fp16"
COMPRESSED_SUFFIXES = ("_palettized_pcs", "_quantized", "_palettized")
EMBEDDING, LM_HEAD, LINEAR = "embedding", "lm_head", "linear"
LINEAR_SCHEMES = ("int8", "int4")
PALETTE_SCHEMES = ("palette4", "palette2", "ternary")
# The op types each kind of compression leaves in the program (what structural checks look for).
OP_TYPES = {"linear": "constexpr_blockwise_shift_scale", "palette": "constexpr_lut_to_dense"}
MIN_CORRELATION = 0.5  # a ternary weight correlates ~0.8 with its source, another layer's ~0


@dataclass(frozen=True)
class ProgramWeight:
    """A weight constant of the program: its op name, shape and what reads it."""

    name: str
    shape: tuple[int, ...]
    roles: frozenset[str]

    @property
    def parameter(self) -> str:
        """torch.export's flattened parameter name, without prefix or precision suffix."""
        return base_name(self.name)


def base_name(const_name: str) -> str:
    """'p_layers_0_mlp_up_proj_weight_to_fp16_quantized' -> 'layers_0_mlp_up_proj_weight'."""
    name = const_name
    changed = True
    while changed:
        changed = False
        for suffix in (*COMPRESSED_SUFFIXES, FP16_SUFFIX):
            if name.endswith(suffix):
                name, changed = name[: -len(suffix)], True
    return name[len(PARAMETER_PREFIX):] if name.startswith(PARAMETER_PREFIX) else name


def flat_name(qualified: str) -> str:
    return qualified.replace(".", "_")


# -- which constants, which config ---------------------------------------------------------------


def _main(program: Any) -> Any:
    """The main function of an MLModel's MIL program, or of a MIL program loaded from a saved package."""
    return getattr(program, "_mil_program", program).functions["main"]


def _vocab_size(function: Any) -> int:
    return int(function.outputs[0].shape[-1])


def program_weights(mlmodel: Any) -> list[ProgramWeight]:
    """The rank-2 float parameter constants of the (uncompressed) program, with their roles."""
    function = _main(mlmodel)
    vocab = _vocab_size(function)
    weights = []
    for op in function.operations:
        if op.op_type != "const" or not op.name.startswith(PARAMETER_PREFIX):
            continue
        value = op.outputs[0].val
        if not isinstance(value, np.ndarray) or value.ndim != 2 or value.dtype.kind != "f":
            continue
        if any(child.op_type.startswith("constexpr_") for child in op.outputs[0].child_ops):
            continue  # the scale of a weight already compressed (a checkpoint grid's), not a weight
        weights.append(ProgramWeight(op.name, tuple(value.shape), _roles(op, vocab)))
    return weights


def _roles(op: Any, vocab: int) -> frozenset[str]:
    """What reads a weight constant: the embedding gather, the lm_head linear, other ops."""
    roles = set()
    for child in op.outputs[0].child_ops:
        if child.op_type == "gather":
            roles.add(EMBEDDING)
        elif child.op_type == "linear" and op.outputs[0].shape[0] == vocab:
            roles.add(LM_HEAD)
        else:
            roles.add(LINEAR)
    return frozenset(roles)


def _choice(scheme: Any, roles: frozenset[str]) -> str:
    """'scheme', 'int8' or 'keep' for a weight with these roles."""
    if EMBEDDING in roles and LM_HEAD in roles and scheme.embedding != scheme.lm_head:
        raise InputError("quantization.lm_head", f"the lm_head is tied to the embedding (one weight), so it must "
                                                 f"be quantised as quantization.embedding is ('{scheme.embedding}'), "
                                                 f"got '{scheme.lm_head}'")
    if EMBEDDING in roles:
        return scheme.embedding
    if LM_HEAD in roles:
        return scheme.lm_head
    return "scheme"


def _block_axis_and_size(scheme: Any, choice: str) -> tuple[int, int | None]:
    """(axis the groups run along, group size) of one weight's compression; None = whole axis."""
    if choice == "int8":
        return 1, scheme.embedding_group_size
    if scheme.scheme in LINEAR_SCHEMES:
        return 1, scheme.group_size
    return 0, scheme.group_size


def _check_divides(scheme: Any, choice: str, name: str, shape: tuple[int, ...]) -> None:
    axis, size = _block_axis_and_size(scheme, choice)
    if size is None or shape[axis] % size == 0:
        return
    field = "embedding_group_size" if choice == "int8" else "group_size"
    what = "input columns" if axis == 1 else "output channels"
    raise InputError(f"quantization.{field}", f"{size} does not divide the {shape[axis]} {what} of {name} "
                                              f"(allowed: a divisor of every layer's {what})")


def check_scheme(model: CausalLM, scheme: Any) -> None:
    """Refuse, before any work, a scheme this model's shapes (or its checkpoint's grid) cannot carry
    (one-line InputError)."""
    check_grid(model, scheme)
    scheme = grid_scheme(model, scheme)
    embedding = model.embed_tokens.weight
    lm_head = getattr(getattr(model, "lm_head", None), "weight", None)
    seen: set[int] = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if parameter.dim() != 2 or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        roles = set()
        if parameter is embedding:
            roles.add(EMBEDDING)
        if parameter is lm_head:
            roles.add(LM_HEAD)
        choice = _choice(scheme, frozenset(roles or {LINEAR}))
        if choice != "keep":
            _check_divides(scheme, choice, name, tuple(parameter.shape))


def _op_config(scheme: Any, choice: str, shape: tuple[int, ...]) -> tuple[str, Any]:
    """('linear' | 'palette', coremltools op config) for one weight."""
    import coremltools.optimize.coreml as cto

    axis, size = _block_axis_and_size(scheme, choice)
    if choice == "int8" or scheme.scheme in LINEAR_SCHEMES:
        symmetric = True if choice == "int8" else scheme.symmetric
        # per_block with an explicit block shape: [1, size] is one scale per output channel per
        # `size` input columns, [1, 0] one per output channel; the same whatever op reads the weight.
        return "linear", cto.OpLinearQuantizerConfig(
            mode="linear_symmetric" if symmetric else "linear",
            dtype="int8" if choice == "int8" else scheme.scheme,
            granularity="per_block", block_size=[1, size or 0], weight_threshold=0)
    group = size or shape[0]
    if scheme.scheme == "ternary":
        return "palette", cto.OpPalettizerConfig(
            mode="custom", lut_function=ternary_lut, granularity="per_grouped_channel",
            group_size=group, channel_axis=0, weight_threshold=0)
    return "palette", cto.OpPalettizerConfig(
        mode=scheme.mode, nbits=SCHEME_BITS[scheme.scheme], granularity="per_grouped_channel",
        group_size=group, channel_axis=0, weight_threshold=0)


def ternary_lut(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BitCPM / BitNet b1.58 absmean rounding of one group: codes round(W / s) clipped to {-1, 0, +1},
    s = mean |W| of the group, as a 4-entry palette (-s, 0, +s, unused 0) and its indices.

    Ours: no library rounds to ternary; coremltools' palettizer calls it per group (mode "custom")."""
    values = weight.astype(np.float32)
    scale = float(np.abs(values).mean())
    codes = np.clip(np.round(values / scale), -1, 1) if scale > 0 else np.zeros_like(values)
    lut = np.array([-scale, 0.0, scale, 0.0], dtype=weight.dtype)
    return lut, (codes + 1).astype(np.uint8).reshape(-1)


# -- compress ------------------------------------------------------------------------------------


@contextmanager
def _quiet() -> Iterator[None]:
    """coremltools reports each pass with a progress bar and logs skips as warnings: keep them out."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tqdm

            original = tqdm.tqdm.__init__

            def silent(self, *args, **kwargs):
                kwargs["disable"] = True
                original(self, *args, **kwargs)

            tqdm.tqdm.__init__ = silent
            try:
                yield
            finally:
                tqdm.tqdm.__init__ = original
    finally:
        logger.setLevel(level)


def compression_plan(mlmodel: Any, scheme: Any) -> dict[str, tuple[str, Any]]:
    """const name -> (kind, op config) for every weight the scheme compresses (checked shapes)."""
    plan = {}
    for weight in program_weights(mlmodel):
        choice = _choice(scheme, weight.roles)
        if choice == "keep":
            continue
        _check_divides(scheme, choice, weight.name, weight.shape)
        plan[weight.name] = _op_config(scheme, choice, weight.shape)
    return plan


def compress_mlmodel(mlmodel: Any, scheme: Any, grid: Any = None) -> Any:
    """The program with its weights compressed as `scheme` says (a new MLModel; `mlmodel` is untouched).

    Palettes first, then linear quantisation (int8 embeddings next to a palettised body): each
    pass only sees the constants named for it, so nothing is compressed twice. With the
    checkpoint's grid (exporter/models/grid.py) the body's linears carry its codes and scales as
    they are; the scheme then only decides the embedding and lm_head."""
    import coremltools.optimize.coreml as cto

    if grid is not None:
        mlmodel = _compress_grid(mlmodel, grid, scheme)
    plan = compression_plan(mlmodel, scheme)
    if not plan and grid is not None:
        return mlmodel
    if not plan:
        raise InputError("quantization", "the scheme leaves every weight uncompressed (embedding and lm_head "
                                         "'keep' and no other weight in the program)")
    passes = (("palette", cto.palettize_weights), ("linear", cto.linear_quantize_weights))
    compressed = mlmodel
    with _quiet():
        for kind, compress in passes:
            configs = {name: config for name, (k, config) in plan.items() if k == kind}
            if configs:
                compressed = compress(compressed, cto.OptimizationConfig(op_name_configs=configs))
    missing = sorted(set(plan) - _compressed_sources(compressed))
    if missing:
        raise RuntimeError(f"coremltools left {len(missing)} weight(s) uncompressed: {', '.join(missing[:4])}")
    return compressed


# -- a checkpoint's own grid ---------------------------------------------------------------------


def check_grid(model: CausalLM, scheme: Any) -> None:
    """Refuse, before any work, a checkpoint grid this scheme cannot carry losslessly in
    constexpr_blockwise_shift_scale, or a scheme that contradicts it (one-line InputError)."""
    from cpm_mobile.exporter.targets import grid
    from cpm_mobile.exporter.targets.coreml.spec import CAPABILITIES

    grid.check_grid(model, scheme, CAPABILITIES.grid, "coreml")


def grid_scheme(model: CausalLM, scheme: Any) -> Any:
    """The scheme as the program carries it with the checkpoint's grid: its group size and symmetry."""
    grid = model.config.weight_grid
    if grid is None or scheme.scheme not in LINEAR_SCHEMES:
        return scheme
    grouped = [g.group_size for g in grid.linears.values() if g.group_size != g.codes.shape[1]]
    # A group as wide as a layer's input is one scale per channel there too (groups of 128 with
    # 128 inputs): the scheme's group size is the grouped layers' one, None when none is grouped.
    return scheme.model_copy(update={"group_size": grouped[0] if grouped else None,
                                     "symmetric": all(g.symmetric for g in grid.linears.values())})


def _compress_grid(mlmodel: Any, grid: Any, scheme: Any) -> Any:
    """Every body linear's weight constant -> constexpr_blockwise_shift_scale over the grid's codes
    (signed, as coremltools stores int4/int8: code - 2**(bits-1)), scales and zero points."""
    from coremltools import _SPECIFICATION_VERSION_IOS_18
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models.utils import _apply_graph_pass

    scheme_bits = SCHEME_BITS[scheme.scheme]
    by_flat = {flat_name(name): entry for name, entry in grid.linears.items()}
    targets = {w.name: by_flat[w.parameter] for w in program_weights(mlmodel)
               if w.roles == frozenset({LINEAR}) and w.parameter in by_flat}
    if len(targets) != len(by_flat):
        raise RuntimeError(f"the program holds {len(targets)} of the grid's {len(by_flat)} linear weights")

    class GridWeights(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            for op in list(prog.functions["main"].operations):
                entry = targets.get(op.name)
                if entry is None:
                    continue
                dtype = op.outputs[0].val.dtype
                scales = entry.scales.numpy().astype(dtype)
                if not np.array_equal(scales.astype(np.float32), entry.scales.numpy()):
                    raise InputError("precision", f"coreml target: {op.name}'s grid scales are not exact in "
                                                  f"{dtype} (the program's precision); export fp32")
                middle = 1 << (entry.bits - 1)
                storage = types.np_int4_dtype if max(scheme_bits, entry.bits) == 4 else np.int8  # 8: a mixed grid's
                data = (entry.codes.numpy().astype(np.int16) - middle).astype(storage)
                offset = None
                if not entry.symmetric:
                    offset = (entry.zeros.numpy().astype(np.int16) - middle).astype(storage)
                with prog.functions["main"]:
                    new = mb.constexpr_blockwise_shift_scale(data=data, scale=scales, offset=offset, before_op=op,
                                                             name=op.name + "_quantized")
                op.enclosing_block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                                                no_check_var_types=True)
                op.enclosing_block.remove_ops([op])

    with _quiet():
        return _apply_graph_pass(mlmodel, GridWeights(), spec_version=_SPECIFICATION_VERSION_IOS_18)


# -- what the program stores ---------------------------------------------------------------------


@dataclass(frozen=True)
class StoredWeight:
    name: str  # the producing op's name (const, or the last constexpr of a chain)
    op_types: tuple[str, ...]  # constexpr chain from storage to value, () for a plain const
    value: np.ndarray  # what the program computes with, as float32

    @property
    def compressed(self) -> bool:
        return bool(self.op_types)


def _chain(op: Any) -> tuple[str, ...]:
    """The constexpr op types feeding `op` (inclusive), storage first."""
    types = []
    stack = [op]
    while stack:
        current = stack.pop()
        if current.op_type.startswith("constexpr_"):
            types.append(current.op_type)
            stack.extend(v.op for v in current.inputs.values() if not isinstance(v, (list, tuple))
                         and v.op is not None and v.op.op_type.startswith("constexpr_"))
    return tuple(reversed(types))


def materialize(op: Any) -> np.ndarray:
    """A constexpr op's value, by coremltools' own value inference.

    coremltools 9.0 rewrites palettes with a per-channel scale into lut = blockwise_shift_scale(...)
    -> lut_to_dense, and lut_to_dense's `materialized_val_inference` reads `lut.val` (None for a
    constexpr input); its static `decompress` is then called on the materialised lut instead."""
    if op.op_type == "constexpr_lut_to_dense" and op.lut.val is None and op.lut.op.op_type.startswith("constexpr_"):
        vector_axis = None if op.vector_axis is None else op.vector_axis.val
        return type(op).decompress(op.indices.val, materialize(op.lut.op), vector_axis)
    return op.materialized_val_inference()


def stored_weights(mlmodel: Any) -> dict[str, StoredWeight]:
    """Every parameter constant the program computes with, by base name, materialised the way
    coremltools does (constexpr ops: `materialized_val_inference`)."""
    found: dict[str, StoredWeight] = {}
    for op in _main(mlmodel).operations:
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            continue
        for var in op.inputs.values():
            for v in var if isinstance(var, (list, tuple)) else (var,):
                producer = v.op
                if producer is None or not producer.name.startswith(PARAMETER_PREFIX):
                    continue
                if producer.name in {w.name for w in found.values()}:
                    continue
                if producer.op_type == "const":
                    value, chain = producer.outputs[0].val, ()
                elif producer.op_type.startswith("constexpr_"):
                    value, chain = materialize(producer), _chain(producer)
                else:
                    continue
                if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                    continue
                found[base_name(producer.name)] = StoredWeight(producer.name, chain, value.astype(np.float32))
    return found


def _compressed_sources(mlmodel: Any) -> set[str]:
    """The names the compressed weights' constants had before compression."""
    return {_source_name(w.name) for w in stored_weights(mlmodel).values() if w.compressed}


def _source_name(compressed_name: str) -> str:
    name = compressed_name
    for suffix in COMPRESSED_SUFFIXES:
        name = re.sub(f"{suffix}$", "", name)
    return name


# -- the twin ------------------------------------------------------------------------------------


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator else 0.0


def stored_parameters(model: CausalLM, mlmodel: Any) -> dict[str, torch.Tensor]:
    """Qualified parameter name -> the tensor the program stores for it (every alias of a tied one)."""
    by_flat: dict[str, list[str]] = {}
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for qualified in parameters:
        by_flat.setdefault(flat_name(qualified), []).append(qualified)
    aliases: dict[int, list[str]] = {}
    for qualified, parameter in parameters.items():
        aliases.setdefault(id(parameter), []).append(qualified)

    weights: dict[str, torch.Tensor] = {}
    for base, stored in stored_weights(mlmodel).items():
        if base not in by_flat:
            raise ValueError(f"program constant {stored.name} names no parameter of the model")
        qualified = by_flat[base][0]
        source = parameters[qualified].detach().cpu().numpy()
        if source.shape != stored.value.shape:
            raise ValueError(f"{stored.name}: shape {stored.value.shape} != {qualified} {source.shape}")
        if stored.compressed and _correlation(source, stored.value) < MIN_CORRELATION:
            raise ValueError(f"{stored.name} does not hold {qualified}: correlation "
                             f"{_correlation(source, stored.value):.3f} < {MIN_CORRELATION}")
        tensor = torch.from_numpy(stored.value.copy())
        for alias in aliases[id(parameters[qualified])]:
            weights[alias] = tensor
    return weights


def coreml_twin(model: CausalLM, compressed_mlmodel: Any) -> CausalLM:
    """The eager model the compressed program computes: its stored (dequantised) weights, Core ML's
    fp16 KV cache; `model` itself is untouched."""
    from cpm_mobile.exporter.models.variant import with_weights
    from cpm_mobile.exporter.targets.coreml.cache import CoreMLKVCache

    return with_weights(model, stored_parameters(model, compressed_mlmodel), caches=CoreMLKVCache.like)


# -- size ----------------------------------------------------------------------------------------


def expected_weight_bytes(model: CausalLM, scheme: Any, precision: str) -> int:
    """quantised params x bits / 8 + scales (+ offsets, palettes) + unquantised tensors, from the
    model's shapes and the scheme alone (not from the program), for the size check."""
    element = 4 if precision == "fp32" else 2
    embedding = model.embed_tokens.weight
    lm_head = getattr(getattr(model, "lm_head", None), "weight", None)
    total = 0
    seen: set[int] = set()
    for name, parameter in model.named_parameters():  # unique tensors: a tied embedding is stored once
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        count = parameter.numel()
        roles = {r for r, p in ((EMBEDDING, embedding), (LM_HEAD, lm_head)) if parameter is p} or {LINEAR}
        choice = _choice(scheme, frozenset(roles)) if parameter.dim() == 2 else "keep"
        if choice == "keep":
            total += count * element
            continue
        rows, columns = parameter.shape
        axis, size = _block_axis_and_size(scheme, choice)
        if choice == "int8" or scheme.scheme in LINEAR_SCHEMES:
            wide = grid_width(model, name.removesuffix(".weight")) == 8  # a mixed grid's 8-bit linear
            bits = 8 if choice == "int8" or wide else SCHEME_BITS[scheme.scheme]
            scales = rows * (columns // size if size else 1)
            asymmetric = choice != "int8" and not scheme.symmetric  # offsets: one code per scale
            total += count * bits // 8 + scales * element + (scales * bits // 8 if asymmetric else 0)
        else:
            bits = SCHEME_BITS[scheme.scheme]
            groups = rows // (size or rows)
            total += count * bits // 8 + groups * (2**bits) * element
    for name, buffer in model.named_buffers():
        if not name.startswith("kv_caches."):
            total += buffer.numel() * element
    return total


def weight_file_bytes(package_path: Any) -> int:
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(package_path).rglob("weight.bin"))


STORAGE_DTYPES = {"int8": "int8", "int4": "int4", "palette4": "uint4", "palette2": "uint2", "ternary": "uint2"}


def compression_metadata(mlmodel: Any, scheme: Any, model: CausalLM, precision: str) -> dict[str, Any]:
    """What the artifact's manifest says about its compression; the structural checks hold the saved
    program to it (runtimes/coreml/structure.py). Expectations come from the scheme, not the program."""
    scheme = grid_scheme(model, scheme)
    stored = stored_weights(mlmodel)
    kept = sorted(w.name for w in stored.values() if not w.compressed and w.value.ndim == 2)
    kind = "linear" if scheme.scheme in LINEAR_SCHEMES else "palette"
    choices = {_choice(scheme, w.roles) for w in program_weights_of(mlmodel, stored)}
    storage = {STORAGE_DTYPES[scheme.scheme]} if "scheme" in choices else set()
    if "int8" in choices:
        storage.add("int8")
    op_types = {OP_TYPES[kind]} if "scheme" in choices else set()
    if "int8" in choices:
        op_types.add(OP_TYPES["linear"])
    return {
        "scheme": scheme.model_dump(),
        "op_types": sorted(op_types),
        "storage_dtypes": sorted(storage),
        "compressed_weights": sum(w.compressed for w in stored.values()),
        "uncompressed_matrices": kept,
        "expected_weight_bytes": expected_weight_bytes(model, scheme, precision),
    }


def program_weights_of(mlmodel: Any, stored: dict[str, StoredWeight]) -> list[ProgramWeight]:
    """The roles of a compressed program's rank-2 weights (as program_weights gives them before)."""
    function = _main(mlmodel)
    vocab = _vocab_size(function)
    producers = {w.name for w in stored.values() if w.value.ndim == 2}
    weights = []
    for op in function.operations:
        if op.name not in producers:
            continue
        weights.append(ProgramWeight(op.name, tuple(op.outputs[0].shape), _roles(op, vocab)))
    return weights
