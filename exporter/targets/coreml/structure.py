"""Structural checks of a saved ML Program: what must hold for it to load and run right on an iPhone.

They read the package (spec and MIL program) without running it, so they hold on any OS:
- the spec version and opset are iOS 18's (states need iOS 18; a newer one would not load there);
- every op is one the numpy interpreter implements (so the Linux check ran all of it);
- the KV cache states are fp16 (Core ML refuses other state types);
- no tensor has rank above 5 (Core ML's limit for ML Program tensors);
- every gather's indices can address its whole axis: coremltools narrows gather indices to
  (u)int16 in fp16 programs, which would silently wrap token ids of a vocabulary above 65535.
- for a compressed program (the artifact's `compression` metadata): the constexpr op types its
  scheme emits are there, every weight matrix (linear weights, the vocabulary-wide gather) comes
  out of a constexpr op unless the metadata lists it as kept, the stored codes have the scheme's
  narrow dtypes, and weight.bin is within 10 % of the size formula.

Each check is a dict {name, passed, detail}; the caller decides what a failure means.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cpm_mobile.runtimes.coreml.mil_interpreter import load_mil_program
from cpm_mobile.runtimes.coreml.mil_ops import SUPPORTED_OPS

IOS18_SPEC_VERSION = 9
IOS18_OPSET = "CoreML8"
MAX_RANK = 5
GATHER_OPS = ("gather", "gather_along_axis", "gather_nd")


def structural_checks(package_path: str | Path, vocab_size: int, program: Any = None,
                      compression: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All checks of the package. `program` (its loaded MIL program) saves loading the weights twice;
    `compression` (the artifact's compression metadata) adds the checks of a compressed program."""
    import coremltools as ct

    spec = ct.models.MLModel(str(package_path), skip_model_load=True).get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        return [_result("ml_program", False, f"model type is {spec.WhichOneof('Type')}, not mlProgram")]
    program = program if program is not None else load_mil_program(package_path)
    functions = program.functions
    return [
        _result("ml_program", True, f"functions: {', '.join(functions)}"),
        check_spec_version(spec),
        check_opset(spec),
        check_op_allowlist(functions),
        check_states_fp16(spec, functions),
        check_tensor_ranks(functions),
        check_gather_indices(functions, vocab_size),
        *(compression_checks(package_path, functions, vocab_size, compression) if compression else []),
    ]


def failed(checks: list[dict[str, Any]]) -> list[str]:
    """'name: detail' for each failed check."""
    return [f"{c['name']}: {c['detail']}" for c in checks if not c["passed"]]


# -- the checks ----------------------------------------------------------------------------------


def check_spec_version(spec: Any) -> dict[str, Any]:
    version = int(spec.specificationVersion)
    return _result("spec_version", version == IOS18_SPEC_VERSION,
                   f"specificationVersion {version} (iOS18 is {IOS18_SPEC_VERSION})")


def check_opset(spec: Any) -> dict[str, Any]:
    opsets = {name: f.opset for name, f in spec.mlProgram.functions.items()}
    wrong = {name: opset for name, opset in opsets.items() if opset != IOS18_OPSET}
    detail = f"opset {IOS18_OPSET} in {', '.join(opsets)}" if not wrong else f"not {IOS18_OPSET}: {wrong}"
    return _result("opset", bool(opsets) and not wrong, detail)


def check_op_allowlist(functions: dict[str, Any]) -> dict[str, Any]:
    used = {op.op_type for function in functions.values() for op in _operations(function)}
    unknown = sorted(used - SUPPORTED_OPS)
    if unknown:
        return _result("op_allowlist", False, f"ops outside the interpreter's set: {', '.join(unknown)}")
    return _result("op_allowlist", True, f"{len(used)} op types, all supported: {', '.join(sorted(used))}")


def check_states_fp16(spec: Any, functions: dict[str, Any]) -> dict[str, Any]:
    from coremltools.converters.mil.mil import types
    from coremltools.proto import FeatureTypes_pb2

    fp16 = FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    wrong = [s.name for s in spec.description.state if s.type.stateType.arrayType.dataType != fp16]
    count = len(spec.description.state)
    for function in functions.values():
        for name, var in function.inputs.items():
            if types.is_state(var.sym_type) and var.sym_type.wrapped_type().get_primitive() != types.fp16:
                wrong.append(name)
    if wrong:
        return _result("states_fp16", False, f"states not fp16: {', '.join(sorted(set(wrong)))}")
    return _result("states_fp16", True, f"{count} states, all fp16" if count else "no states")


def check_tensor_ranks(functions: dict[str, Any]) -> dict[str, Any]:
    from coremltools.converters.mil.mil import types

    too_high = []
    highest = 0
    for function in functions.values():
        variables = list(function.inputs.values()) + [v for op in _operations(function) for v in op.outputs]
        for var in variables:
            sym_type = var.sym_type.wrapped_type() if types.is_state(var.sym_type) else var.sym_type
            if types.is_tensor(sym_type):
                rank = len(sym_type.get_shape())
                highest = max(highest, rank)
                if rank > MAX_RANK:
                    too_high.append(f"{var.name} (rank {rank})")
    if too_high:
        return _result("tensor_rank", False, f"rank above {MAX_RANK}: {', '.join(too_high[:5])}")
    return _result("tensor_rank", True, f"highest rank {highest} <= {MAX_RANK}")


