"""Build a C source shipped with the package into a shared library, once per machine, and load it.

The library is compiled for this CPU (``-march=native``; ``-mcpu=native`` on Arm) with OpenMP
where the compiler has it, and kept in a private cache folder (``blas.cache_dir``: this
user's alone, so no one else can plant a library there) under a name that hashes the source, the
compiler's identity, the flags and this CPU's flags: an edited source, another compiler or another
CPU builds afresh. No compiler, or a failed build, is an answer (``None`` and why), not an error:
callers fall back to code that needs none.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

from .blas import cache_dir, cpu_flags

ENV = "MLX_DPO_CC"  # the compiler to use, or "off" for none


def find_compiler(variables: Sequence[str] = (ENV, "CC"), names: Sequence[str] = ("cc", "gcc", "clang")) -> Optional[str]:
    """The compiler the first set environment variable of ``variables`` names, else the first of
    ``names`` on the PATH; none where ``$MLX_DPO_CC`` is ``off``."""
    if os.environ.get(ENV, "").lower() == "off":
        return None
    for name in (*(os.environ.get(v, "") for v in variables), *names):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _flags(compiler: str, openmp: bool) -> list[str]:
    arch = "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else "-march=native"
    return ["-O3", arch, "-shared", "-fPIC"] + (["-fopenmp"] if openmp else [])


def compiler_identity(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return compiler


def compile_library(compiler: str, flags: list[str], source: str, target: str, extra: Sequence[str] = ("-lm",)) -> Optional[str]:
    """Compile ``source`` (and the ``extra`` inputs and libraries after it) into ``target``,
    atomically; the compiler's first error line on failure."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, source, *extra, "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode:
            lines = [x for x in done.stderr.splitlines() if "error" in x] or done.stderr.splitlines() or ["no output"]
            return lines[0].strip()
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_build(compiler: str, flags: list[str], source: str, name: str, suffix: str = ".so",
                 extra: Sequence[str] = ("-lm",), inputs: Sequence[str] = ()) -> tuple[Optional[str], str]:
    """``(path, "")`` of ``source`` compiled into the private cache folder, built now unless a
    build of the same inputs is there (its name hashes the source, the compiler's identity, the
    flags, ``extra``, this CPU's flags and ``inputs``, what else the binary depends on), or
    ``(None, why not)``."""
    try:
        folder = cache_dir("kernels")
    except OSError:
        return None, "no private cache folder to keep the compiled library in"
    with open(source, "rb") as f:
        parts = [f.read()] + [p.encode() for p in (compiler_identity(compiler), " ".join(flags), " ".join(extra),
                                                     " ".join(sorted(cpu_flags())), platform.machine(), *inputs)]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()
    target = os.path.join(folder, f"{name}-{key[:16]}{suffix}")
    if not os.path.exists(target):
        why = compile_library(compiler, flags, source, target, extra)
        if why:
            return None, why
    return target, ""


def build(source: str) -> tuple[Optional[ctypes.CDLL], str]:
    """``(library, how it was built)`` for the C file ``source``, or ``(None, why not)``."""
    compiler = find_compiler()
    if compiler is None:
        return None, f"no C compiler found (cc, gcc or clang; ${ENV} names one)"
    why = ""
    for openmp in (True, False):  # Apple's clang has no OpenMP: one thread then
        flags = _flags(compiler, openmp)
        target, why = cached_build(compiler, flags, source, os.path.splitext(os.path.basename(source))[0])
        if target is None:
            continue
        try:
            lib = ctypes.CDLL(target)
        except OSError as e:
            why = str(e)
            continue
        return lib, f"{os.path.basename(compiler)} {' '.join(flags[:2])}{', OpenMP' if openmp else ', one thread'}"
    return None, f"the kernel did not build: {why}"
