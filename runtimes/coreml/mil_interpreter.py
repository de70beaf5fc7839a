"""Run a saved Core ML ML Program (.mlpackage) op by op with numpy, on any OS.

Core ML itself only runs on Apple platforms; this interpreter lets Linux CI check the numerics
of an exported program. It loads the MIL program with coremltools (weights, multifunction,
constexpr ops and states included) and executes every op of one function with the numpy
implementations in ``mil_ops``. An op without an implementation raises ``UnsupportedOpError``;
no op is ever skipped.

Numerics model:
  * every op computes in float32 (fp16 operands are upcast exactly; matmul/linear/reductions in
    fp16 programs therefore accumulate in fp32) and its output is rounded to the op's declared
    dtype, so fp16 programs keep fp16 values between ops, as Core ML does;
  * ``const`` and ``constexpr_*`` ops run once when the interpreter is built (they only depend on
    constants); fp16 weights are cached as fp32 copies, which doubles their memory;
  * states are owned by the caller (``make_state``) and updated in place by
    ``coreml_update_state``, like an ``MLState``; ``read_state`` returns a snapshot.
"""
from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .mil_ops import OPS, OpCall, OpFn, StateRef, UnsupportedOpError

__all__ = ["MILExecutionError", "MILInterpreter", "load_mil_program"]


class MILExecutionError(RuntimeError):
    """A supported op failed or produced a value that contradicts its declared type."""


def _load_spec_and_program(package_path: str | Path) -> tuple[Any, Any]:
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    path = Path(package_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such Core ML package")
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{path}: not an ML Program (model type {spec.WhichOneof('Type')})")
    program = load(spec, specification_version=spec.specificationVersion,
                   file_weights_dir=mlmodel.weights_dir)
    return spec, program


def load_mil_program(package_path: str | Path) -> Any:
    """The coremltools MIL ``Program`` of a saved .mlpackage, with weights and constexpr ops."""
    return _load_spec_and_program(package_path)[1]


# ---------------------------------------------------------------------------------------------
# declared types


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    dtype: np.dtype | None  # None: a string-valued const (op parameter)
    shape: tuple[int | None, ...]  # None marks a symbolic (flexible) dim; () for scalars

    def check(self, value: np.ndarray, what: str) -> None:
        if value.ndim != len(self.shape) or any(
                d is not None and d != v for d, v in zip(self.shape, value.shape)):
            shown = tuple("?" if d is None else d for d in self.shape)
            raise MILExecutionError(f"{what}: got shape {value.shape}, declared {shown}")


def _spec_of(var: Any) -> _TensorSpec:
    from coremltools.converters.mil.mil import types

    sym_type = var.sym_type
    if types.is_state(sym_type):
        sym_type = sym_type.wrapped_type()
    if types.is_tensor(sym_type):
        primitive, shape = sym_type.get_primitive(), sym_type.get_shape()
    elif types.is_scalar(sym_type) or types.is_str(sym_type):
        primitive, shape = sym_type, ()
    else:
        raise UnsupportedOpError(var.op.op_type if var.op else "input", var.name,
                                 f"value of type {sym_type.__type_info__()}")
    dims = tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in shape)
    if types.is_str(primitive):
        return _TensorSpec(var.name, None, dims)
    return _TensorSpec(var.name, np.dtype(types.nptype_from_builtin(primitive)), dims)


def _compute_form(value: np.ndarray) -> np.ndarray:
    """fp16 values are held as (exactly representable) fp32 so ops compute in fp32."""
    return value.astype(np.float32) if value.dtype == np.float16 else value


def _finalize(value: Any, out: _TensorSpec, what: str) -> Any:
    """Round an op result to its declared dtype and check its declared shape."""
    if out.dtype is None:
        return str(value)
    array = np.asarray(value)
    out.check(array, what)
    return _compute_form(array.astype(out.dtype, copy=False))


# ---------------------------------------------------------------------------------------------
# input shape constraints from the model description


def _input_descriptions(spec: Any, function_name: str) -> dict[str, Any]:
    description = spec.description
    for function in description.functions:
        if function.name == function_name:
            return {feature.name: feature for feature in function.input}
    return {feature.name: feature for feature in description.input}


