"""The Core ML runtime: Core ML itself on macOS, a numpy interpreter of saved ML Programs elsewhere (session.py)."""
from .mil_interpreter import MILExecutionError, MILInterpreter, load_mil_program
from .mil_ops import SUPPORTED_OPS, UnsupportedOpError
from .session import CoreMLSession, open_coreml  # registers the runtime for the coreml target

__all__ = [
    "MILExecutionError",
    "CoreMLSession",
    "MILInterpreter",
    "SUPPORTED_OPS",
    "UnsupportedOpError",
    "load_mil_program",
    "open_coreml",
]
