"""The prompt computed once: shared-prefix forward passes for pairs, unpaired KTO rows and GRPO groups.

Every sequence of a pair (chosen, rejected), of a KTO example (its completion and the mismatched
one of the KL baseline) or of a GRPO group (G completions) starts with the same prompt. Instead of
running that prompt through the model once per sequence, the prompt's first ``P - 1`` tokens run
once into a key/value cache, and each sequence runs only ``[last prompt token; response[:-1]]`` as a
continuation from that cache, at positions ``P - 1, P, ...``: the same logits at every response
position, so the same log-probs, losses and gradients (the cache is an ordinary MLX array, so the
gradient reaches the prompt positions' adapters through the keys and values).

Prompts of different lengths share one prefix pass: they are right-padded, and a continuation
attends to its own prompt's real positions only (a per-row mask); its rotary positions start at
its own prompt length (a per-row cache offset). Nothing attends to padding, and no query is ever
left without a key, so no NaN can arise in padded rows. A recurrent layer (gated delta,
convolution, Mamba: an ``ArraysCache`` in mlx-lm) is told each prompt's length, so its state and
convolution window stop at the prompt's last real token (mlx-lm's right-padding support), and each
continuation row starts from its prompt's state.

A batch that can share carries the fields of ``shared_prefix_fields`` instead of ``tokens`` and
``mask``; ``forward.sequence_logps`` and ``forward.sequence_token_logps`` take this path for it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import ArraysCache

from .logps import (
    chunked_token_logps,
    packed_logps,
    split_head,
    tempered_logps,
    tempered_logps_chunked,
    token_logps,
)

ROW_KEYS = ("suffix_tokens", "suffix_targets", "suffix_mask")  # one row per sequence, aligned
MIN_PROMPT = 2  # a continuation starts at the last prompt token, so the cached part needs >= 1 token


def shared_prefix_fields(
    seqs: Sequence[tuple[Sequence[int], int]], rows: Sequence[int], pad_id: int = 0, pad_multiple: int = 1
) -> Optional[dict[str, np.ndarray]]:
    """The shared-prefix form of a batch, or None where its sequences do not share their prompts.

    ``seqs[i]`` is ``(tokens, start)`` with the response at ``tokens[start:]``; ``rows[i]`` is the
    prompt (prefix row) it belongs to. Every sequence of one prompt must carry the same
    ``tokens[:start]``, with ``start >= 2``. Returns numpy arrays: ``prefix_tokens`` (P, Wp, the
    prompts without their last token, right-padded), ``prefix_lengths`` (P,), ``suffix_tokens`` /
    ``suffix_targets`` / ``suffix_mask`` (N, Ws: inputs ``tokens[start-1:-1]``, targets
    ``tokens[start:]``, 1 on real targets) and ``suffix_rows`` (N,).
    """
    prompts: dict[int, Sequence[int]] = {}
    for (toks, start), r in zip(seqs, rows):
        if start < MIN_PROMPT or start >= len(toks):
            return None
        head = list(toks[: start])
        if prompts.setdefault(r, head) != head:
            return None
    if sorted(prompts) != list(range(len(prompts))):
        return None
    lengths = np.array([len(prompts[r]) - 1 for r in range(len(prompts))], dtype=np.int32)

    def width(n: int) -> int:
        return -(-n // pad_multiple) * pad_multiple

    prefix = np.full((len(prompts), width(int(lengths.max()))), pad_id, dtype=np.int32)
    for r, n in enumerate(lengths):
        prefix[r, :n] = prompts[r][:n]
    ws = width(max(len(toks) - start for toks, start in seqs))
    inputs = np.full((len(seqs), ws), pad_id, dtype=np.int32)
    targets = np.full((len(seqs), ws), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), ws), dtype=np.float32)
    for i, (toks, start) in enumerate(seqs):
        n = len(toks) - start
        inputs[i, :n] = toks[start - 1 : -1]
        targets[i, :n] = toks[start:]
        mask[i, :n] = 1.0
    return {
        "prefix_tokens": prefix,
        "prefix_lengths": lengths,
        "suffix_tokens": inputs,
        "suffix_targets": targets,
        "suffix_mask": mask,
        "suffix_rows": np.asarray(rows, dtype=np.int32),
    }


def with_shared_prefix(batch: dict, fields: dict[str, np.ndarray]) -> dict:
    """``batch`` in its shared form: the shared fields in, the whole-sequence tokens, mask and
    ``logits_from`` out (unused, they would only add shapes the compiled step is traced for)."""
    kept = {k: v for k, v in batch.items() if k not in ("tokens", "mask", "logits_from")}
    return {**kept, **{k: mx.array(v) for k, v in fields.items()}}


def is_shared(batch: dict) -> bool:
    return "prefix_tokens" in batch


class PrefixCache:
    """One layer's cache: the prompts' keys and values, then each continuation row's view of them.

    Implements what mlx-lm attention layers use (``offset``, ``update_and_fetch``, ``make_mask``).
    The first call stores the prefix pass's keys (plain causal attention from position 0);
    ``branch`` then gives every continuation row its prompt's keys, its own rotary offset and a
    mask hiding the prompt's padding. Stored arrays are never written in place, so the gradient
    flows back into the prefix pass.
    """

    def __init__(self) -> None:
        self.keys = self.values = None
        self.offset = 0
        self.prefix_valid: Optional[mx.array] = None

    def branch(self, rows: mx.array, lengths: mx.array) -> None:
        self.keys, self.values = self.keys[rows], self.values[rows]
        self.offset = lengths[rows]
        self.prefix_valid = mx.arange(self.keys.shape[2])[None] < self.offset[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.prefix_valid is None:  # the prefix pass
            self.keys, self.values = keys, values
            return keys, values
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None, **_):
        q = mx.arange(N)
        causal = q[:, None] >= q[None]
        if window_size is not None:
            causal = causal & (q[:, None] - q[None] < window_size)
        if self.prefix_valid is None:
            return causal if (return_array or window_size is not None) else "causal"
        rows, wp = self.prefix_valid.shape
        prefix = self.prefix_valid[:, None, None, :]  # (R, 1, 1, Wp)
        if window_size is not None:
            query_pos = self.offset[:, None] + q[None]  # (R, N)
            prefix = prefix & (query_pos[:, None, :, None] - mx.arange(wp) < window_size)
        prefix = mx.broadcast_to(prefix, (rows, 1, N, wp))
        return mx.concatenate([prefix, mx.broadcast_to(causal, (rows, 1, N, N))], axis=-1)


class PrefixState(ArraysCache):
    """A recurrent layer's cache: the prefix pass stops each row's state at its prompt's length
    (``lengths``, which mlx-lm's recurrent layers honour), then ``branch`` gives every continuation
    row its prompt's state and runs it unpadded (a continuation's own padding comes after it)."""

    def branch(self, rows: mx.array, lengths: mx.array) -> None:
        self.cache = [c[rows] if c is not None else None for c in self.cache]
        self.lengths = None


def prefix_caches(model: nn.Module, lengths: mx.array) -> list:
    """One cache per entry of the model's own cache list: ``PrefixState`` where mlx-lm keeps a
    recurrent state, ``PrefixCache`` (keys and values) elsewhere."""
    make = getattr(model, "make_cache", None)
    kinds = make() if callable(make) else [None] * len(model.layers)
    caches = []
    for kind in kinds:
        if isinstance(kind, ArraysCache):
            state = PrefixState(len(kind.cache))
            state.lengths = lengths + 0  # its own array: mlx-lm's layers count it down in place
            caches.append(state)
        else:
            caches.append(PrefixCache())
    return caches


def _suffix_states(model: nn.Module, batch: dict, use_body: bool) -> mx.array:
    """The continuation rows' final hidden states (``use_body``) or logits, after one prefix pass."""
    forward = split_head(model)[0] if use_body else model
    caches = prefix_caches(model, batch["prefix_lengths"])
    forward(batch["prefix_tokens"], cache=caches)  # only the caches are used (lazy graph)
    for c in caches:
        c.branch(batch["suffix_rows"], batch["prefix_lengths"])
    return forward(batch["suffix_tokens"], cache=caches)


