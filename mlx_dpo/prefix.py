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
left without a key, so no NaN can arise in padded rows.

A batch that can share carries, besides ``tokens``/``mask``, the fields of
``shared_prefix_fields``; ``sequence_logps`` and ``sequence_token_logps`` use them when present.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .logps import (
    chunked_token_logps, get_batched_logps, get_token_logps, packed_logps, split_head, tempered_logps, tempered_logps_chunked,
    token_logps,
)
from .streams import on_streams, packing

SHARED_KEYS = ("prefix_tokens", "prefix_lengths", "suffix_tokens", "suffix_targets", "suffix_mask", "suffix_rows")
MIN_PROMPT = 2  # a continuation starts at the last prompt token, so the cached part needs >= 1 token
AUTO_MIN_PROMPT_TOKENS = 16  # `auto` shares when the mean prompt is at least this long


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


def _suffix_states(model: nn.Module, batch: dict, use_body: bool) -> mx.array:
    """The continuation rows' final hidden states (``use_body``) or logits, after one prefix pass."""
    forward = split_head(model)[0] if use_body else model
    caches = [PrefixCache() for _ in range(len(model.layers))]
    forward(batch["prefix_tokens"], cache=caches)  # only the keys and values are used (lazy graph)
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


def sequence_logps(model: nn.Module, batch: dict, chunk_size: int = 0) -> tuple[mx.array, mx.array]:
    """Per-row summed response log-probs and token counts of a batch, its prompts run once if it
    shares, its rows split over parallel CPU streams where those are on (``streams.py``)."""

    pack = packing()

    def logps(part: dict) -> tuple[mx.array, mx.array]:
        if is_shared(part):
            return shared_logps(model, part, chunk_size, pack)
        return get_batched_logps(model, part["tokens"], part["mask"], chunk_size, part.get("logits_from", 0), pack)

    return on_streams(logps, batch)


def sequence_token_logps(
    model: nn.Module, batch: dict, temperature: float = 1.0, with_entropy: bool = False, chunk_size: int = 0
) -> tuple[mx.array, Optional[mx.array], mx.array]:
    """Per-token log-probs, entropies and the matching response mask, shared or not (GRPO's input)."""
    start = 0 if is_shared(batch) else batch.get("logits_from", 0)

    def logps(part: dict) -> tuple[mx.array, Optional[mx.array]]:
        if is_shared(part):
            return shared_token_logps(model, part, temperature, with_entropy, chunk_size)
        return get_token_logps(model, part["tokens"], start, temperature, with_entropy, chunk_size)

    logps, entropy = on_streams(logps, batch, trim=False)
    return logps, entropy, batch["suffix_mask"] if is_shared(batch) else batch["mask"][:, start:]


def sharing_problem(model: nn.Module) -> Optional[str]:
    """Why this model cannot share prefixes (None if it can), found by running both paths once.

    Two pairs with prompts of different lengths go through the unshared and the shared forward,
    and, where the model has trainable parameters, backward: an architecture whose attention
    ignores the cache's mask or offsets, needs another kind of cache (sliding-window rotation is
    handled; state-space layers are not), or stops the gradient at the cache disagrees or raises.
    """
    if not hasattr(model, "layers"):
        return "the model does not expose its layers"
    vocab = getattr(getattr(model, "args", None), "vocab_size", None) or 256
    rng = np.random.default_rng(0)
    examples = []
    for p, rc, rr in ((7, 4, 2), (3, 2, 5)):
        prompt = rng.integers(1, min(vocab, 1000), p).tolist()
        examples.append(tuple((prompt + rng.integers(1, min(vocab, 1000), r).tolist(), p) for r in (rc, rr)))
    from .batching import pad_batch  # batching builds shared batches with this module

    plain, shared = pad_batch(examples), pad_batch(examples, share_prefix=True)
    weights = mx.array(rng.normal(size=4).astype(np.float32))
    trainable = bool(tree_flatten(model.trainable_parameters()))

    def run(fn):
        grads = nn.value_and_grad(model, lambda m: (fn(m) * weights).sum())(model)[1] if trainable else {}
        return fn(model), grads

    training = model.training
    model.eval()
    try:
        a, grad_a = run(lambda m: get_batched_logps(m, plain["tokens"], plain["mask"])[0])
        b, grad_b = run(lambda m: shared_logps(m, shared)[0])
        mx.eval(a, b, grad_a, grad_b)
    except Exception as e:  # noqa: BLE001 - any failure means: not supported
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip(": ")
    finally:
        model.train(training)
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    tol = 1e-3 if model_dtype(model) == mx.float32 else 0.05
    if not (np.all(np.isfinite(b)) and np.all(np.abs(a - b) <= tol * (1 + np.abs(a)))):
        return f"the shared forward differs from the plain one (largest gap {np.max(np.abs(a - b)):.3g} nats)"
    for (name, ga), (_, gb) in zip(tree_flatten(grad_a), tree_flatten(grad_b)):
        ga, gb = np.array(ga.astype(mx.float32), dtype=np.float64), np.array(gb.astype(mx.float32), dtype=np.float64)
        if not np.all(np.abs(ga - gb) <= tol * (1e-2 + np.abs(ga).max())):
            return f"the shared backward differs from the plain one (gradient of {name})"
    return None


def model_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype of the model's first floating-point parameter."""
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return p.dtype
    return mx.float32


def resolve_prefix_sharing(
    setting, model: nn.Module, mean_prompt_tokens: float, reference_model: Optional[nn.Module] = None,
    grad_checkpoint: bool = False,
) -> tuple[bool, Optional[str]]:
    """``prefix_sharing`` (auto / true / false) for this model and data: (on, an info line or None).

    ``auto`` shares where the policy (and a separate reference model) pass ``sharing_problem``
    and the prompts are long enough to pay for the second pass (``AUTO_MIN_PROMPT_TOKENS``);
    ``true`` shares wherever the architecture allows it. Gradient checkpointing rules it out:
    ``mx.checkpoint`` differentiates a layer only through its explicit inputs, so the cached
    keys and values would reach the continuation as constants. Falls back with one line.
    """
    if setting is False or setting == "false":
        return False, None
    if grad_checkpoint:
        return False, "prefix sharing off: grad_checkpoint would stop the gradient at the prompt's cache; prompts run once per sequence"
    for what, m in (("", model), (" reference model", reference_model)):
        problem = sharing_problem(m) if m is not None else None
        if problem is not None:
            kind = getattr(m, "model_type", "this model")
            return False, f"prefix sharing off: not supported for{what} {kind} ({problem}); prompts run once per sequence"
    if setting == "auto" and mean_prompt_tokens < AUTO_MIN_PROMPT_TOKENS:
        return False, (
            f"prefix sharing off: prompts average {mean_prompt_tokens:.1f} tokens (auto shares from "
            f"{AUTO_MIN_PROMPT_TOKENS}); set prefix_sharing: true to force it"
        )
    return True, None
