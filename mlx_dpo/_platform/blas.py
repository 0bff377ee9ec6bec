"""Load a fast BLAS into the process before MLX resolves ``cblas_sgemm``.

The Linux ``mlx[cpu]`` wheel links the netlib reference BLAS, unvectorised and
single-threaded. MLX looks its BLAS symbols up in the global scope, so a BLAS
loaded with ``RTLD_GLOBAL`` *before* the first ``import mlx`` wins and float32
matmuls run an order of magnitude faster (BENCHMARKS.md has the figures). After
``import mlx`` it is too late, which is why this runs from the package's ``__init__``.

Where it looks, in order, each step bounded (no walk of system folders):

1. ``MLX_DPO_BLAS``: ``off``, a route name (``system``, ``wheel``, ``mkl``) or
   the path of a BLAS library.
2. ``system``: the distribution's OpenBLAS, at its usual paths or in the
   dynamic linker's cache (``ldconfig -p``).
3. ``wheel``: an OpenBLAS from a wheel ``pip install`` brought, no root needed
   (``WHEELS``): ``ngsolve-openblas`` on x86-64, built for every x86-64 CPU
   (DYNAMIC_ARCH); ``cmeel-openblas`` on aarch64, built for one CPU family and
   so loaded only where this CPU has the instructions that build uses. Their
   libgfortran comes from the ``mlx[cpu]`` wheel (see ``elf.py``).
4. ``mkl``: Intel MKL from the ``mkl`` wheel (``pip install mkl``), x86-64 only.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import mmap
import os
import re
import stat
import subprocess
import sys
import tempfile
from typing import NamedTuple, Optional

from . import elf

ENV = "MLX_DPO_BLAS"
ROUTES = ("system", "wheel", "mkl")
SYSTEM_HINT = "sudo apt-get install libopenblas0-pthread"
ROOTLESS_HINT = "pip install ngsolve-openblas"  # x86-64; on aarch64: pip install cmeel-openblas

SYSTEM_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
    "/opt/OpenBLAS/lib/libopenblas.so.0",
)

# The CPU flags (x86: /proc/cpuinfo "flags"; Arm: "Features") that code built
# for an OpenBLAS TARGET may use. A target not listed here is not loaded.
_AVX512 = ("avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
TARGET_NEEDS: dict[str, tuple[str, ...]] = {
    "SAPPHIRERAPIDS": _AVX512 + ("avx512_bf16", "avx512_fp16"),
    "COOPERLAKE": _AVX512 + ("avx512_bf16",),
    "SKYLAKEX": _AVX512,
    "ZEN": ("avx2", "fma"),
    "HASWELL": ("avx2", "fma"),
    "SANDYBRIDGE": ("avx",),
    "NEHALEM": ("sse4_2",),
    "NEOVERSEV2": ("sve", "sve2"),
    "NEOVERSEN2": ("sve", "sve2"),
    "NEOVERSEV1": ("sve",),
    "NEOVERSEN1": ("asimd",),
    "CORTEXA72": ("asimd",),
    "CORTEXA57": ("asimd",),
    "ARMV8": ("asimd",),
}


class Found(NamedTuple):
    """A BLAS to load: ``preload`` first (its own dependencies), then ``path``."""

    route: str
    path: str
    preload: tuple[str, ...] = ()
    lazy: bool = False  # MKL's libraries refer to each other: resolve on first call


# What happened, for the start-up line: (kind, detail), kind in {"loaded", "off",
# "not-linux", "gpu", "missing", "failed", "too-late"}; "missing" carries why
# each route was passed over.
status: tuple[str, str] = ("not-run", "")
_library: Optional[ctypes.CDLL] = None  # the BLAS loaded by ``preload``


def _has_cuda_backend() -> bool:
    """Whether the CUDA build of MLX is installed (then the BLAS is not ours to pick)."""
    for entry in sys.path:
        if entry and glob.glob(os.path.join(glob.escape(entry), "mlx_cuda*.dist-info")):
            return True
    return False


def _ldconfig(name: str) -> Optional[str]:
    """The path the dynamic linker's cache gives for ``name`` on this machine's ABI."""
    abi = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(os.uname().machine, "")
    for exe in ("/sbin/ldconfig", "/usr/sbin/ldconfig"):
        if not os.path.exists(exe):
            continue
        try:
            out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=3).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            lib, _, path = line.strip().partition(" => ")
            if lib.startswith(name + " ") and abi in lib and os.path.exists(path):
                return path
        return None
    return None


def system_openblas() -> tuple[Optional[Found], str]:
    for path in SYSTEM_PATHS:
        if os.path.exists(path):
            return Found("system", path), ""
    path = _ldconfig("libopenblas.so.0")
    return (Found("system", path), "") if path else (None, "no system OpenBLAS")


def _in_sys_path(*parts: str) -> Optional[str]:
    for entry in sys.path:
        path = os.path.join(entry or ".", *parts)
        if os.path.exists(path):
            return path
    return None


def openblas_target(path: str) -> Optional[str]:
    """The CPU target an OpenBLAS was built for, ``DYNAMIC_ARCH`` for a portable build.

    Read from the library's configuration string (``OpenBLAS 0.3.31 NO_AFFINITY
    SKYLAKEX``) without loading it: code built for a newer CPU could crash on load.
    """
    if os.path.getsize(path) == 0:  # mmap refuses an empty file
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _target_in(data)


def _target_in(data) -> Optional[str]:
    """``openblas_target`` of the library's bytes, mapped rather than read (17 MB, at every import)."""
    config = re.search(rb"OpenBLAS \d+\.\d+\.\d+ ([A-Z0-9_ =]*)", data)
    if config is None:
        return None
    words = config.group(1).decode().split()
    if "DYNAMIC_ARCH" in words:
        return "DYNAMIC_ARCH"
    # The linker may have merged the core name's string with another, so the
    # configuration string can end in a prefix of it ("SKYL"): match the full
    # name, which stands alone elsewhere in the file.
    last = words[-1] if words else ""
    for target in TARGET_NEEDS:
        if target.startswith(last) and data.find(b"\0" + target.encode() + b"\0") != -1:
            return target
    return last or None


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags, from ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def private_folder(path: str) -> bool:
    """Whether ``path`` is (made, if missing, as) a real folder of this user's that no one else can
    write to: a library kept there cannot have been planted by another local user."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def cache_dir(kind: str = "blas") -> str:
    """This user's private, writable cache folder for ``kind`` (``$XDG_CACHE_HOME/mlx_dpo/<kind>``,
    else one in the temporary folder)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for folder in (os.path.join(base, "mlx_dpo", kind), os.path.join(tempfile.gettempdir(), f"mlx_dpo-{kind}-{os.getuid()}")):
        if private_folder(folder) and os.access(folder, os.W_OK):
            return folder
    raise OSError("no private cache folder (one owned by this user that others cannot write to)")


