"""Reference log-probs computed once over a data split and kept on disk.

With ``precompute_reference`` the reference runs once over the data and its log-probs are
cached in ``adapter_path/reference_cache``, so training needs one policy pass per step. The
file name carries a hash of the reference weights and of the tokenized examples, so a changed
model, data file or tokenization setting never reuses stale values.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .._platform.files import atomic_save_safetensors
from .._platform.progress import Progress
from ..compute.reference import ReferenceFn, adapters_disabled, compute_reference_logps
from ..data import Dataset, as_dataset


def weights_fingerprint(model: nn.Module) -> str:
    """A content hash of the reference weights (adapters bypassed): names, shapes, dtypes, sampled values.

    Sampling a strided subset of every tensor keeps this cheap for a 7B model
    while any real change of the weights (another checkpoint, a fine-tune,
    a different quantization) changes the hash.
    """
    h = hashlib.sha256()
    with adapters_disabled(model):
        params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
        for name, a in params:
            flat = a.reshape(-1)
            step = max(1, flat.size // 4096)
            sample = flat[::step]
            if mx.issubdtype(sample.dtype, mx.floating):
                sample = sample.astype(mx.float32)
            h.update(f"{name}:{a.shape}:{a.dtype}".encode())
            h.update(np.array(sample).tobytes())
    return h.hexdigest()


def examples_fingerprint(examples: Sequence) -> str:
    """A hash of the tokenized examples: covers the data files and every tokenization setting."""
    h = hashlib.sha256()
    for ex in examples:
        for toks, start in ex:
            h.update(np.asarray(toks, dtype=np.int64).tobytes())
            h.update(f"|{start};".encode())
    return h.hexdigest()


def cached_reference(
    reference: ReferenceFn,
    examples: Sequence,
    cache_dir: Path,
    split: str,
    weights_fp: str,
    batch_size: int,
    pad_id: int = 0,
    *,
    show_progress: bool = True,
    share_prefix: bool = False,
) -> Dataset:
    """Load this split's reference log-probs from ``cache_dir`` or compute and save them.

    The file name carries a hash of the reference weights and of the tokenized
    examples, so a changed model, data file or tokenization setting never
    reuses stale values.
    """
    key = hashlib.sha256(f"{weights_fp}:{examples_fingerprint(examples)}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{split}-{key}.safetensors"
    if path.is_file():
        print(f"Reference log-probs for {split}: reusing {path}")
        return as_dataset(examples).with_fields(reference_logps=np.array(mx.load(str(path))["reference_logps"]))
    rank0 = mx.distributed.init().rank() == 0
    with Progress(len(examples), f"Reference log-probs ({split})", unit="ex", enabled=show_progress and rank0) as bar:
        values = compute_reference_logps(reference, examples, batch_size, pad_id, bar.update, share_prefix)
    if rank0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(path, {"reference_logps": mx.array(values)})
        print(f"Reference log-probs for {split}: saved {path}")
    return as_dataset(examples).with_fields(reference_logps=values)
