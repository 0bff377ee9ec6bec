"""mlx-dpo: preference fine-tuning (DPO and its family) for language models in MLX."""

from . import _blas

# Must happen before anything imports mlx: see _blas.py.
_blas.preload()

__version__ = "0.1.0"