def _shape_violation(feature: Any, shape: tuple[int, ...]) -> str | None:
    """Why ``shape`` is not accepted by a multiArray input description (None if accepted)."""
    if feature is None or feature.type.WhichOneof("Type") != "multiArrayType":
        return None
    array_type = feature.type.multiArrayType
    flexibility = array_type.WhichOneof("ShapeFlexibility")
    if flexibility == "enumeratedShapes":
        allowed = [tuple(s.shape) for s in array_type.enumeratedShapes.shapes]
        return None if shape in allowed else f"shape {shape} is not one of {allowed}"
    if flexibility == "shapeRange":
        ranges = [(r.lowerBound, r.upperBound) for r in array_type.shapeRange.sizeRanges]
        if len(ranges) != len(shape) or any(
                d < lo or (hi >= 0 and d > hi) for d, (lo, hi) in zip(shape, ranges)):
            return f"shape {shape} outside ranges {ranges} (-1: unbounded)"
        return None
    fixed = tuple(array_type.shape)
    return None if not fixed or fixed == shape else f"shape {shape} != declared {fixed}"


# ---------------------------------------------------------------------------------------------
# execution plan


@dataclass(frozen=True)
class _Step:
    op: Any
    fn: OpFn
    args: dict[str, str | tuple[str, ...]]  # op parameter -> env key(s)
    outputs: tuple[_TensorSpec, ...]

    def describe(self) -> str:
        return f"{self.op.op_type} '{self.op.name}'"

    def execute(self, env: Any, states: dict[str, np.ndarray]) -> None:
        _run_step(self, env, states)


@dataclass(frozen=True)
class _Block:
    inputs: tuple[str, ...]
    steps: tuple[Any, ...]  # _Step or _Loop
    outputs: tuple[str, ...]

    @classmethod
    def of(cls, block: Any) -> "_Block":
        return cls(tuple(v.name for v in block.inputs), tuple(_make_step(op) for op in block.operations),
                   tuple(v.name for v in block.outputs))

    def run(self, env: Any, states: dict[str, np.ndarray], values: list[Any]) -> list[Any]:
        """The block's outputs for these input values; names it defines stay local to this run."""
        local = ChainMap(dict(zip(self.inputs, values)), env)
        for step in self.steps:
            step.execute(local, states)
        return [local[name] for name in self.outputs]


@dataclass(frozen=True)
class _Loop:
    """MIL while_loop: run the body block while the cond block says so, on the loop variables."""

    op: Any
    loop_vars: tuple[str, ...]
    condition: _Block
    body: _Block
    outputs: tuple[_TensorSpec, ...]

    def describe(self) -> str:
        return f"while_loop '{self.op.name}'"

    def execute(self, env: Any, states: dict[str, np.ndarray]) -> None:
        values = [env[name] for name in self.loop_vars]
        while bool(np.asarray(self.condition.run(env, states, values)[0])):
            values = self.body.run(env, states, values)
        for value, out in zip(values, self.outputs):
            env[out.name] = _finalize(value, out, f"{self.describe()} output '{out.name}'")


def _make_step(op: Any) -> "_Step | _Loop":
    if op.op_type == "while_loop":
        condition, body = op.blocks
        return _Loop(op, tuple(v.name for v in op.inputs["loop_vars"]), _Block.of(condition), _Block.of(body),
                     tuple(_spec_of(v) for v in op.outputs))
    if op.blocks:
        raise UnsupportedOpError(op.op_type, op.name, "ops with nested blocks other than while_loop")
    fn = OPS.get(op.op_type)
    if fn is None:
        raise UnsupportedOpError(op.op_type, op.name)
    args: dict[str, str | tuple[str, ...]] = {}
    for param, var in op.inputs.items():
        args[param] = tuple(v.name for v in var) if isinstance(var, (list, tuple)) else var.name
    return _Step(op, fn, args, tuple(_spec_of(v) for v in op.outputs))


def _lookup(env: dict[str, Any], key: str | tuple[str, ...]) -> Any:
    if isinstance(key, tuple):
        return [env[k] for k in key]
    return env[key]


def _run_step(step: _Step, env: dict[str, Any], states: dict[str, np.ndarray]) -> None:
    call = OpCall(step.op, {p: _lookup(env, k) for p, k in step.args.items()}, states)
    try:
        result = step.fn(call)
    except UnsupportedOpError:
        raise
    except Exception as exc:
        raise MILExecutionError(f"{step.describe()} failed: {exc}") from exc
    results = result if isinstance(result, tuple) else (result,)
    if len(results) != len(step.outputs):
        raise MILExecutionError(
            f"{step.describe()}: {len(results)} results for {len(step.outputs)} outputs")
    for value, out in zip(results, step.outputs):
        env[out.name] = _finalize(value, out, f"{step.describe()} output '{out.name}'")


