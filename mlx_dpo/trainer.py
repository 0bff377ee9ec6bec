"""The training loop: step, accumulate, evaluate, report, checkpoint.

mlx-lm's ``train()`` carries only ``(loss, ntoks)`` out of its compiled step,
so preference metrics (rewards, accuracy, margin) need a loop of its own. It
keeps mlx-lm's shape and reuses its pieces: ``TrainingArgs``, ``grad_checkpoint``,
callbacks, the wired-limit guard and ``average_gradients`` for ``mlx.launch``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs as _MlxLmTrainingArgs
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.utils import maybe_set_recommended_wired_limit

from .objectives import LossFn, is_summed

BatchIterator = Callable[..., Iterator[dict]]


@dataclass
class TrainingArgs(_MlxLmTrainingArgs):
    seed: int = field(default=0, metadata={"help": "Seed for the batch order."})
    compile: bool = field(default=True, metadata={"help": "mx.compile the training step."})


class CallbackList(TrainingCallback):
    """Several callbacks as one (None entries are skipped)."""

    def __init__(self, callbacks: list[Optional[TrainingCallback]]):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_train_loss_report(self, train_info: dict) -> None:
        for c in self.callbacks:
            c.on_train_loss_report(train_info)

    def on_val_loss_report(self, val_info: dict) -> None:
        for c in self.callbacks:
            c.on_val_loss_report(val_info)


def _rank0_print(*args) -> None:
    if mx.distributed.init().rank() == 0:
        print(*args, flush=True)


class MetricSum:
    """Running weighted sums of a loss function's metrics, reduced across processes."""

    def __init__(self) -> None:
        self.sums: dict[str, mx.array] = {}

    def add(self, loss: mx.array, metrics: dict[str, mx.array]) -> None:
        w = metrics["weight"]
        for k, v in {"loss": loss, **metrics}.items():
            term = v if is_summed(k) else v * w
            self.sums[k] = self.sums[k] + term if k in self.sums else term

    def arrays(self) -> list[mx.array]:
        return list(self.sums.values())

    def result(self) -> dict[str, float]:
        """Weighted means (sums for ``weight``/``count``/``ntoks``), over all ranks."""
        keys = list(self.sums)
        if not keys:
            return {}
        total = mx.distributed.all_sum(mx.stack([self.sums[k].astype(mx.float32) for k in keys]), stream=mx.cpu)
        values = dict(zip(keys, total.tolist()))
        w = values["weight"] or 1.0
        return {k: (v if is_summed(k) else v / w) for k, v in values.items()}


def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Sequence,
    batch_size: int,
    num_batches: int,
    iterate_batches: BatchIterator,
) -> dict[str, float]:
    """Weighted mean metrics over ``num_batches`` batches (-1: the whole set)."""
    model.eval()
    acc = MetricSum()
    batches = iterate_batches(dataset, batch_size, loop=False, shuffle=False, drop_last=False, comm_group=mx.distributed.init())
    for i, batch in enumerate(batches):
        if num_batches != -1 and i >= num_batches:
            break
        loss, metrics = loss_fn(model, batch)
        acc.add(loss, metrics)
        mx.eval(acc.arrays())
    return acc.result()


