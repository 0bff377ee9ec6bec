"""mlx-dpo: preference fine-tuning (DPO and its family) for language models in MLX."""

import os as _os
import sys as _sys

from ._platform import blas as _blas

# Must happen before anything imports mlx: see _platform/blas.py.
_blas.preload()

# MLX orders each eval's work breadth-first only 20 arrays wide (MLX_BFS_MAX_WIDTH, read once).
# At that width a batch's two halves on two CPU streams (compute/streams.py) are queued one after
# the other and the streams take turns; breadth-first over the whole graph interleaves them. Set
# only where CPU streams can run (Linux without the CUDA build), only before mlx is imported, and
# not where the user opted out (MLX_DPO_WIDE_EVAL=off) or chose a width of their own.
WIDE_EVAL_ORDER = 1_000_000
_opted_out = _os.environ.get("MLX_DPO_WIDE_EVAL", "").strip().lower() in ("off", "0", "false", "no")
if "mlx.core" not in _sys.modules and _sys.platform.startswith("linux") and not _blas._has_cuda_backend() and not _opted_out:
    _os.environ.setdefault("MLX_BFS_MAX_WIDTH", str(WIDE_EVAL_ORDER))
    _width = _os.environ["MLX_BFS_MAX_WIDTH"].strip()
    wide_eval_order = _width.isdigit() and int(_width) >= WIDE_EVAL_ORDER
else:
    wide_eval_order = False

__version__ = "0.1.0"
