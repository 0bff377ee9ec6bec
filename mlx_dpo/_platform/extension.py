"""Build a C++ source shipped with the package into an MLX extension module, once per machine, and
import it.

Such a module defines MLX operations of its own (``compute/fastops.cpp``): it is compiled against
the installed MLX's headers and ``libmlx.so`` and with ``nanobind`` in MLX's own domain, so that
its functions take and return ``mx.array``. Like ``cc.build`` it is compiled for this CPU and kept
in this user's private cache folder under a name that hashes everything the binary depends on
(the source, the compiler, the flags, this CPU's flags, MLX's, nanobind's and Python's versions).
A missing piece (a C++ compiler, Python's or MLX's headers, nanobind) or a failed build is an
answer (``None`` and why), not an error: callers keep MLX's own operations.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import platform
import sys
import sysconfig
from types import ModuleType
from typing import Optional

import mlx.core as mx

from . import cc

try:
    import nanobind
except ImportError:  # an extension is optional: without nanobind, MLX's own operations serve
    nanobind = None

CXX_ENV = "CXX"


def _inputs() -> tuple[Optional[list[str]], str]:
    """The include paths, nanobind's source and MLX's library for the compiler, or ``(None, what
    is missing)``."""
    if nanobind is None:
        return None, "nanobind is not installed (pip install nanobind)"
    mlx_dir = os.path.dirname(mx.__file__)
    python_include = sysconfig.get_paths()["include"]
    needs = ((os.path.join(python_include, "Python.h"), "Python's headers (the python3-dev package)"),
             (os.path.join(mlx_dir, "include", "mlx", "mlx.h"), "MLX's headers"),
             (os.path.join(mlx_dir, "lib", "libmlx.so"), "MLX's libmlx.so"))
    for path, what in needs:
        if not os.path.exists(path):
            return None, f"{what} not found at {path}"
    robin_map = os.path.join(os.path.dirname(nanobind.source_dir()), "ext", "robin_map", "include")
    lib = os.path.join(mlx_dir, "lib")
    return [f"-I{nanobind.include_dir()}", f"-I{robin_map}", f"-I{os.path.join(mlx_dir, 'include')}",
            f"-I{python_include}", os.path.join(nanobind.source_dir(), "nb_combined.cpp"),
            f"-L{lib}", "-lmlx", f"-Wl,-rpath,{lib}"], ""


def _flags() -> list[str]:
    arch = "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else "-march=native"
    # -fno-trapping-math lets GCC vectorise float rounding; it changes no result. Not built for
    # Python's stable ABI: nanobind shares its types only between modules built alike, and MLX's
    # wheels are not (Python 3.11, 3.12 and 3.13 checked with MLX 0.32.4).
    return ["-O3", arch, "-fno-trapping-math", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden",
            "-DNB_DOMAIN=mlx", "-DNDEBUG"]


def build(source: str, name: str) -> tuple[Optional[ModuleType], str]:
    """``(module, how it was built)`` for the C++ file ``source`` (whose ``NB_MODULE`` is
    ``name``), or ``(None, why not)``."""
    compiler = cc.find_compiler((CXX_ENV,), ("c++", "g++", "clang++"))
    if compiler is None:
        return None, f"no C++ compiler found (c++, g++ or clang++ on the PATH, or ${CXX_ENV}; none with ${cc.ENV}=off)"
    extra, why = _inputs()
    if extra is None:
        return None, why
    flags = _flags()
    target, why = cc.cached_build(compiler, flags, source, name, sysconfig.get_config_var("EXT_SUFFIX") or ".so", extra,
                                  (mx.__version__, nanobind.__version__, sys.version))
    if target is None:
        return None, f"the extension did not build: {why}"
    try:
        spec = importlib.util.spec_from_file_location(name, target, loader=importlib.machinery.ExtensionFileLoader(name, target))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # whatever a broken build raises while loading, MLX's own operations serve
        return None, f"the extension did not load: {e}"
    return module, f"{os.path.basename(compiler)} {' '.join(flags[:3])}"
