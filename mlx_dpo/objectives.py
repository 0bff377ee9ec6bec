"""Glue from a batch to a loss: log-probs of the policy (and reference), then a pure loss.

``make_loss`` returns ``loss_fn(model, batch) -> (loss, metrics)``, the one
function the trainer calls; it never needs to know which objective it runs.
``metrics`` holds batch means plus three bookkeeping entries the trainer sums
rather than averages: ``weight`` (what the means are over: pairs for DPO,
tokens for SFT), ``count`` (examples) and ``ntoks`` (real tokens
forwarded, prompt and response).
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .logps import get_batched_logps
from .losses import dpo_loss, sft_loss
from .reference import ReferenceFn

LossFn = Callable[[nn.Module, dict], tuple[mx.array, dict]]

SUMMED = ("weight", "count", "ntoks")


def _forwarded(batch: dict) -> mx.array:
    """Real (non-padding) tokens in the batch, prompt and response: the throughput unit."""
    return batch["lengths"].sum().astype(mx.float32)


def make_loss(
    loss_type: str,
    reference: Optional[ReferenceFn] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chunk_size: int = 0,
) -> LossFn:
    """The loss function for ``loss_type``; ``reference`` gives reference log-probs for DPO.

    A batch may carry precomputed ``reference_logps``; then no reference pass
    runs. ``chunk_size`` is passed to ``get_batched_logps``.
    """
    if loss_type == "sft":

        def sft(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
            logps, ntoks = get_batched_logps(model, batch["tokens"], batch["mask"], chunk_size)
            # Sum the token counts once and reuse it: two identical ``ntoks.sum()``
            # in one compiled value_and_grad crash MLX 0.32 (IndexError _Map_base::at).
            total = ntoks.sum()
            loss, metrics = sft_loss(logps, total)
            count = mx.array(logps.shape[0], mx.float32)
            return loss, {**metrics, "weight": total, "count": count, "ntoks": _forwarded(batch)}

        return sft
    if loss_type != "dpo":
        raise ValueError(f"unknown loss_type {loss_type!r}")

    def dpo(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
        tokens, mask = batch["tokens"], batch["mask"]
        logps, ntoks = get_batched_logps(model, tokens, mask, chunk_size)
        ref = batch.get("reference_logps")
        if ref is None:
            ref = reference(tokens, mask)
        b = logps.shape[0] // 2
        loss, metrics = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta, label_smoothing)
        pairs = mx.array(b, mx.float32)
        return loss, {**metrics, "weight": pairs, "count": pairs, "ntoks": _forwarded(batch)}

    return dpo
