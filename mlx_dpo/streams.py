"""A batch's log-prob pass split over parallel CPU streams, so that both cores work.

On the CPU, MLX runs every op but the float32 GEMMs (BLAS) on one thread: attention's softmax,
norms, SiLU and the vocabulary log-softmax keep one core of two busy, and they are over half of a
DPO step on SmolLM2 (BENCHMARKS.md). The rows of a log-prob pass are independent (a shared-prefix
batch's rows depend only on their own prompt), so ``on_streams`` runs each part of the batch's
rows, forward and backward, on its own CPU stream, concurrently, and puts the per-row results
back in the batch's order: the same log-probs and gradients, summed in another order. Each
stream's GEMMs get ``cores // streams`` BLAS threads, else the two would fight over the cores.

It needs MLX to interleave the parts' work (``MLX_BFS_MAX_WIDTH``, set in ``__init__`` before
MLX loads) and the step not compiled (the split reads each batch's row layout on the host).
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from . import _blas

_streams: list[mx.Stream] = []  # empty: everything runs on the default stream
_made: list[mx.Stream] = []  # every stream made so far (each has a thread of its own), reused
_pack_head = False  # project only response positions onto the vocabulary (logps.packed_logps)


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_streams(setting: Union[str, int], compile_step: bool, world_size: int = 1, on_cpu: Optional[bool] = None) -> int:
    """How many CPU streams ``cpu_streams`` (``auto`` or a count) means here.

    ``auto`` is 2 on a CPU with at least 2 cores per process, when the step is not compiled and
    MLX was imported after mlx_dpo (``mlx_dpo.wide_eval_order``); 1 otherwise (a GPU runs its own
    kernels in parallel). A count above 1 with a compiled step is an error: the split is decided
    on the host from each batch's row layout, which a compiled step only sees as placeholders.
    """
    import mlx_dpo

    on_cpu = mx.default_device() == mx.cpu if on_cpu is None else on_cpu
    if setting == "auto":
        fits = on_cpu and not compile_step and mlx_dpo.wide_eval_order and cores() // max(world_size, 1) >= 2
        return 2 if fits else 1
    n = int(setting)
    if n > 1 and not on_cpu:
        raise ValueError(f"cpu_streams: {n} is for training on the CPU, and MLX's default device here is the GPU")
    if n > 1 and compile_step:
        raise ValueError(f"cpu_streams: {n} needs compile: false (or auto): a compiled step cannot split its batches")
    return n


def use_streams(n: int, pack_head: bool = False) -> Optional[int]:
    """Run later log-prob passes on ``n`` CPU streams (1: the default stream alone), and with
    ``pack_head`` project only their response positions onto the vocabulary. Both read batch
    layouts on the host, so neither may run inside a compiled step.

    Returns the BLAS threads per stream now in force, or None where the BLAS is not ours to set.
    """
    global _streams, _pack_head
    _pack_head = pack_head
    while n > 1 and len(_made) < n:
        _made.append(mx.new_stream(mx.cpu))
    _streams = _made[:n] if n > 1 else []
    return _blas.set_threads(max(1, cores() // max(n, 1)))


def active_streams() -> int:
    return max(len(_streams), 1)


def packing() -> bool:
    return _pack_head


def split_rows(batch: dict, n: int, trim: bool = True) -> Optional[list[tuple[dict, np.ndarray]]]:
    """``n`` sub-batches of ``batch`` for a log-prob pass, each with the batch rows it holds; None
    where the batch has fewer than ``n`` independent parts.

    A plain batch's rows are independent: they are grouped by ``balanced_groups`` and each group
    is cut to its own longest row (``trim``; else all keep the batch's width, for per-position
    results that must line up with the batch's mask). A shared-prefix batch splits its prompts into contiguous
    blocks, and each block takes the continuation rows of its own prompts, renumbered.
    """
    if "prefix_tokens" not in batch:
        rows, width = batch["tokens"].shape
        if rows < n:
            return None
        lengths = np.array(batch["lengths"]) if trim and "lengths" in batch else np.full(rows, width)
        out = []
        for group in balanced_groups(np.minimum(lengths, width), n):
            take, w = mx.array(group.astype(np.int32)), int(max(lengths[group].max(), 2))
            out.append(({"tokens": batch["tokens"][take][:, :w], "mask": batch["mask"][take][:, : w - 1],
                         "logits_from": batch.get("logits_from", 0)}, group))
        return out
    prompts = batch["prefix_tokens"].shape[0]
    if prompts < n:
        return None
    owner = np.array(batch["suffix_rows"])
    out = []
    for block in np.array_split(np.arange(prompts), n):
        lo, hi = int(block[0]), int(block[-1]) + 1
        rows = np.nonzero((owner >= lo) & (owner < hi))[0]
        take = mx.array(rows.astype(np.int32))
        sub = {
            "prefix_tokens": batch["prefix_tokens"][lo:hi],
            "prefix_lengths": batch["prefix_lengths"][lo:hi],
            "suffix_rows": mx.array((owner[rows] - lo).astype(np.int32)),
            **{k: batch[k][take] for k in ("suffix_tokens", "suffix_targets", "suffix_mask")},
        }
        out.append((sub, rows))
    return out


def balanced_groups(lengths: np.ndarray, n: int) -> list[np.ndarray]:
    """Row indices in ``n`` groups whose slowest is as fast as it gets: each group runs padded to
    its longest row, so a group costs about (rows x longest row). Rows are taken longest first and
    cut into consecutive runs; of every such cut, the one with the smallest largest cost wins
    (short prompts with answers of one or two sentences: splitting chosen from rejected rows
    left one stream idle for a third of the step)."""
    order = np.argsort(-lengths, kind="stable")
    ranked = lengths[order]
    best = None
    for cuts in itertools.combinations(range(1, len(ranked)), n - 1):
        bounds = (0, *cuts, len(ranked))
        cost = max((b - a) * ranked[a] for a, b in zip(bounds, bounds[1:]))
        if best is None or cost < best[0]:
            best = (cost, bounds)
    return [np.sort(order[a:b]) for a, b in zip(best[1], best[1][1:])]


Outputs = Sequence[Optional[mx.array]]


def on_streams(fn: Callable[[dict], Outputs], batch: dict, trim: bool = True) -> tuple[Optional[mx.array], ...]:
    """``fn(batch)``, a tuple of per-row arrays (rows first, or None), computed part by part on the
    active streams where the batch splits; the same rows in the same order either way. Per-row
    sums may come from parts cut to their own longest row (``trim``); per-position results may not."""
    parts = split_rows(batch, len(_streams), trim) if _streams else None
    if parts is None:
        return tuple(fn(batch))
    results = []
    for (sub, _), stream in zip(parts, _streams):
        with mx.stream(stream):
            results.append(tuple(fn(sub)))
    rows = np.concatenate([r for _, r in parts])
    order = None if np.array_equal(rows, np.arange(len(rows))) else mx.array(np.argsort(rows).astype(np.int32))
    out = []
    for k in range(len(results[0])):
        if results[0][k] is None:
            out.append(None)
            continue
        joined = mx.concatenate([r[k] for r in results], axis=0)
        out.append(joined if order is None else joined[order])
    return tuple(out)
