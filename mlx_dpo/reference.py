"""Reference log-probabilities, computed without a second copy of the weights where possible.

The default reference is the policy's own base weights: each LoRA/DoRA layer
is swapped for the layer it wraps for the duration of the reference pass. That
reproduces the base model exactly, for DoRA too (setting ``scale = 0`` would
not: DoRA's learned magnitude ``m`` still applies). Full fine-tuning changes
the base weights themselves, so there the reference is a separate frozen model.
With ``precompute_reference`` the reference runs once over the data and its
log-probs are cached on disk, so training needs one policy pass per step.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .batching import iterate_batches
from .checkpoint import atomic_save_safetensors
from .data import Dataset, as_dataset
from .prefix import sequence_logps
from .progress import Progress

ReferenceFn = Callable[[dict], mx.array]  # batch -> summed response log-probs per row


def _wrapped_base(module: nn.Module) -> Optional[nn.Module]:
    """The layer an mlx-lm adapter wraps (``.linear`` or ``.embedding``), else None."""
    if "lora_a" not in module:
        return None
    for name in ("linear", "embedding"):
        if name in module and isinstance(module[name], nn.Module):
            return module[name]
    return None


def has_adapters(model: nn.Module) -> bool:
    return any(_wrapped_base(m) is not None for _, m in model.named_modules())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily replace every adapter layer by the base layer it wraps."""
    adapters = [(n, m) for n, m in model.named_modules() if _wrapped_base(m) is not None]
    if adapters:
        model.update_modules(tree_unflatten([(n, _wrapped_base(m)) for n, m in adapters]))
    try:
        yield model
    finally:
        if adapters:
            model.update_modules(tree_unflatten(adapters))


def make_reference(model: nn.Module, reference_model: Optional[nn.Module] = None, chunk_size: int = 0) -> ReferenceFn:
    """Return ``fn(batch) -> summed response log-probs`` under the reference, no gradient (a
    shared-prefix batch runs its prompts once here too).

    ``reference_model`` (frozen) is used when given; otherwise the policy with
    its adapters bypassed, which requires the policy to have adapters.
    """
    if reference_model is not None:
        reference_model.freeze()

        def separate(batch: dict) -> mx.array:
            return mx.stop_gradient(sequence_logps(reference_model, batch, chunk_size)[0])

        return separate

    if not has_adapters(model):
        raise ValueError(
            "The default reference bypasses the LoRA/DoRA adapters, but the model has none "
            "(full fine-tuning?): set `reference_model`."
        )

    def bypass(batch: dict) -> mx.array:
        with adapters_disabled(model):
            return mx.stop_gradient(sequence_logps(model, batch, chunk_size)[0])

    return bypass


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


def compute_reference_logps(
    reference: ReferenceFn,
    examples: Sequence,
    batch_size: int,
    pad_id: int = 0,
    progress: Optional[Callable[[int], None]] = None,
    share_prefix: bool = False,
) -> np.ndarray:
    """(N, 2) reference log-probs of every example, in length-sorted batches (no example skipped)."""
    out = np.zeros((len(examples), len(examples[0]) if examples else 2), dtype=np.float32)
    batches = iterate_batches(examples, batch_size, pad_id=pad_id, shuffle=False, drop_last=False, share_prefix=share_prefix)
    for batch in batches:
        idx = np.array(batch["index"])
        logps = np.array(reference(batch))
        out[idx] = logps.reshape(-1, len(idx)).T
        if progress is not None:
            progress(len(idx))
    return out


def cached_reference(
    reference: ReferenceFn,
    examples: Sequence,
    cache_dir: Path,
    split: str,
    weights_fp: str,
    batch_size: int,
    pad_id: int = 0,
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