def cached_copy(folder: str, name: str, data: bytes) -> str:
    """``folder/<digest>/name`` holding exactly ``data``: reused only where its bytes hash the same,
    else written to a fresh temporary name and renamed into place."""
    digest = hashlib.sha256(data).hexdigest()
    sub = os.path.join(folder, digest[:16])
    if not private_folder(sub):
        raise OSError(f"{sub} is not a private folder")
    path = os.path.join(sub, name)
    try:
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == digest:
                return path
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=sub, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _gfortran() -> tuple[tuple[str, ...], str]:
    """Libraries to preload so that ``libgfortran.so.5`` resolves, or why it cannot.

    The mlx[cpu] wheel's copy comes first, so every machine takes the same path
    whether or not the system has a libgfortran.
    """
    libs = _in_sys_path("mlx_cpu.libs")
    found = sorted(glob.glob(os.path.join(glob.escape(libs), "libgfortran*.so*"))) if libs else []
    if not found:
        system = _ldconfig("libgfortran.so.5")
        return ((system,), "") if system else ((), "no libgfortran.so.5 (neither the mlx[cpu] wheel's nor the system's)")
    with open(found[0], "rb") as f:
        dst = cached_copy(cache_dir(), "libgfortran.so.5", elf.with_soname(f.read(), "libgfortran.so.5"))
    quadmath = sorted(glob.glob(os.path.join(glob.escape(libs), "libquadmath*.so*")))
    return (*quadmath, dst), ""


# OpenBLAS builds that pip installs without root, tried in order: cmeel-openblas is built for one
# CPU family (aarch64's dependency), ngsolve-openblas for every x86-64 CPU (DYNAMIC_ARCH: it picks
# its kernels at load time, so an AVX2-only machine gets AVX2 kernels; x86-64's dependency).
WHEELS = (("cmeel-openblas", ("cmeel.prefix", "lib", "libopenblas.so.0")),
          ("ngsolve-openblas", ("ngsolve_openblas", "libopenblas*.so*")))


def wheel_openblas() -> tuple[Optional[Found], str]:
    """The first OpenBLAS wheel (``WHEELS``) that is installed and fits this CPU."""
    why = []
    for name, parts in WHEELS:
        found, reason = _wheel(name, parts)
        if found is not None:
            return found, ""
        why.append(reason)
    return None, "; ".join(why)


def _wheel(name: str, parts: tuple[str, ...]) -> tuple[Optional[Found], str]:
    folder = _in_sys_path(*parts[:-1])
    paths = sorted(glob.glob(os.path.join(glob.escape(folder), parts[-1]))) if folder else []
    if not paths:
        return None, f"{name} not installed"
    path, target = paths[0], openblas_target(paths[0])
    if target != "DYNAMIC_ARCH":
        needs = TARGET_NEEDS.get(target or "")
        if needs is None:
            return None, f"{name} is built for an unknown CPU target ({target})"
        lacking = [flag for flag in needs if flag not in cpu_flags()]
        if lacking:
            return None, f"{name} is built for {target} and this CPU lacks {', '.join(lacking)}"
    try:
        preload, why = _gfortran()
    except (OSError, ValueError) as e:
        return None, f"{name}: could not prepare libgfortran ({e})"
    return (Found("wheel", path, preload), "") if preload else (None, f"{name}: {why}")


