"""Load an optimised BLAS into the process before MLX resolves ``cblas_sgemm``.

The Linux ``mlx[cpu]`` wheel links the netlib reference BLAS (about 5 GFLOP/s
for float32 GEMM). MLX looks its BLAS symbols up in the global scope, so an
OpenBLAS loaded with ``RTLD_GLOBAL`` *before* the first ``import mlx`` wins and
float32 matmuls run 10-20x faster. After ``import mlx`` it is too late, which is
why this runs from the package's ``__init__``.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import os
import sys

ENV = "MLX_DPO_BLAS"
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread   (Fedora: dnf install openblas)"

CANDIDATES = (
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

# What happened, for the start-up line: (kind, detail), kind in
# {"loaded", "off", "not-linux", "gpu", "missing", "failed", "too-late"}.
status: tuple[str, str] = ("not-run", "")


def _has_cuda_backend() -> bool:
    try:
        return any(
            (d.metadata["Name"] or "").lower().startswith("mlx-cuda")
            for d in importlib.metadata.distributions()
        )
    except Exception:  # a broken metadata entry must not stop the import
        return False


def _find() -> str | None:
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    for pattern in ("/usr/lib*/**/libopenblas*.so*", "/usr/local/lib*/**/libopenblas*.so*"):
        hits = sorted(glob.glob(pattern, recursive=True))
        if hits:
            return hits[0]
    return None


def preload() -> tuple[str, str]:
    """Load the BLAS named by ``MLX_DPO_BLAS`` (or the system OpenBLAS) globally."""
    global status
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
        path = choice or _find()
        if path is None:
            status = ("missing", "")
        else:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                status = ("loaded", path)
            except OSError as e:
                status = ("failed", f"{path}: {e}")
    return status


def describe() -> str | None:
    """One start-up line about the BLAS in use, or None where there is nothing to say."""
    kind, detail = status
    if kind == "loaded":
        return f"[INFO] Fast BLAS for float32 matmuls on the CPU: {detail}"
    if kind == "off":
        return f"[INFO] BLAS preloading disabled ({detail}): float32 matmuls use MLX's bundled BLAS."
    if kind in ("missing", "failed", "too-late"):
        why = {
            "missing": "no optimised BLAS found",
            "failed": f"loading failed ({detail})",
            "too-late": detail,
        }[kind]
        return (
            f"[WARNING] CPU training will be ~10x slower: {why}, so MLX uses its slow "
            f"reference BLAS. Install OpenBLAS ({INSTALL_HINT}) or point {ENV} at a "
            "libopenblas.so."
        )
    return None