def save_adapters(model: nn.Module, path: Path) -> None:
    """Write the trainable weights in mlx-lm's format, atomically (temp file + rename)."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), weights)
    os.replace(tmp, path)


def format_metrics(metrics: dict[str, float], prefix: str = "") -> str:
    names = {
        "loss": "loss",
        "rewards/chosen": "rewards chosen",
        "rewards/rejected": "rejected",
        "rewards/accuracies": "acc",
        "rewards/margins": "margin",
        "kl": "kl",
        "nll_loss": "nll",
    }
    parts = [f"{prefix}{label} {metrics[k]:.4f}" if k == "loss" else f"{label} {metrics[k]:.4f}" for k, label in names.items() if k in metrics]
    return ", ".join(parts)


def train(
    model: nn.Module,
    optimizer,
    loss_fn: LossFn,
    train_dataset: Sequence,
    val_dataset: Optional[Sequence],
    iterate_batches: BatchIterator,
    args: TrainingArgs = TrainingArgs(),
    training_callback: Optional[TrainingCallback] = None,
) -> None:
    """Train ``model`` in place and save its adapters under ``args.adapter_file``."""
    maybe_set_recommended_wired_limit()
    world = mx.distributed.init()
    rank = world.rank()
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    accum_steps = args.grad_accumulation_steps
    if accum_steps < 1:
        raise ValueError("grad_accumulation_steps must be at least 1")

    loss_value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    def step(batch, prev_grad, do_update):
        (loss, metrics), grad = loss_value_and_grad(model, batch)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            grad = average_gradients(grad)
            if accum_steps > 1:
                grad = tree_map(lambda g: g / accum_steps, grad)
            optimizer.update(model, grad)
            grad = None
        return loss, metrics, grad

    if args.compile:
        step = partial(mx.compile, inputs=state, outputs=state)(step)

    adapter_file = Path(args.adapter_file)
    batches = iterate_batches(train_dataset, args.batch_size, loop=True, seed=args.seed, comm_group=world)
    window, grad, train_time = MetricSum(), None, 0.0
    trained_tokens = 0.0
    model.train()
    for it in range(1, args.iters + 1):
        if val_dataset and args.val_batches != 0 and (it == 1 or it % args.steps_per_eval == 0 or it == args.iters):
            tic = time.perf_counter()
            val = evaluate(model, loss_fn, val_dataset, args.batch_size, args.val_batches, iterate_batches)
            model.train()
            val_time = time.perf_counter() - tic
            _rank0_print(f"Iter {it - 1}: {format_metrics(val, prefix='Val ')}, val took {val_time:.2f}s")
            if training_callback is not None:
                training_callback.on_val_loss_report(
                    {"iteration": it - 1, "val_loss": val["loss"], "val_time": val_time, **{f"val_{k}": v for k, v in val.items()}}
                )

        tic = time.perf_counter()
        batch = next(batches)
        loss, metrics, grad = step(batch, grad, it % accum_steps == 0)
        window.add(loss, metrics)
        mx.eval(state, window.arrays(), grad)
        if args.clear_cache_threshold and mx.get_cache_memory() > args.clear_cache_threshold:
            mx.clear_cache()
        train_time += time.perf_counter() - tic

        if it % args.steps_per_report == 0 or it == args.iters:
            steps = (it - 1) % args.steps_per_report + 1
            report = window.result()
            trained_tokens += report["ntoks"]
            info = {
                "iteration": it,
                "train_loss": report["loss"],
                **{k: v for k, v in report.items() if k not in ("loss", "weight", "ntoks", "count")},
                "learning_rate": optimizer.learning_rate.item(),
                "iterations_per_second": steps / train_time,
                "tokens_per_second": report["ntoks"] / train_time,
                "trained_tokens": trained_tokens,
                "peak_memory": mx.get_peak_memory() / 1e9,
            }
            _rank0_print(
                f"Iter {it}: {format_metrics(report, prefix='Train ')}, "
                f"lr {info['learning_rate']:.3e}, it/s {info['iterations_per_second']:.3f}, "
                f"tok/s {info['tokens_per_second']:.1f}, peak mem {info['peak_memory']:.3f} GB"
            )
            if training_callback is not None:
                training_callback.on_train_loss_report(info)
            window, train_time = MetricSum(), 0.0

        if it % args.steps_per_save == 0 and rank == 0:
            save_adapters(model, adapter_file)
            checkpoint = adapter_file.parent / f"{it:07d}_adapters.safetensors"
            save_adapters(model, checkpoint)
            _rank0_print(f"Iter {it}: saved adapter weights to {adapter_file} and {checkpoint}.")

    if rank == 0:
        save_adapters(model, adapter_file)
        _rank0_print(f"Saved final weights to {adapter_file}.")
