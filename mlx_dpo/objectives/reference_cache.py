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
    """A digest of everything of the reference that sets its log-probs: its configuration as the
    model reads it (``model.args``: RoPE, norms, vocabulary, ...) and every byte of every weight
    (adapters bypassed), with names, shapes and dtypes. BLAKE2b reads about 1 GB/s here, so a 7B
    model costs seconds, once per run that precomputes."""
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{type(model).__module__}.{type(model).__name__}:{getattr(model, 'args', None)!r}".encode())
    with adapters_disabled(model):
        for name, a in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
            h.update(f"{name}:{a.shape}:{a.dtype}".encode())
            raw = a.view(mx.uint8 if a.dtype.size == 1 else mx.uint16 if a.dtype.size == 2 else mx.uint32 if a.dtype.size == 4 else mx.uint64)
            h.update(memoryview(np.ascontiguousarray(np.array(raw))))
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

    The file name carries a digest of the reference (``weights_fingerprint``), of the tokenized
    examples (the data, the tokenizer and every tokenization setting) and of how they are batched
    (``share_prefix``), so none of these can change and still reuse stale values.
    """
    parts = f"{weights_fp}:{examples_fingerprint(examples)}:share_prefix={bool(share_prefix)}"
    key = hashlib.sha256(parts.encode()).hexdigest()[:20]
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
