"""The package layout, and the build of libcpm_mobile_kernels (runtimes/kernels) during `pip install .`.

The repository's top-level folders (exporter/, runtimes/, recipes/, cli.py) install as one package,
`cpm_mobile` (this folder, through package_dir), so nothing of ours lands at the top of
site-packages under a generic name. bench/ and tests/ are not installed. Everything else about the
package is in pyproject.toml. The library is compiled by
runtimes/kernels/build.py against the executorch wheel that pyproject's build requirements put in
the build environment (the same pin as the runtime dependency, so the ABI matches).
"""
import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _kernel_build():
    # By path: the package itself is not importable while it is being built.
    spec = importlib.util.spec_from_file_location("_cpm_kernel_build", HERE / "runtimes" / "kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KERNELS = _kernel_build()
NAMESPACE = "cpm_mobile"
INSTALLED = ("exporter", "runtimes", "recipes")


def _packages() -> list[str]:
    found = find_packages(where=str(HERE), include=[f"{name}*" for name in INSTALLED])
    return [NAMESPACE, *(f"{NAMESPACE}.{name}" for name in found)]


class BuildPackage(build_py):
    """The repository root is the package: its setup.py is the build script, not a module of cpm_mobile."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [entry for entry in modules if not (package == NAMESPACE and entry[1] == "setup")]


class BuildKernels(build_ext):
    """Compiles each kernel library with build.py's flags instead of Python-extension ones."""

    def get_ext_filename(self, fullname):
        return str(Path(*fullname.split(".")[:-1]) / KERNELS.library_filename())

    def build_extension(self, ext):
        try:
            KERNELS.build(Path(self.get_ext_fullpath(ext.name)))
        except KERNELS.BuildError as error:
            if sys.platform.startswith("linux"):
                raise
            # Elsewhere (macOS: the Core ML job) the package works without it; the loader says why it is missing.
            print(f"warning: kernel library not built: {error}", file=sys.stderr)


setup(
    package_dir={NAMESPACE: "."},
    packages=_packages(),
    py_modules=[],
    ext_modules=[Extension(f"{NAMESPACE}.runtimes.kernels.libcpm_mobile_kernels", sources=[str(s.relative_to(HERE)) for s in KERNELS.SOURCES])],
    cmdclass={"build_ext": BuildKernels, "build_py": BuildPackage},
)