class MILInterpreter:
    """Execute one function of a saved ML Program with numpy (see module docstring)."""

    def __init__(self, package_path: str | Path, function_name: str = "main"):
        self.package_path = Path(package_path)
        spec, self.program = _load_spec_and_program(package_path)
        if function_name not in self.program.functions:
            raise ValueError(f"{package_path}: no function '{function_name}' "
                             f"(has {sorted(self.program.functions)})")
        self.function_name = function_name
        self.function = self.program.functions[function_name]
        self._descriptions = _input_descriptions(spec, function_name)
        self._bind_signature()
        self._build_plan()

    # -- public API -------------------------------------------------------------------------

    def op_types(self) -> set[str]:
        return {op.op_type for op in self.function.operations}  # top level (a while_loop's body not listed)

    def constant(self, name: str) -> np.ndarray:
        """The value of a const or constexpr op's output, as the interpreter computed it at load."""
        if name not in self._consts:
            raise KeyError(f"no constant named {name}")
        return self._consts[name]

    def make_state(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(self._dims(s), dtype=s.dtype) for name, s in self._states.items()}

    def predict(self, inputs: dict[str, np.ndarray],
                state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run the function once. ``state`` (from ``make_state``) is updated in place; with
        ``None`` a fresh zero state is used and discarded. Outputs have their declared dtypes."""
        states = self._checked_states(state)
        env = dict(self._consts)
        env.update(self._bind_inputs(inputs))
        env.update({name: StateRef(name) for name in self._states})
        with np.errstate(all="ignore"):  # inf/nan are legitimate values (masks, overflow)
            for step in self._steps:
                step.execute(env, states)
        return {s.name: np.asarray(env[s.name]).astype(s.dtype) for s in self._outputs}

    # -- construction -----------------------------------------------------------------------

    def _bind_signature(self) -> None:
        from coremltools.converters.mil.mil import types

        self._inputs: dict[str, _TensorSpec] = {}
        self._states: dict[str, _TensorSpec] = {}
        for name, var in self.function.inputs.items():
            target = self._states if types.is_state(var.sym_type) else self._inputs
            target[name] = _spec_of(var)
        self._outputs = [_spec_of(var) for var in self.function.outputs]
        self.input_names = list(self._inputs)
        self.state_names = list(self._states)
        self.output_names = [s.name for s in self._outputs]

    def _build_plan(self) -> None:
        """Check every op up front, evaluate const/constexpr ops, keep the rest as steps."""
        self._consts: dict[str, Any] = {}
        self._steps: list[_Step] = []
        outputs = {var.name for var in self.function.outputs}
        for op in self.function.operations:
            step = _make_step(op)
            if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                # A program with a while_loop can hold dead consts (left by coremltools' loop building) named
                # like live ones; evaluating only consts something reads keeps names unique.
                if any(var.child_ops or var.name in outputs for var in op.outputs):
                    _run_step(step, self._consts, {})
            else:
                self._steps.append(step)

    # -- binding ----------------------------------------------------------------------------

    def _bind_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = set(inputs) - set(self._inputs)
        missing = set(self._inputs) - set(inputs)
        if unknown or missing:
            raise ValueError(f"inputs: missing {sorted(missing)}, unexpected {sorted(unknown)}")
        return {name: self._bind_input(name, spec, inputs[name])
                for name, spec in self._inputs.items()}

    def _bind_input(self, name: str, spec: _TensorSpec, value: Any) -> np.ndarray:
        array = np.asarray(value)
        violation = _shape_violation(self._descriptions.get(name), array.shape)
        if violation:
            raise ValueError(f"input '{name}': {violation}")
        spec.check(array, f"input '{name}'")
        if spec.dtype.kind in "iu" and array.dtype.kind in "iu" and array.size:
            info = np.iinfo(spec.dtype)
            if array.min() < info.min or array.max() > info.max:
                raise ValueError(f"input '{name}': values do not fit {spec.dtype}")
        return _compute_form(array.astype(spec.dtype))

    def _checked_states(self, state: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        if state is None:
            state = self.make_state()
        if set(state) != set(self._states):
            raise ValueError(f"state keys {sorted(state)} != declared {sorted(self._states)}")
        for name, spec in self._states.items():
            array = state[name]
            if not isinstance(array, np.ndarray) or array.dtype != spec.dtype:
                raise ValueError(f"state '{name}' must be a numpy array of {spec.dtype} "
                                 "(it is updated in place)")
            spec.check(array, f"state '{name}'")
        return state

    @staticmethod
    def _dims(spec: _TensorSpec) -> tuple[int, ...]:
        if any(d is None for d in spec.shape):
            raise ValueError(f"state '{spec.name}' has a flexible shape {spec.shape}")
        return tuple(int(d) for d in spec.shape)
