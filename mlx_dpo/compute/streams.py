"""A batch's log-prob pass split over parallel CPU streams, so that every core works.

On the CPU, MLX runs every op but the float32 GEMMs (BLAS) on one thread: attention's softmax,
norms, SiLU and the vocabulary log-softmax keep one core busy while the others wait. The rows of
a log-prob pass are independent (a shared-prefix batch's rows depend only on their own prompt),
so ``on_streams`` runs each part of the rows, forward and backward, on its own CPU stream,
concurrently, and puts the per-row results back in the batch's order: the same log-probs and
gradients, summed in another order. Each stream's GEMMs get a share of the BLAS threads, else
the streams would fight over the cores.

It needs MLX to interleave the parts' work (``MLX_BFS_MAX_WIDTH``, set in ``mlx_dpo/__init__``
before MLX loads) and an uncompiled step (the split reads each batch's row layout on the host).
A run holds its plan (``StreamPlan``) and passes it down; nothing here is set for the process
except the BLAS threads, which ``blas_threads`` sets for a ``with`` block and then restores.
"""

from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .._platform import blas
from .prefix import ROW_KEYS


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_processes(world_size: int, rank: int) -> int:
    """How many processes of this run share this machine: those whose ring address (``mlx.launch``'s
    ``MLX_HOSTFILE``) has this process's host, or MPI's local size; 1 alone or where unknown."""
    if world_size <= 1:
        return 1
    if os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "").isdigit():
        return int(os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
    try:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            hosts = [node[0].rsplit(":", 1)[0] for node in json.load(f)]
        return max(1, hosts.count(hosts[rank]))
    except (KeyError, OSError, ValueError, IndexError, TypeError, AttributeError):
        return 1


def blas_budget(processes: int) -> int:
    """BLAS threads this process may use: the user's own setting (``OPENBLAS_NUM_THREADS``,
    ``MKL_NUM_THREADS``, ``OMP_NUM_THREADS``) where there is one, else its share of the cores."""
    return blas.user_threads() or max(1, cores() // max(processes, 1))


def resolve_streams(setting: Union[str, int], compile_step: bool, processes: int, on_cpu: bool, wide_eval_order: bool) -> int:
    """How many CPU streams ``cpu_streams`` (``auto`` or a count) means here, for ``processes``
    processes on this machine.

    ``auto`` is 2 on a CPU with at least 2 cores per process, when the step is not compiled and
    MLX was imported after mlx_dpo (``wide_eval_order``); 1 otherwise (a GPU runs its own
    kernels in parallel). A count above 1 with a compiled step is an error: the split is decided
    on the host from each batch's row layout, which a compiled step only sees as placeholders.
    """
    if setting == "auto":
        fits = on_cpu and not compile_step and wide_eval_order and cores() // max(processes, 1) >= 2
        return 2 if fits else 1
    n = int(setting)
    if n > 1 and not on_cpu:
        raise ValueError(f"cpu_streams: {n} is for training on the CPU, and MLX's default device here is the GPU")
    if n > 1 and compile_step:
        raise ValueError(f"cpu_streams: {n} needs compile: false (or auto): a compiled step cannot split its batches")
    return n


@functools.lru_cache(maxsize=None)
def cpu_stream(i: int) -> mx.Stream:
    """The ``i``-th extra CPU stream. MLX cannot free a stream (each has a thread of its own),
    so a process makes each one once and every run reuses it."""
    return mx.new_stream(mx.cpu)


@contextmanager
def blas_threads(n: int) -> Iterator[Optional[int]]:
    """The loaded BLAS set to ``n`` threads inside the block, its previous count restored after;
    yields the count in force (None where the BLAS is not ours to set)."""
    before = blas.get_threads()
    try:
        yield blas.set_threads(n) if before is not None else None
    finally:
        if before is not None:
            blas.set_threads(before)


def split_rows(batch: dict, n: int, trim: bool = True) -> Optional[list[tuple[dict, np.ndarray]]]:
    """``n`` sub-batches of ``batch`` for a log-prob pass, each with the batch rows it holds; None
    where the batch has fewer than ``n`` independent parts.

    A plain batch's rows are independent: they are grouped by ``balanced_groups`` and each group
    is cut to its own longest row (``trim``; else all keep the batch's width, for per-position
    results that must line up with the batch's mask). A shared-prefix batch splits its prompts
    into contiguous blocks, and each block takes the continuation rows of its own prompts, renumbered.
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
            **{k: batch[k][take] for k in ROW_KEYS},
        }
        out.append((sub, rows))
    return out


def balanced_groups(lengths: np.ndarray, n: int) -> list[np.ndarray]:
    """Row indices in ``n`` groups whose slowest is as fast as it gets.

    Each group runs padded to its longest row, so a group costs about (rows x longest row). Rows
    are taken longest first and cut into ``n`` consecutive runs; the cut with the smallest
    largest cost is found exactly by dynamic programming over (runs, rows), in O(n x rows^2)
    (short prompts with one- or two-sentence answers: splitting chosen from rejected rows left
    one stream idle for a third of the step). Among equal costs the earliest cuts win.
    """
    order = np.argsort(-lengths, kind="stable")
    ranked = lengths[order].astype(np.int64)
    rows = len(ranked)
    # best[k][j]: the smallest largest cost of the first j ranked rows in k runs; cut[k][j] its last cut.
    best = np.full((n + 1, rows + 1), np.iinfo(np.int64).max, dtype=np.int64)
    cut = np.zeros((n + 1, rows + 1), dtype=np.int64)
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, rows - (n - k) + 1):
            starts = np.arange(k - 1, j)  # the last run is ranked[i:j], led by its longest row ranked[i]
            costs = np.maximum(best[k - 1][starts], (j - starts) * ranked[starts])
            pick = int(np.argmin(costs))
            best[k][j], cut[k][j] = costs[pick], starts[pick]
    bounds, j = [rows], rows
    for k in range(n, 0, -1):
        j = int(cut[k][j])
        bounds.append(j)
    bounds.reverse()
    return [np.sort(order[a:b]) for a, b in zip(bounds, bounds[1:])]


Outputs = Sequence[Optional[mx.array]]


def on_streams(fn: Callable[[dict], Outputs], batch: dict, streams: Sequence[mx.Stream], trim: bool = True) -> tuple[Optional[mx.array], ...]:
    """``fn(batch)``, a tuple of per-row arrays (rows first, or None), computed part by part on
    ``streams`` where the batch splits; the same rows in the same order either way. Per-row sums
    may come from parts cut to their own longest row (``trim``); per-position results may not."""
    parts = split_rows(batch, len(streams), trim) if len(streams) > 1 else None
    if parts is None:
        return tuple(fn(batch))
    results = []
    for (sub, _), stream in zip(parts, streams):
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