def mkl() -> tuple[Optional[Found], str]:
    if os.uname().machine != "x86_64":
        return None, "MKL is x86-64 only"
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        core = sorted(glob.glob(os.path.join(glob.escape(prefix), "lib", "libmkl_core.so.*")))
        if core:
            lib = os.path.dirname(core[-1])
            version = core[-1].rsplit(".so.", 1)[1]
            names = ["core", "sequential", "def", "mc3", "avx2", "avx512", "avx10", "intel_lp64"]
            paths = [os.path.join(lib, f"libmkl_{n}.so.{version}") for n in names]
            paths = [p for p in paths if os.path.exists(p)]
            return Found("mkl", paths[-1], tuple(paths[:-1]), lazy=True), ""
    return None, "MKL not installed"


FINDERS = {"system": system_openblas, "wheel": wheel_openblas, "mkl": mkl}


def find(choice: str = "") -> tuple[Optional[Found], list[str]]:
    """The BLAS to load (``choice``: a route name, a path, or empty for the first that fits)."""
    if choice and choice not in FINDERS:
        return Found("path", choice), []
    why = []
    for route in [choice] if choice else ROUTES:
        found, reason = FINDERS[route]()
        if found:
            return found, why
        why.append(reason)
    return None, why


def preload() -> tuple[str, str]:
    """Load the BLAS that ``MLX_DPO_BLAS`` names (or the first route that fits) globally."""
    global status, _library
    choice = os.environ.get(ENV, "").strip()
    if choice.lower() in ("off", "0", "none", "false"):
        status = ("off", f"{ENV}=off")
    elif not sys.platform.startswith("linux"):
        status = ("not-linux", sys.platform)
    elif "mlx.core" in sys.modules:
        status = ("too-late", "mlx was imported before mlx_dpo")
    elif _has_cuda_backend() and not choice:
        status = ("gpu", "CUDA backend installed")
    else:
        found, why = find(choice)
        if found is None:
            status = ("missing", "; ".join(why))
        else:
            mode = ctypes.RTLD_GLOBAL | (os.RTLD_LAZY if found.lazy else 0)
            try:
                for path in (*found.preload, found.path):
                    _library = ctypes.CDLL(path, mode=mode)
                status = ("loaded", f"{found.path} ({found.route})")
            except OSError as e:
                status = ("failed", f"{found.path}: {e}")
    return status


# Thread-count setters and getters of the BLAS libraries ``preload`` loads.
_THREAD_CALLS = (("openblas_set_num_threads", "openblas_get_num_threads"), ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"))


# The variables a user sets to size each library's thread pool, in the order the library reads them.
THREAD_VARIABLES = {"openblas": ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"),
                    "mkl": ("MKL_NUM_THREADS", "OMP_NUM_THREADS")}


def user_threads() -> Optional[int]:
    """The thread count the user set for the loaded BLAS in its environment variables, or None."""
    if _library is None:
        return None
    kind = "mkl" if hasattr(_library, "MKL_Set_Num_Threads") else "openblas"
    for name in THREAD_VARIABLES[kind]:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def get_threads() -> Optional[int]:
    """The loaded BLAS's thread count, or None (no loaded BLAS, or one that does not say)."""
    if _library is None:
        return None
    for _, getter in _THREAD_CALLS:
        if hasattr(_library, getter):
            return int(getattr(_library, getter)())
    return None


def set_threads(n: int) -> Optional[int]:
    """Give the loaded BLAS ``n`` threads; returns the count it reports after, or None (no loaded BLAS).

    Two CPU streams each calling a BLAS that spins up both cores would fight over
    them, so ``compute/streams.py`` gives each stream's GEMMs a share of the threads. The bundled reference
    BLAS is single-threaded already.
    """
    if _library is None:
        return None
    for setter, getter in _THREAD_CALLS:
        if hasattr(_library, setter):
            getattr(_library, setter)(ctypes.c_int(n))
            return int(getattr(_library, getter)())
    return None


def describe() -> Optional[str]:
    """One start-up line about the BLAS in use, or None where there is nothing to say."""
    kind, detail = status
    if kind == "loaded":
        return f"[INFO] Fast BLAS for float32 matmuls on the CPU: {detail}"
    if kind == "off":
        return f"[INFO] BLAS preloading disabled ({detail}): float32 matmuls use MLX's bundled BLAS."
    if kind in ("missing", "failed", "too-late"):
        why = {"missing": f"no fast BLAS for this CPU ({detail})", "failed": f"loading failed ({detail})", "too-late": detail}[kind]
        return (
            f"[WARNING] CPU training runs several times slower than it could: {why}, so MLX uses its reference BLAS. "
            f"Fix (float32 matmuls about 30x faster): `{SYSTEM_HINT}`, or without root `{ROOTLESS_HINT}` (x86-64; "
            f"`pip install cmeel-openblas` on aarch64) or `pip install mkl`, or point {ENV} at a BLAS library."
        )
    return None
