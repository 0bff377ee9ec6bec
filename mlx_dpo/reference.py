"""Reference log-probabilities, computed without a second copy of the weights where possible.

The default reference is the policy's own base weights: each LoRA/DoRA layer
is swapped for the layer it wraps for the duration of the reference pass. That
reproduces the base model exactly, for DoRA too (setting ``scale = 0`` would
not: DoRA's learned magnitude ``m`` still applies). Full fine-tuning changes
the base weights themselves, so there the reference is a separate frozen model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .logps import get_batched_logps

ReferenceFn = Callable[[mx.array, mx.array], mx.array]


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


def make_reference(model: nn.Module, reference_model: Optional[nn.Module] = None) -> ReferenceFn:
    """Return ``fn(tokens, mask) -> summed response log-probs`` under the reference, no gradient.

    ``reference_model`` (frozen) is used when given; otherwise the policy with
    its adapters bypassed, which requires the policy to have adapters.
    """
    if reference_model is not None:
        reference_model.freeze()

        def separate(tokens: mx.array, mask: mx.array) -> mx.array:
            return mx.stop_gradient(get_batched_logps(reference_model, tokens, mask)[0])

        return separate

    if not has_adapters(model):
        raise ValueError(
            "The default reference bypasses the LoRA/DoRA adapters, but the model has none "
            "(full fine-tuning?): set `reference_model`."
        )

    def bypass(tokens: mx.array, mask: mx.array) -> mx.array:
        with adapters_disabled(model):
            return mx.stop_gradient(get_batched_logps(model, tokens, mask)[0])

    return bypass
