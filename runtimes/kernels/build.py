"""Compile the kernel library (libcpm_mobile_kernels) against the installed executorch wheel.

python -m cpm_mobile.runtimes.kernels.build [--out PATH]

`pip install -e .` runs this through setup.py; the loader (runtimes/kernels/loader.py) runs it
too when a checkout has no built library yet. Only the standard library is imported here, so
setup.py can load this file before anything is installed. The compile flags are the ones the
wheel's headers need and its libraries were built with (research/executorch_custom_kernels.md);
the library links only libexecutorch (the one kernel registry) and libexecutorch_threadpool (the
threadpool XNNPACK uses).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "sparse_expert_ffn.cpp", HERE / "linear_weight_only.cpp", HERE / "gated_delta_rule.cpp")
LIBRARY_NAME = "libcpm_mobile_kernels"  # = runtimes.kernels.LIBRARY (not imported: setup.py loads this file alone)
# Extra compiler flags, e.g. CPM_MOBILE_KERNEL_FLAGS="-march=armv8.2-a" (default: tune for this machine).
FLAGS_VARIABLE = "CPM_MOBILE_KERNEL_FLAGS"


class BuildError(RuntimeError):
    pass


def library_filename() -> str:
    return LIBRARY_NAME + (".dylib" if sys.platform == "darwin" else ".so")


def default_output() -> Path:
    return HERE / library_filename()


def executorch_root() -> Path:
    """The installed executorch package folder (found without importing it)."""
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("executorch is not installed: the kernel library is built against its wheel")
    for location in spec.submodule_search_locations:
        root = Path(location)
        if (root / "include" / "executorch").is_dir() and (root / "lib").is_dir():
            return root
    raise BuildError(f"executorch at {list(spec.submodule_search_locations)} has no include/ and lib/ folders")


def compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise BuildError("no C++ compiler found (set CXX)")


def tuning_flags(cxx: str) -> list[str]:
    """-march=native when building for this machine (an editable install is), if the compiler takes it."""
    if FLAGS_VARIABLE in os.environ:
        return shlex.split(os.environ[FLAGS_VARIABLE])
    flag = "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else "-march=native"
    probe = subprocess.run([cxx, flag, "-x", "c++", "-fsyntax-only", "-"], input=b"int main(){}\n",
                           capture_output=True)
    return [flag] if probe.returncode == 0 else []


def command(output: Path, cxx: str) -> list[str]:
    root = executorch_root()
    include = root / "include"
    lib = root / "lib"
    flags = [
        "-std=c++17", "-O3", "-fPIC", "-DNDEBUG", "-fopenmp-simd",
        "-fvisibility-inlines-hidden",
        # As the wheel's libraries were built (else class layouts silently differ) and its headers need.
        "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED", "-DET_USE_THREADPOOL",
        f"-I{include}", f"-I{include / 'executorch' / 'runtime' / 'core' / 'portable_type' / 'c10'}",
    ]
    # No rpath: the build's executorch may be a pip build environment that is gone afterwards. The
    # library is loaded after executorch's runtime (which loads both by soname), as in an app.
    link = [f"-L{lib}", "-lexecutorch", "-lexecutorch_threadpool"]
    shared = ["-dynamiclib", "-undefined", "dynamic_lookup"] if sys.platform == "darwin" else ["-shared"]
    return [cxx, *flags, *tuning_flags(cxx), *shared, *map(str, SOURCES), "-o", str(output), *link]


def build(output: Path | None = None) -> Path:
    """Compile into `output` (default: beside this file), replacing it atomically."""
    output = Path(output or default_output())
    output.parent.mkdir(parents=True, exist_ok=True)
    cxx = compiler()
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".kernel-build-") as scratch:
        temporary = Path(scratch) / output.name
        result = subprocess.run(command(temporary, cxx), capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"compiling {', '.join(s.name for s in SOURCES)} failed:\n{result.stderr.strip()}")
        os.replace(temporary, output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"library path (default: {default_output()})")
    parser.add_argument("--print-command", action="store_true", help="print the compiler command and exit")
    args = parser.parse_args(argv)
    try:
        if args.print_command:
            print(shlex.join(command(Path(args.out or default_output()), compiler())))
            return
        print(build(args.out))
    except BuildError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
