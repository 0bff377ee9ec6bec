"""Reference log-probabilities, computed without a second copy of the weights where possible.

The default reference is the policy's own base weights: each LoRA/DoRA layer
is swapped for the layer it wraps for the duration of the reference pass. That
reproduces the base model exactly, for DoRA too (setting ``scale = 0`` would
not: DoRA's learned magnitude ``m`` still applies). Full fine-tuning changes
the base weights themselves, so there the reference is a separate frozen model.
Reference log-probs come summed per row (the paired and KTO objectives) or per token
(GRPO's KL term, loss terms); ``objectives/reference_cache.py`` keeps summed ones on disk.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from .batching import iterate_batches
from .forward import PLAIN, Forward, sequence_logps, sequence_token_logps

ReferenceFn = Callable[[dict], mx.array]  # batch -> summed response log-probs per row
TokenReferenceFn = Callable[[dict], mx.array]  # batch -> per-token log-probs, aligned with its response mask


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
def modules_replaced(model: nn.Module, replacements: list[tuple[str, nn.Module]]) -> Iterator[nn.Module]:
    """Inside the block, each module named in ``replacements`` is the one given there; the very
    modules it stood in for are back afterwards."""
    modules = dict(model.named_modules()) if replacements else {}
    originals = [(name, modules[name]) for name, _ in replacements]
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    try:
        yield model
    finally:
        if replacements:
            model.update_modules(tree_unflatten(originals))


def adapters_disabled(model: nn.Module) -> ContextManager[nn.Module]:
    """Temporarily replace every adapter layer by the base layer it wraps."""
    return modules_replaced(model, [(n, _wrapped_base(m)) for n, m in model.named_modules() if _wrapped_base(m) is not None])


def _mergeable(module: nn.Module) -> bool:
    """An adapter over a full-precision linear layer (merging into a quantized one would
    re-quantize the sum and lose most of the adapter)."""
    return isinstance(_wrapped_base(module), nn.Linear) and callable(getattr(module, "fuse", None))


def adapters_merged(model: nn.Module) -> ContextManager[nn.Module]:
    """Inside the block, every LoRA/DoRA layer over a full-precision linear layer is replaced by one
    linear layer holding the merged weight (mlx-lm's ``fuse``): one matmul instead of three, the
    same function up to float rounding. The merged weights are extra memory while the block runs;
    the adapter layers themselves (and so the optimizer's view) come back unchanged afterwards."""
    merged = [(n, m.fuse()) for n, m in model.named_modules() if _mergeable(m)]
    mx.eval([m.parameters() for _, m in merged])
    return modules_replaced(model, merged)


def make_reference(model: nn.Module, reference_model: Optional[nn.Module] = None, how: Forward = PLAIN) -> ReferenceFn:
    """Return ``fn(batch) -> summed response log-probs`` under the reference, no gradient (a
    shared-prefix batch runs its prompts once here too).

    ``reference_model`` (frozen) is used when given; otherwise the policy with
    its adapters bypassed, which requires the policy to have adapters.
    """
    if reference_model is not None:
        reference_model.freeze()

        def separate(batch: dict) -> mx.array:
            return mx.stop_gradient(sequence_logps(reference_model, batch, how)[0])

        return separate

    if not has_adapters(model):
        raise ValueError(
            "The default reference bypasses the LoRA/DoRA adapters, but the model has none "
            "(full fine-tuning?): set `reference_model`."
        )

    def bypass(batch: dict) -> mx.array:
        with adapters_disabled(model):
            return mx.stop_gradient(sequence_logps(model, batch, how)[0])

    return bypass


def token_reference(
    model: nn.Module, reference_model: Optional[nn.Module], temperature: float = 1.0, how: Forward = PLAIN
) -> TokenReferenceFn:
    """Reference per-token log-probs (no gradient) under ``logits / temperature``: the separate
    model, or the policy with its adapters bypassed."""

    def fn(batch: dict) -> mx.array:
        if reference_model is not None:
            return mx.stop_gradient(sequence_token_logps(reference_model, batch, how, temperature)[0])
        with adapters_disabled(model):
            return mx.stop_gradient(sequence_token_logps(model, batch, how, temperature)[0])

    return fn


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
