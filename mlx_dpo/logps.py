"""Summed log-probabilities of response tokens: the one quantity every objective needs."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """``log p(target)`` per position, as ``logit[target] - logsumexp(logits)``.

    Gathering the target logit and subtracting the log-normaliser avoids
    materialising a full (B, L, V) log-softmax copy. Logits are upcast to
    float32 so half-precision models still get accurate sums.
    """
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return picked - mx.logsumexp(logits, axis=-1)


def get_batched_logps(
    model: nn.Module, tokens: mx.array, mask: mx.array
) -> tuple[mx.array, mx.array]:
    """One forward pass over all rows; returns per-row summed response log-probs and token counts.

    ``tokens`` is (N, L); ``mask`` is (N, L-1) and marks which *targets*
    (``tokens[:, 1:]``) belong to the response. For preference batches the rows
    are chosen then rejected, stacked, so both go through the model together.
    The mask is explicit because no token id can stand for padding: id 0 is a
    real token in many vocabularies and EOS padding must not hide the real EOS.
    """
    logits = model(tokens[:, :-1])
    logps = token_logps(logits, tokens[:, 1:])
    mask = mask.astype(mx.float32)
    return (logps * mask).sum(axis=-1), mask.sum(axis=-1)
