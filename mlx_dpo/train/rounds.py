"""Training in rounds (iterative DPO): each round's data, then the trainer on it.

Steps are counted over the whole run (round K is steps (K-1)·iters+1 .. K·iters), so a
checkpoint names its round and a stopped run resumes at the round and step where it stopped.
Only round 1 without pairs is an error; a later round without (enough) pairs trains nothing and
the run goes on (the reward has saturated: the policy's samples no longer differ).
"""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..data import DataError
from ..online.iterative import RoundData
from .checkpoint import save_checkpoint
from .trainer import BatchIterator, LossFn, TrainingArgs, TrainingInterrupted, train


def round_steps(pairs: int, args: TrainingArgs, epochs_per_round: Optional[int]) -> int:
    """Steps one round trains: ``iters``, or fewer where ``epochs_per_round`` passes over its pairs
    end sooner, never leaving an accumulated gradient unapplied."""
    full_batches = pairs // args.batch_size
    steps = args.iters if full_batches else 0
    if epochs_per_round:  # a round with few pairs must not go over them many times
        steps = min(args.iters, epochs_per_round * full_batches)
    return steps - steps % args.grad_accumulation_steps


def train_rounds(model: nn.Module, optimizer, loss_fn: LossFn, rounds: RoundData, batches: BatchIterator,
                 args: TrainingArgs, callback, start: int = 0) -> None:
    """Rounds ``start // iters + 1 .. rounds``: for each, its pairs, then ``train()`` on them."""
    iters, folder = args.iters, Path(args.adapter_file).parent
    if start == 0:  # a fresh run: pairs a previous run left in this folder are not this policy's samples
        rounds.clear(["round_*", "test"])
    for k in range(start // iters + 1, rounds.args.rounds + 1):
        train_set = _round_data(rounds, k, "train", args)
        if k == 1 and not train_set:
            raise DataError(f"round 1: every prompt's samples scored the same, so there are no pairs to train on "
                            f"(see {folder / 'round_1' / 'pairs.jsonl'}); use more samples_per_prompt or a finer reward")
        valid_set = _round_data(rounds, k, "valid", args)
        offset, first, last = (k - 1) * iters, max(start, (k - 1) * iters), k * iters
        steps = round_steps(len(train_set or ()), args, rounds.args.epochs_per_round)
        if steps < 1:
            print(f"[INFO] round {k}: {len(train_set or ())} pairs, too few for a step of batch_size {args.batch_size}: nothing trained")
        elif first < offset + steps:
            # Each round's batch order starts afresh; a resume skips within it.
            shifted = lambda ds, bs, **kw: batches(ds, bs, **{**kw, "skip": max(kw.get("skip", 0) - offset, 0)})  # noqa: E731
            train(model, optimizer, loss_fn, train_set, valid_set or None, shifted, replace(args, iters=offset + steps),
                  training_callback=callback, start_step=first)
        if offset + steps < last and mx.distributed.init().rank() == 0:  # the round is done: the next resumes after it
            save_checkpoint(model, optimizer, Path(args.adapter_file), last, True)


def _round_data(rounds: RoundData, k: int, split: str, args: TrainingArgs):
    """Round ``k``'s pairs; Ctrl-C while sampling stops at the last round's checkpoint, the place to resume."""
    try:
        return rounds.data(k, split)
    except KeyboardInterrupt:
        if k > 1:
            raise TrainingInterrupted((k - 1) * args.iters, signal.SIGINT, Path(args.adapter_file)) from None
        raise
