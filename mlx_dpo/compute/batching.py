"""Turn tokenized examples into padded MLX batches with explicit response masks.

``Batch`` lists every key a batch may carry, who sets it and who reads it.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, TypedDict, Union

import mlx.core as mx
import numpy as np

from ..data import Example
from ..data.core import Spans
from .prefix import shared_prefix_fields, with_shared_prefix


class Batch(TypedDict, total=False):
    """What a batch may carry. N rows: for B pairs the B chosen rows then the B rejected rows; for
    B KTO examples their own completions then the mismatched ones (the KL baseline); for GRPO
    the G completions of each prompt, consecutive. ``forward.py`` reads either the plain or the
    shared-prefix keys; every other key is read by the loss of one method.

    Also ``column.<name>`` (B,): a pair's numeric data column, for loss terms (``data.build``).
    """

    # Plain rows (``pad_batch``); a shared-prefix batch has the prefix keys instead.
    tokens: mx.array  # (N, L) int32, right-padded
    mask: mx.array  # (N, L-1) float32, 1 where target tokens[:, j+1] is trained (a response token)
    logits_from: int  # first target position any row needs (rounded down to pad_to_multiple)
    lengths: mx.array  # (N,) real tokens of each row, prompt and response: the throughput unit
    index: mx.array  # (B,) the examples' (or prompts') indices in their dataset, for error messages
    # Shared prefix (``prefix.shared_prefix_fields``): P prompts run once, N continuations.
    prefix_tokens: mx.array  # (P, Wp) each prompt without its last token
    prefix_lengths: mx.array  # (P,)
    suffix_tokens: mx.array  # (N, Ws) last prompt token + response[:-1]
    suffix_targets: mx.array  # (N, Ws) the response
    suffix_mask: mx.array  # (N, Ws) 1 on real targets
    suffix_rows: mx.array  # (N,) the prompt each continuation belongs to
    # Dataset fields (``data.Dataset.fields``), laid out like the rows.
    label: mx.array  # (B,) KTO: 1 desirable, 0 undesirable
    confidence: mx.array  # (B,) pairs: a soft preference, acts as 1 - label_smoothing
    reference_logps: mx.array  # reference log-probs: (N,) summed (offline: cache or round), (N, T) per token (GRPO, beta > 0)
    # Sampled by the policy (``online/``).
    advantages: mx.array  # (N,) GRPO: each completion's advantage over its group
    old_logps: mx.array  # (N, T) GRPO with num_iterations > 1: the sampling policy's per-token log-probs
    normalizer: mx.array  # () GRPO dapo: completion tokens of the generation batch per process and step
    stats: dict  # name -> () metric of the sampling (rewards, lengths, time/rollout): passed through to the report


class BatchSourceError(Exception):
    """A batch could not be made (e.g. a reward function failed); the trainer saves a checkpoint, then re-raises."""


def process_ranks(comm_group: Optional[mx.distributed.Group], batch_size: int) -> tuple[int, int]:
    """``(rank, world)``; a batch that cannot be split evenly over the processes is a ValueError."""
    rank, world = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world})")
    return rank, world


def spans(start: Union[int, Spans], length: int) -> Spans:
    """The trained token spans of a sequence: from its response offset to the end, or as given."""
    return tuple(start) if isinstance(start, (tuple, list)) else ((int(start), length),)


def pad_batch(
    examples: Sequence[Example], pad_id: int = 0, pad_multiple: int = 1, share_prefix: bool = False
) -> dict:
    """Stack the k-th sequence of every example into rows ``k*B .. k*B+B-1``.

    For pairs that puts all chosen rows first, then all rejected rows, so one
    forward pass covers both and the halves split cleanly. ``mask[r, j]`` is 1
    where target ``tokens[r, j+1]`` is a response token; padding (whatever its
    id) is never counted. ``lengths`` holds each row's real token count and
    ``logits_from`` (an int) the first target position a response needs. A
    sequence given as spans (``data.core.Spans``) is masked on those only.
    With ``share_prefix`` a batch whose examples' sequences share their prompt
    also carries the shared-prefix fields (``prefix.shared_prefix_fields``):
    each prompt then runs through the model once (and the whole-sequence
    ``tokens``, ``mask`` and ``logits_from``, which it no longer needs, are left
    out: every input of the compiled step is a shape it is traced for).
    """
    seqs = [ex[k] for k in range(len(examples[0])) for ex in examples]
    longest = max(len(toks) for toks, _ in seqs)
    width = -(-longest // pad_multiple) * pad_multiple
    tokens = np.full((len(seqs), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), width - 1), dtype=np.float32)
    for r, (toks, start) in enumerate(seqs):
        tokens[r, : len(toks)] = toks
        for a, b in spans(start, len(toks)):
            mask[r, max(a, 1) - 1 : b - 1] = 1.0
    lengths = np.array([len(toks) for toks, _ in seqs], dtype=np.int32)
    # First target position any row's response needs, rounded down to ``pad_multiple`` like the
    # widths: bucketed shapes (for a compiled step, traced once per shape) bucket this too.
    logits_from = (min(max(spans(start, len(toks))[0][0], 1) for toks, start in seqs) - 1) // pad_multiple * pad_multiple
    batch = {"tokens": mx.array(tokens), "mask": mx.array(mask), "lengths": mx.array(lengths), "logits_from": logits_from}
    if share_prefix and len(examples[0]) > 1:
        shared = shared_prefix_fields(seqs, [r % len(examples) for r in range(len(seqs))], pad_id, pad_multiple)
        if shared is not None:
            batch = with_shared_prefix(batch, shared)
    return batch


def length_groups(
    dataset: Sequence[Example], batch_size: int, comm_group: Optional[mx.distributed.Group] = None, drop_last: bool = True
) -> list[list[int]]:
    """Batches of example indices, grouped by length so padding stays small.

    With several processes each rank takes every ``world``-th example of a
    global batch, so the ranks together see exactly the single-process batch.
    Training drops the last partial batch (every step sees ``batch_size``
    examples); evaluation keeps it, or the longest examples would never count.
    """
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"The dataset has {len(dataset)} examples, fewer than batch_size={batch_size}."
        )
    rank, world = process_ranks(comm_group, batch_size)
    order = sorted(range(len(dataset)), key=lambda i: max(len(s[0]) for s in dataset[i]))
    end = len(order) - batch_size + 1 if drop_last else len(order)
    groups = [order[i + rank : i + batch_size : world] for i in range(0, max(end, 0), batch_size)]
    return [g for g in groups if g]


def padding_fraction(dataset: Sequence[Example], batch_size: int, pad_multiple: int = 1) -> float:
    """Share of the batched token slots that are padding, with length grouping."""
    real = padded = 0
    for group in length_groups(dataset, batch_size):
        lengths = [len(s[0]) for i in group for s in dataset[i]]
        width = -(-max(lengths) // pad_multiple) * pad_multiple
        real += sum(lengths)
        padded += width * len(lengths)
    return 1.0 - real / padded if padded else 0.0


def iterate_batches(
    dataset: Sequence[Example],
    batch_size: int,
    *,
    loop: bool = False,
    seed: int = 0,
    pad_id: int = 0,
    pad_multiple: int = 1,
    comm_group: Optional[mx.distributed.Group] = None,
    shuffle: bool = True,
    drop_last: bool = True,
    skip: int = 0,
    share_prefix: bool = False,
) -> Iterator[dict[str, mx.array]]:
    """Yield padded batches; each epoch visits the length groups in a fresh seeded order.

    A ``data.Dataset`` adds its ``fields`` (labels, confidences, precomputed
    reference log-probs) to each batch, in row order. ``skip`` passes over the
    first batches without building them: a resumed run sees exactly the batches
    an uninterrupted one would. ``share_prefix``: see ``pad_batch``.
    """
    groups = length_groups(dataset, batch_size, comm_group, drop_last)
    epoch = 0
    while True:
        order = np.random.default_rng((seed, epoch)).permutation(len(groups)) if shuffle else range(len(groups))
        for g in order:
            if skip > 0:
                skip -= 1
                continue
            idx = np.asarray(groups[g], dtype=np.int32)
            batch = pad_batch([dataset[i] for i in idx], pad_id, pad_multiple, share_prefix)
            batch["index"] = mx.array(idx)
            for name, values in getattr(dataset, "fields", {}).items():
                # Per-sequence fields follow the row order: all first sequences, then all second.
                picked = values[idx]
                batch[name] = mx.array(picked.T.reshape(-1) if picked.ndim == 2 else picked)
            yield batch
        epoch += 1
        if not loop:
            return
