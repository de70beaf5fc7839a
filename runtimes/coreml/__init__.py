"""Core ML runtime helpers: a numpy interpreter for saved ML Programs (runs on Linux)."""
from .mil_interpreter import MILExecutionError, MILInterpreter, load_mil_program
from .mil_ops import SUPPORTED_OPS, UnsupportedOpError

__all__ = [
    "MILExecutionError",
    "MILInterpreter",
    "SUPPORTED_OPS",
    "UnsupportedOpError",
    "load_mil_program",
]
