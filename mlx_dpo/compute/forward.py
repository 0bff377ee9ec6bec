"""A batch's log-probs under a model: its prompts run once where the batch shares them
(``prefix.py``), its rows split over parallel CPU streams where the run has them (``streams.py``).

``Forward`` is how one run computes log-probs, decided once at start-up and passed to every
loss, reference and rollout source that needs it: nothing here reads a setting from anywhere else.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache
import numpy as np
from mlx.utils import tree_flatten

from .batching import pad_batch
from .logps import get_batched_logps, get_token_logps
from .prefix import is_shared, shared_logps, shared_token_logps
from .streams import on_streams

AUTO_MIN_PROMPT_TOKENS = 16  # `auto` shares when the mean prompt is at least this long


@dataclass(frozen=True)
class Forward:
    """How a run computes log-probs.

    ``chunk_size``: positions per vocabulary projection (0: all at once; ``logps.py``).
    ``streams``: the CPU streams a batch's rows are split over (none or one: the default stream).
    ``pack_head``: project only response positions onto the vocabulary (``logps.packed_logps``);
    it reads the mask on the host, so only for uncompiled steps.
    ``sampling_threads``: BLAS threads while the policy samples (0: as for training); a run that
    splits its rows over CPU streams trains with fewer threads per stream than sampling, one
    stream, can use.
    """

    chunk_size: int = 0
    streams: tuple = ()
    pack_head: bool = False
    sampling_threads: int = 0


PLAIN = Forward()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model with dropout off inside the block (sampling, frozen log-probs), its mode restored after."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def sequence_logps(model: nn.Module, batch: dict, how: Forward = PLAIN) -> tuple[mx.array, mx.array]:
    """Per-row summed response log-probs and token counts of a batch."""

    def logps(part: dict) -> tuple[mx.array, mx.array]:
        if is_shared(part):
            return shared_logps(model, part, how.chunk_size, how.pack_head)
        return get_batched_logps(model, part["tokens"], part["mask"], how.chunk_size, part.get("logits_from", 0), how.pack_head)

    return on_streams(logps, batch, how.streams)


def sequence_token_logps(
    model: nn.Module, batch: dict, how: Forward = PLAIN, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[mx.array, Optional[mx.array], mx.array]:
    """Per-token log-probs, entropies and the matching response mask, shared or not (GRPO's input)."""
    start = 0 if is_shared(batch) else batch.get("logits_from", 0)

    def logps(part: dict) -> tuple[mx.array, Optional[mx.array]]:
        if is_shared(part):
            return shared_token_logps(model, part, temperature, with_entropy, how.chunk_size)
        return get_token_logps(model, part["tokens"], start, temperature, with_entropy, how.chunk_size)

    logps, entropy = on_streams(logps, batch, how.streams, trim=False)
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
    unknown = _unknown_caches(model)
    if unknown:
        return f"its layers keep a kind of cache prompt sharing does not know ({', '.join(unknown)})"
    vocab = getattr(getattr(model, "args", None), "vocab_size", None) or 256
    rng = np.random.default_rng(0)
    examples = []
    for p, rc, rr in ((7, 4, 2), (3, 2, 5)):
        prompt = rng.integers(1, min(vocab, 1000), p).tolist()
        examples.append(tuple((prompt + rng.integers(1, min(vocab, 1000), r).tolist(), p) for r in (rc, rr)))
    plain, shared = pad_batch(examples), pad_batch(examples, share_prefix=True)
    weights = mx.array(rng.normal(size=4).astype(np.float32))
    trainable = bool(tree_flatten(model.trainable_parameters()))

    def run(fn):
        grads = nn.value_and_grad(model, lambda m: (fn(m) * weights).sum())(model)[1] if trainable else {}
        return fn(model), grads

    try:
        with eval_mode(model):
            a, grad_a = run(lambda m: get_batched_logps(m, plain["tokens"], plain["mask"])[0])
            b, grad_b = run(lambda m: shared_logps(m, shared)[0])
            mx.eval(a, b, grad_a, grad_b)
    except Exception as e:  # noqa: BLE001 - any failure means: not supported
        first = str(e).splitlines()[0] if str(e) else ""
        return f"its attention layers do not take a shared prompt's cache ({type(e).__name__}: {first})".replace(": )", ")")
    return _disagreement(model, (a, grad_a), (b, grad_b))


def _unknown_caches(model: nn.Module) -> list[str]:
    """The kinds of per-layer cache in ``model.make_cache()`` that are neither key/value caches nor
    mlx-lm's recurrent ``ArraysCache`` (the two ``compute.prefix`` branches)."""
    make = getattr(model, "make_cache", None)
    caches = make() if callable(make) else []
    return sorted({type(c).__name__ for c in caches if not isinstance(c, (KVCache, RotatingKVCache, ArraysCache))})


def _disagreement(model: nn.Module, plain: tuple, shared: tuple) -> Optional[str]:
    """Where the shared path's log-probs or gradients differ from the plain path's, or None."""
    a, b = np.array(plain[0], dtype=np.float64), np.array(shared[0], dtype=np.float64)
    tol = 1e-3 if model_dtype(model) == mx.float32 else 0.05
    if not (np.all(np.isfinite(b)) and np.all(np.abs(a - b) <= tol * (1 + np.abs(a)))):
        return f"the shared forward differs from the plain one (largest gap {np.max(np.abs(a - b)):.3g} nats)"
    for (name, ga), (_, gb) in zip(tree_flatten(plain[1]), tree_flatten(shared[1])):
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