def shared_logps(model: nn.Module, batch: dict, chunk_size: int = 0, pack_head: bool = False) -> tuple[mx.array, mx.array]:
    """``get_batched_logps`` for a shared-prefix batch: per-row summed response log-probs, token counts."""
    targets, mask = batch["suffix_targets"], batch["suffix_mask"].astype(mx.float32)
    chunked = 0 < chunk_size < targets.shape[1]
    pack = pack_head and not chunked
    parts = split_head(model) if chunked or pack else None
    if parts is not None and pack:
        return packed_logps(_suffix_states(model, batch, True), targets, mask, parts[1])
    if parts is not None:
        logps = chunked_token_logps(_suffix_states(model, batch, True), targets, parts[1], chunk_size)
    else:
        logps = token_logps(_suffix_states(model, batch, False), targets)
    return (logps * mask).sum(axis=-1), mask.sum(axis=-1)


def shared_token_logps(
    model: nn.Module, batch: dict, temperature: float = 1.0, with_entropy: bool = False, chunk_size: int = 0
) -> tuple[mx.array, Optional[mx.array]]:
    """``get_token_logps`` for a shared-prefix batch: per-token log-probs (N, Ws) aligned with ``suffix_mask``."""
    targets = batch["suffix_targets"]
    width = targets.shape[1]
    parts = split_head(model) if 0 < chunk_size < width else None
    if parts is not None:
        return tempered_logps_chunked(_suffix_states(model, batch, True), targets, parts[1], temperature, with_entropy, chunk_size)
    return tempered_logps(_suffix_states(model, batch, False), targets, temperature, with_entropy)