def check_gather_indices(functions: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Indices must hold the largest index of the gathered axis (vocab_size - 1 where it is symbolic)."""
    narrow, widest_axis, count = [], 0, 0
    for function in functions.values():
        for op in _operations(function):
            if op.op_type not in GATHER_OPS:
                continue
            count += 1
            for axis_size in _gathered_axis_sizes(op, vocab_size):
                widest_axis = max(widest_axis, axis_size)
                dtype_name, largest = _index_capacity(op.indices.dtype)
                if largest < axis_size - 1:
                    narrow.append(f"{op.op_type} '{op.name}': {dtype_name} indices (max {largest}) "
                                  f"for an axis of {axis_size}")
    if narrow:
        return _result("gather_indices", False, "; ".join(narrow[:5]))
    return _result("gather_indices", True, f"{count} gathers; indices wide enough for every axis "
                                           f"(largest {widest_axis}, vocab {vocab_size})")


WEIGHT_FILE_TOLERANCE = 0.10


def compression_checks(package_path: str | Path, functions: dict[str, Any], vocab_size: int,
                       compression: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        check_compression_ops(functions, compression["op_types"]),
        check_no_dense_weights(functions, vocab_size, set(compression.get("uncompressed_matrices", ()))),
        check_storage_dtypes(functions, set(compression["storage_dtypes"])),
        check_weight_file_size(package_path, int(compression["expected_weight_bytes"])),
    ]


def check_compression_ops(functions: dict[str, Any], expected: list[str]) -> dict[str, Any]:
    used = {op.op_type for function in functions.values() for op in _operations(function)}
    missing = sorted(set(expected) - used)
    if missing:
        return _result("compression_ops", False, f"no {', '.join(missing)} in the program")
    return _result("compression_ops", True, f"{', '.join(sorted(expected))} present")


def _weight_inputs(op: Any, vocab_size: int) -> list[Any]:
    """The operands of `op` that are weight matrices."""
    if op.op_type == "linear":
        return [op.weight]
    if op.op_type == "matmul":
        return [v for v in (op.x, op.y) if v.op is not None and v.op.op_type != "read_state"
                and (v.op.op_type == "const" or v.op.op_type.startswith("constexpr_"))]
    if op.op_type == "gather" and op.x.rank == 2 and op.x.shape[0] == vocab_size:
        return [op.x]
    return []


def check_no_dense_weights(functions: dict[str, Any], vocab_size: int, kept: set[str]) -> dict[str, Any]:
    """Every weight matrix is produced by a constexpr (decompression) op, except the ones kept."""
    dense, compressed = [], 0
    for function in functions.values():
        for op in _operations(function):
            for var in _weight_inputs(op, vocab_size):
                producer = var.op
                if producer is None:
                    continue
                if producer.op_type.startswith("constexpr_"):
                    compressed += 1
                elif producer.op_type == "const" and var.rank >= 2 and producer.name not in kept:
                    dense.append(f"{producer.name} ({types_name(var.dtype)} {tuple(var.shape)})")
    if dense:
        return _result("weights_compressed", False, f"dense weight matrices left: {', '.join(sorted(set(dense))[:5])}")
    return _result("weights_compressed", True, f"{compressed} weight operands decompressed at load"
                                               + (f"; kept dense: {', '.join(sorted(kept))}" if kept else ""))


def check_storage_dtypes(functions: dict[str, Any], expected: set[str]) -> dict[str, Any]:
    """The codes of every constexpr op are stored in one of the scheme's narrow integer types."""
    stored = set()
    for function in functions.values():
        for op in _operations(function):
            if op.op_type == "constexpr_blockwise_shift_scale" and types_name(op.data.dtype).startswith(("int", "uint")):
                stored.add(types_name(op.data.dtype))  # (a float `data` is a palette being rescaled)
            elif op.op_type == "constexpr_lut_to_dense":
                stored.add(types_name(op.indices.dtype))
    unexpected = sorted(stored - expected)
    if unexpected or not stored:
        return _result("storage_dtypes", False, f"codes stored as {', '.join(sorted(stored)) or 'nothing'}; "
                                                f"expected {', '.join(sorted(expected))}")
    return _result("storage_dtypes", True, f"codes stored as {', '.join(sorted(stored))}")


def check_weight_file_size(package_path: str | Path, expected_bytes: int) -> dict[str, Any]:
    size = sum(f.stat().st_size for f in Path(package_path).rglob("weight.bin"))
    ratio = size / expected_bytes if expected_bytes else float("inf")
    detail = f"weight.bin {size} bytes = {ratio:.3f} x the formula's {expected_bytes}"
    return _result("weight_file_size", abs(ratio - 1) <= WEIGHT_FILE_TOLERANCE, detail)


def types_name(dtype: Any) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(dtype)


# -- helpers -------------------------------------------------------------------------------------


def _result(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _operations(function: Any) -> Iterator[Any]:
    """Every op of a function, nested blocks included."""
    stack = [function]
    while stack:
        block = stack.pop()
        for op in block.operations:
            yield op
            stack.extend(op.blocks)


def _gathered_axis_sizes(op: Any, vocab_size: int) -> list[int]:
    shape = op.x.shape
    if op.op_type == "gather_nd":
        depth = op.indices.shape[-1]
        batch = int(op.batch_dims.val) if op.batch_dims is not None else 0
        dims = list(shape[batch : batch + depth]) if isinstance(depth, (int, np.integer)) else list(shape)
    else:
        axis = int(op.axis.val) if op.axis is not None else 0
        dims = [shape[axis]]
    return [int(d) if isinstance(d, (int, np.integer)) else vocab_size for d in dims]


def _index_capacity(dtype: Any) -> tuple[str, int]:
    from coremltools.converters.mil.mil import types

    name = types.builtin_to_string(dtype)
    return name, int(np.iinfo(np.dtype(types.nptype_from_builtin(dtype))).max)
