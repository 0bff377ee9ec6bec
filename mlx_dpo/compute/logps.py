"""Summed log-probabilities of response tokens: the one quantity every objective needs."""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .fastops import exp_shifted

# Families (mlx-lm 0.32) whose logits are the head (``lm_head``, or the tied embedding) applied to
# the body's last hidden states, and what their forward does after the head: nothing, Gemma's
# soft-capping (``tanh(z / c) * c``) or Granite's division by ``logits_scaling``. Only these are
# split into body + head for chunked or packed log-probs (each checked in tests/compute/
# test_architectures.py); any other family computes full logits.
HEAD_OUTPUT = {
    **dict.fromkeys(("llama", "mistral", "ministral3", "qwen2", "qwen3", "qwen3_moe", "qwen3_next", "phi3", "olmo2",
                     "olmo3", "smollm3", "gemma3_text", "gpt_oss", "lfm2", "nemotron_h", "deepseek_v2", "deepseek_v3")),
    "gemma2": "softcap", "gemma4_text": "softcap", "granite": "scale", "granitemoehybrid": "scale",
}
BODY = {"nemotron_h": "backbone"}  # the body's attribute where it is not ``model``


@mx.custom_function
def logsumexp_parts(z: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """``(logsumexp(z), exp(z - max), max)`` over the last axis of float32 ``z``, from one pass of
    ``exp``. Only the logsumexp carries a gradient: its backward reuses the forward's
    exponentials (``softmax = e * exp(max - lse)``) where MLX's own would compute them again, and
    on a CPU ``exp`` is the slowest op of the vocabulary's log-softmax (BENCHMARKS.md). The other
    two outputs are for metrics (the entropy) under ``stop_gradient``. On a CPU the ``exp`` is
    ``fastops``' vectorised one."""
    top = z.max(axis=-1)
    e = exp_shifted(z, top)
    return top + mx.log(e.sum(axis=-1)), e, top


@logsumexp_parts.vjp
def _logsumexp_parts_vjp(primals, cotangents, outputs):
    lse, e, top = outputs
    return (e * (cotangents[0] * mx.exp(top - lse))[..., None],)


def token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """``log p(target)`` per position, as ``logit[target] - logsumexp(logits)``.

    Gathering the target logit and subtracting the log-normaliser avoids
    materialising a full (B, L, V) log-softmax copy. Logits are upcast to
    float32 so half-precision models still get accurate sums. On a CPU the log-normaliser is
    ``logsumexp_parts``'s, whose one pass of ``exp`` also serves the backward (MLX's
    ``logsumexp`` and its backward take two); it keeps that pass's (N, V) result alive until
    the backward. The policy's and the reference's log-probs both come from here (on a CPU,
    GRPO's with their entropy from the same ``logsumexp_parts``), so they agree to the last bit
    where their weights do.
    """
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    if mx.default_device() == mx.cpu:
        return picked - logsumexp_parts(logits)[0]
    return picked - mx.logsumexp(logits, axis=-1)


def token_logps_entropy(logits: mx.array, targets: mx.array, with_entropy: bool) -> tuple[mx.array, Optional[mx.array]]:
    """``token_logps`` and, when asked, each position's entropy (no gradient) from the same
    exponentials (``logsumexp_parts``, on any device: they stay alive for the backward)."""
    if not with_entropy:
        return token_logps(logits, targets), None
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    lse, e, top = logsumexp_parts(logits)
    return picked - lse, _entropy(logits, lse, e, top)


def _entropy(logits: mx.array, lse: mx.array, e: mx.array, top: mx.array) -> mx.array:
    """``-sum p log p = log sum(e) - sum(e (z - max)) / sum(e)``, with ``log sum(e) = lse - max``:
    both terms are small where the distribution is peaked, so float32 keeps its digits. No gradient."""
    shifted = lse - top
    return mx.stop_gradient(shifted - (e * (logits - top[..., None])).sum(axis=-1) / mx.exp(shifted))


def split_head(model: nn.Module) -> Optional[tuple[Callable, nn.Module]]:
    """``(body, head)`` with ``model(x) == head(body(x))``, or None where unknown.

    ``head`` is a module whose ``__call__`` maps hidden states to logits.
    """
    kind = getattr(model, "model_type", None)
    body = BODY.get(kind, "model")
    if kind not in HEAD_OUTPUT or body not in model:
        return None
    # mlx-lm builds ``lm_head`` only where the head is not tied to the embedding.
    base = model.lm_head if "lm_head" in model else _TiedHead(model[body].embed_tokens)
    output = HEAD_OUTPUT[kind]
    if output == "softcap" and getattr(model, "final_logit_softcapping", None):
        return model[body], _Head(base, softcap=float(model.final_logit_softcapping))
    if output == "scale":
        return model[body], _Head(base, scale=float(model.logits_scaling))
    return model[body], base


class _TiedHead(nn.Module):
    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding.as_linear(x)


class _Head(nn.Module):
    """A head followed by what the family's forward applies to the logits."""

    def __init__(self, base: nn.Module, softcap: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.base = base
        self._softcap, self._scale = softcap, scale

    def __call__(self, x: mx.array) -> mx.array:
        z = self.base(x)
        if self._softcap:
            z = mx.tanh(z / self._softcap) * self._softcap
        return z / self._scale if self._scale != 1.0 else z


def chunked_token_logps(hidden: mx.array, targets: mx.array, head: nn.Module, chunk_size: int) -> mx.array:
    """``token_logps(head(hidden), targets)`` computed ``chunk_size`` positions at a time.

    Each chunk's logits are recomputed in the backward pass (``mx.checkpoint``),
    so no (N, L, V) array is ever alive: for a 150k vocabulary that is the
    largest tensor of the whole step.
    """

    def chunk_fn(params, h, t):
        head.update(params)
        return token_logps(head(h), mx.stop_gradient(t))

    checkpointed = mx.checkpoint(chunk_fn)
    params = head.trainable_parameters()
    pieces = [
        checkpointed(params, hidden[:, i : i + chunk_size], targets[:, i : i + chunk_size])
        for i in range(0, hidden.shape[1], chunk_size)
    ]
    return mx.concatenate(pieces, axis=1)


def packed_logps(hidden: mx.array, targets: mx.array, mask: mx.array, head: nn.Module) -> tuple[mx.array, mx.array]:
    """Per-row summed log-probs of the masked targets, with only those positions projected.

    A padded batch's rows end at different lengths and start their responses at different
    positions; the vocabulary projection and log-softmax of every other position (padding,
    prompt) are work no log-prob needs. The masked positions are gathered into one (n, H) block
    first (the mask is read on the host: not inside a compiled step), then summed back per row.
    """
    rows, width = targets.shape
    keep = np.array(mask) > 0
    r, c = np.nonzero(keep)
    flat = mx.array((r * width + c).astype(np.int32))
    h = hidden.reshape(rows * width, -1)[flat]
    logps = token_logps(head(h), targets.reshape(-1)[flat])
    per_row = mx.array((r[None] == np.arange(rows)[:, None]).astype(np.float32))  # (rows, n)
    return per_row @ logps, mx.array(keep.sum(axis=-1).astype(np.float32))


def auto_chunk_size(vocab_size: int) -> int:
    """0 (no chunking) below 100k tokens of vocabulary; 128 positions above."""
    return 128 if vocab_size >= 100_000 else 0


def get_batched_logps(
    model: nn.Module, tokens: mx.array, mask: mx.array, chunk_size: int = 0, start: int = 0, pack_head: bool = False
) -> tuple[mx.array, mx.array]:
    """One forward pass over all rows; returns per-row summed response log-probs and token counts.

    ``tokens`` is (N, L); ``mask`` is (N, L-1) and marks which *targets*
    (``tokens[:, 1:]``) belong to the response. For preference batches the rows
    are chosen then rejected, stacked, so both go through the model together.
    The mask is explicit because no token id can stand for padding: id 0 is a
    real token in many vocabularies and EOS padding must not hide the real EOS.

    ``start`` (a Python int, no later than the first masked target of any row)
    skips the vocabulary projection for the prompt positions before it, which
    no response log-prob needs: with a 32k vocabulary that projection is about
    40% of a small model's forward pass. With ``chunk_size > 0`` the projection
    runs over that many positions at a time; see ``chunked_token_logps``. Both
    need a known architecture (``split_head``); otherwise full logits are used. ``pack_head``
    (outside compiled code, not with chunks) projects only the response positions: see
    ``packed_logps``.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    width = inputs.shape[1] - start
    chunked = 0 < chunk_size < width
    pack = pack_head and not chunked
    parts = split_head(model) if start > 0 or chunked or pack else None
    if parts is not None:
        body, head = parts
        hidden, targets, mask = body(inputs)[:, start:], targets[:, start:], mask[:, start:]
        if pack:
            return packed_logps(hidden, targets, mask, head)
        if chunked:
            logps = chunked_token_logps(hidden, targets, head, chunk_size)
        else:
            logps = token_logps(head(hidden), targets)
    else:
        logps = token_logps(model(inputs), targets)
    mask = mask.astype(mx.float32)
    return (logps * mask).sum(axis=-1), mask.sum(axis=-1)


class TemperedHead(nn.Module):
    """A head whose logits are divided by the sampling temperature."""

    def __init__(self, head: nn.Module, temperature: float):
        super().__init__()
        self.head, self.temperature = head, temperature

    def __call__(self, x: mx.array) -> mx.array:
        return self.head(x).astype(mx.float32) / self.temperature


def entropy_of(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return _entropy(logits, *logsumexp_parts(logits))


def get_token_logps(
    model: nn.Module,
    tokens: mx.array,
    start: int = 0,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 0,
) -> tuple[mx.array, Optional[mx.array]]:
    """Per-token log-probs of ``tokens[:, start + 1:]`` from logits divided by ``temperature``.

    Online objectives need each sampled token's log-prob under the distribution
    it was sampled from (TRL divides the logits by the sampling temperature),
    not a sum. Returns ``(logps, entropy)``, both (N, L - 1 - start); the
    entropy of each position's tempered distribution is a metric only (no
    gradient), computed when ``with_entropy``. ``chunk_size > 0`` projects onto
    the vocabulary that many positions at a time (``chunked_token_logps``), so
    no (N, L, V) array is alive: G completions x a 150k vocabulary need it.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1 + start :]
    width = inputs.shape[1] - start
    parts = split_head(model) if start > 0 or 0 < chunk_size < width else None
    if parts is not None and 0 < chunk_size < width:
        body, head = parts
        hidden = body(inputs)[:, start:]
        return tempered_logps_chunked(hidden, targets, head, temperature, with_entropy, chunk_size)
    if parts is not None:
        body, head = parts
        logits = head(body(inputs)[:, start:])
    else:
        logits = model(inputs)[:, start:]
    return tempered_logps(logits, targets, temperature, with_entropy)


def tempered_logps(
    logits: mx.array, targets: mx.array, temperature: float, with_entropy: bool
) -> tuple[mx.array, Optional[mx.array]]:
    """Per-token log-probs of ``targets`` under ``logits / temperature``, and (no gradient) the entropies."""
    logits = logits.astype(mx.float32)
    if temperature != 1.0:
        logits = logits / temperature
    return token_logps_entropy(logits, targets, with_entropy)


def tempered_logps_chunked(
    hidden: mx.array, targets: mx.array, head: nn.Module, temperature: float, with_entropy: bool, chunk_size: int
) -> tuple[mx.array, Optional[mx.array]]:
    """``tempered_logps(head(hidden), ...)``, projecting ``chunk_size`` positions at a time."""
    logps = chunked_token_logps(hidden, targets, TemperedHead(head, temperature), chunk_size)
    entropy = None
    if with_entropy:
        h = mx.stop_gradient(hidden)
        entropy = mx.concatenate(
            [entropy_of(head(h[:, i : i + chunk_size]) / temperature) for i in range(0, h.shape[1], chunk_size)], axis=1
        )
    return logps, entropy
