"""Register libcpm_mobile_kernels with ExecuTorch's kernel registry in this process, once.

Loading a second copy of the library (from another path) aborts the process ("Re-registering
cpm_mobile::..."), uncatchable from Python; so the registry is asked first, and only one path is
ever loaded. A checkout whose library is not built yet (pip install -e . builds it) gets it
built here, with the same build as setup.py's.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from cpm_mobile.runtimes.kernels import KERNEL_LIBRARIES, build


def library_path() -> Path:
    """The built library, building it first when missing or older than its sources (a checkout
    updated since `pip install -e .`: a stale library lacks the newer kernels). A BuildError says
    why it cannot be built."""
    path = build.default_output()
    if not path.is_file() or path.stat().st_mtime < max(source.stat().st_mtime for source in build.SOURCES):
        build.build(path)
    return path


@functools.cache
def load_kernels() -> Path:
    """Make the cpm_mobile kernels visible to every ExecuTorch runtime in this process; the library's path."""
    from executorch.extension.pybindings import portable_lib

    path = library_path()
    # The pybindings (imported above) loaded libexecutorch.so: the library registers into that registry.
    if not set(KERNEL_LIBRARIES) <= set(portable_lib._get_operator_names()):
        ctypes.CDLL(str(path))
    return path
