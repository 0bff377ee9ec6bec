"""The training loop: step, accumulate, evaluate, report, checkpoint.

mlx-lm's ``train()`` carries only ``(loss, ntoks)`` out of its compiled step,
so preference metrics (rewards, accuracy, margin) need a loop of its own. It
keeps mlx-lm's shape and reuses its pieces: ``TrainingArgs``, ``grad_checkpoint``,
callbacks, the wired-limit guard and ``average_gradients`` for ``mlx.launch``.

The loop receives the loss and the batch iterator and never learns which method it runs. A
loss function returns ``(loss, metrics)``: ``metrics`` are batch means, weighted by
``metrics["weight"]``, except the bookkeeping entries ``is_summed`` names, which add up.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs as _MlxLmTrainingArgs
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.utils import maybe_set_recommended_wired_limit

from .._platform.progress import Progress
from ..compute.batching import BatchSourceError
from .checkpoint import save_checkpoint

BatchIterator = Callable[..., Iterator[dict]]
LossFn = Callable[[nn.Module, dict], tuple[mx.array, dict]]
SUMMED = ("weight", "count", "ntoks")


def is_summed(key: str) -> bool:
    """Bookkeeping metrics (and per-kind counts like ``count/desirable``, times) add up over batches."""
    return key in SUMMED or key.startswith(("count/", "time/"))


@dataclass
class TrainingArgs(_MlxLmTrainingArgs):
    seed: int = field(default=0, metadata={"help": "Seed for the batch order."})
    compile: bool = field(default=True, metadata={"help": "mx.compile the training step."})
    compile_update: bool = field(
        default=True,
        metadata={"help": "mx.compile the optimizer update (its shapes never change, so it is traced once)."},
    )
    skip_nonfinite: bool = field(default=False, metadata={"help": "Skip batches with NaN/inf instead of stopping."})
    save_multiple: int = field(
        default=0,
        metadata={"help": "Checkpoints only on multiples of this many steps (0: grad_accumulation_steps); "
                  "an online source sets accumulation x num_iterations, so a resume starts a fresh generation batch."},
    )


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
    desc: str = "Evaluating",
) -> dict[str, float]:
    """Weighted mean metrics over ``num_batches`` batches (-1: the whole set), with progress."""
    model.eval()
    acc = MetricSum()
    world = mx.distributed.init()
    total = -(-len(dataset) // batch_size)
    total = total if num_batches == -1 else min(total, num_batches)
    batches = iterate_batches(dataset, batch_size, loop=False, shuffle=False, drop_last=False, comm_group=world)
    if num_batches != -1:  # never build a batch that is not used: an online source samples it
        batches = itertools.islice(batches, num_batches)
    with Progress(total, desc, unit="batch", enabled=world.rank() == 0, leave=False, interval=30.0) as bar:
        for batch in batches:
            loss, metrics = loss_fn(model, batch)
            acc.add(loss, metrics)
            mx.eval(acc.arrays())
            bar.update()
    return acc.result()


def format_metrics(metrics: dict[str, float], prefix: str = "") -> str:
    names = {
        "loss": "loss",
        "rewards/chosen": "rewards chosen",
        "rewards/rejected": "rejected",
        "rewards/accuracies": "acc",
        "rewards/margins": "margin",
        "kl": "kl",
        "nll_loss": "nll",
        "reward": "reward",
        "reward_std": "reward std",
        "frac_reward_zero_std": "zero-std groups",
        "entropy": "entropy",
        "completions/mean_length": "mean length",
    }
    parts = [f"{prefix}{label} {metrics[k]:.4f}" if k == "loss" else f"{label} {metrics[k]:.4f}" for k, label in names.items() if k in metrics]
    return ", ".join(parts)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint for ``step`` was saved before stopping."""

    def __init__(self, step: int, signum: int, checkpoint: Path):
        super().__init__(f"interrupted by signal {signum} after step {step}")
        self.step, self.signum, self.checkpoint = step, signum, checkpoint


class NonFiniteError(Exception):
    """A loss or gradient was NaN/inf; the update was not applied."""

    def __init__(self, step: int, batch_index: list[int], saved: Optional[Path], culprits: Sequence[str] = ()):
        where = f"step {step}, batch of examples {batch_index}"
        named = f" ({', '.join(culprits)})" if culprits else ""
        kept = f"; the last good adapters are in {saved}" if saved else ""
        super().__init__(f"non-finite loss or gradient at {where}{named}{kept} (lower the learning rate, or set skip_nonfinite: true)")
        self.step, self.batch_index, self.saved = step, batch_index, saved


class StoppedNow(KeyboardInterrupt):
    """A second SIGINT, or a SIGTERM outside a step's computation: training stops at once (after
    saving the last finished step where it ends a save unit); checkpoints already written are kept."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once by signal {signum}")
        self.signum = signum


class StopSignals:
    """SIGINT/SIGTERM during training. The first SIGINT, or a SIGTERM while a step computes, asks
    the loop to stop at the next step boundary, after a checkpoint. A second SIGINT, or a SIGTERM
    while no step computes (building a batch, validating), raises ``StoppedNow`` at once, so a
    process never waits on a boundary that may be far away."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.in_step = False

    def handler(self, signum: int, _frame) -> None:
        again = bool(self.received)
        self.received.append(signum)
        if (signum == signal.SIGINT and again) or (signum == signal.SIGTERM and not self.in_step):
            raise StoppedNow(signum)


@contextmanager
def _stop_signals() -> Iterator[StopSignals]:
    """``StopSignals`` installed for the block (main thread only), the previous handlers restored after."""
    stop = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _all_finite(loss: mx.array, grad) -> mx.array:
    leaves = [g for _, g in tree_flatten(grad)]
    finite = mx.isfinite(loss).all()
    for g in leaves:
        finite = finite & mx.isfinite(g).all()
    return finite


def nonfinite_terms(metrics: dict) -> list[str]:
    """The user's loss terms (``loss_terms/<name>``) whose value is NaN or inf, as one message names them."""
    return [
        f"loss term {k.split('/', 1)[1]!r} is {float(v)}"
        for k, v in metrics.items()
        if k.startswith("loss_terms/") and not np.isfinite(float(v))
    ]


def step_seed(seed: int, step: int) -> int:
    """The random seed of one step: dropout is a function of (seed, step), so a resume repeats it."""
    return (seed * 1_000_003 + step) % (2**31)


def _compiled_steps(model: nn.Module, optimizer, loss_fn: LossFn, args: TrainingArgs) -> tuple[Callable, Callable]:
    """``grad_step(batch, previous gradient) -> (loss, metrics, gradient, finite)`` and
    ``update(gradient)``, each compiled where ``args`` says."""
    accum_steps = args.grad_accumulation_steps
    loss_value_and_grad = nn.value_and_grad(model, loss_fn)

    def grad_step(batch, prev_grad):
        (loss, metrics), grad = loss_value_and_grad(model, batch)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        return loss, metrics, grad, _all_finite(loss, grad)

    def update(grad):
        grad = average_gradients(grad)
        if accum_steps > 1:
            grad = tree_map(lambda g: g / accum_steps, grad)
        optimizer.update(model, grad)

    grad_state = [model.state, mx.random.state]
    update_state = [model.state, optimizer.state]
    if args.compile:
        grad_step = partial(mx.compile, inputs=grad_state, outputs=grad_state)(grad_step)
    if args.compile or args.compile_update:
        update = partial(mx.compile, inputs=update_state, outputs=update_state)(update)
    return grad_step, update


def _report(report: dict, it: int, steps: int, seconds: float, trained_tokens: float, optimizer, skipped: int, world_size: int) -> dict:
    """A training report under mlx-lm's and TRL's names, with throughput and the rollout's share."""
    info = {
        "iteration": it,
        "train_loss": report["loss"],
        **{k: v for k, v in report.items() if k not in ("loss", "weight", "ntoks", "count")},
        "learning_rate": optimizer.learning_rate.item(),
        "iterations_per_second": steps / seconds,
        "tokens_per_second": report["ntoks"] / seconds,
        "trained_tokens": trained_tokens,
        "peak_memory": mx.get_peak_memory() / 1e9,
        "skipped_nonfinite": skipped,
        "num_tokens": trained_tokens,
    }
    if "time/rollout" in report:  # an online source: sampling vs the rest of the step
        rollout = report["time/rollout"] / world_size
        info["rollout_seconds"], info["train_seconds"] = rollout, seconds - rollout
        info["rollout_share"] = rollout / seconds
        info["rollout_tokens_per_second"] = report.get("count/completion_tokens", 0.0) / max(report["time/rollout"], 1e-9)
    return info


def _validate(model, loss_fn: LossFn, dataset, iterate_batches: BatchIterator, args: TrainingArgs, step: int,
              say: Callable[[str], None], callback: Optional[TrainingCallback]) -> None:
    """Evaluate on the validation set after ``step``, report it, and go back to training mode."""
    tic = time.perf_counter()
    val = evaluate(model, loss_fn, dataset, args.batch_size, args.val_batches, iterate_batches, "Validating")
    model.train()
    val_time = time.perf_counter() - tic
    say(f"Iter {step}: {format_metrics(val, prefix='Val ')}, val took {val_time:.2f}s")
    if callback is not None:
        callback.on_val_loss_report({"iteration": step, "val_loss": val["loss"], "val_time": val_time, **{f"val_{k}": v for k, v in val.items()}})


def _skip_nonfinite(metrics: dict, batch: dict, it: int, args: TrainingArgs, last_saved: Optional[Path], skipped: int,
                    say: Callable[[str], None]) -> int:
    """A non-finite loss or gradient at step ``it``: raise ``NonFiniteError``, or with
    ``skip_nonfinite`` say so; the count of batches skipped so far."""
    culprits, examples = nonfinite_terms(metrics), np.array(batch["index"]).tolist()
    if not args.skip_nonfinite:
        raise NonFiniteError(it, examples, last_saved, culprits)
    named = f" ({', '.join(culprits)})" if culprits else ""
    say(f"Iter {it}: non-finite loss or gradient{named}, batch of examples {examples} skipped ({skipped + 1} so far)")
    return skipped + 1


@contextmanager
def _checkpointed_layers(model: nn.Module, on: bool) -> Iterator[None]:
    """Inside the block, the model's decoder layers run under ``mx.checkpoint`` (``on``). mlx-lm's
    ``grad_checkpoint`` patches the layer *class*, so the class's own ``__call__`` is put back
    after: a later run in the process (with prefix sharing, whose gradient through the prompt's
    cache a checkpointed layer would stop) gets plain layers. Nested blocks patch once."""
    cls = type(model.layers[0]) if on else None
    if cls is None or cls.__dict__.get("_mlx_dpo_checkpointed"):
        yield
        return
    own = cls.__dict__.get("__call__")
    grad_checkpoint(model.layers[0])
    cls._mlx_dpo_checkpointed = True
    try:
        yield
    finally:
        del cls._mlx_dpo_checkpointed
        if own is None:
            del cls.__call__
        else:
            cls.__call__ = own


def train(
    model: nn.Module,
    optimizer,
    loss_fn: LossFn,
    train_dataset: Sequence,
    val_dataset: Optional[Sequence],
    iterate_batches: BatchIterator,
    args: TrainingArgs = TrainingArgs(),
    *,
    training_callback: Optional[TrainingCallback] = None,
    start_step: int = 0,
) -> int:
    """Train ``model`` in place from ``start_step``, checkpointing under ``args.adapter_file``; the
    number of batches skipped for non-finite values. Raises ``TrainingInterrupted`` after a checkpoint
    on SIGINT/SIGTERM (``StopSignals``), ``NonFiniteError`` on a NaN or inf unless ``skip_nonfinite``."""
    maybe_set_recommended_wired_limit()
    world = mx.distributed.init()
    accum_steps = args.grad_accumulation_steps
    if accum_steps < 1:
        raise ValueError("grad_accumulation_steps must be at least 1")
    save_unit = args.save_multiple or accum_steps
    if save_unit % accum_steps:
        raise ValueError("save_multiple must be a multiple of grad_accumulation_steps")
    grad_step, update = _compiled_steps(model, optimizer, loss_fn, args)

    adapter_file = Path(args.adapter_file)
    batches = iterate_batches(train_dataset, args.batch_size, loop=True, seed=args.seed, comm_group=world, skip=start_step)
    window, grad, train_time, window_steps, accumulated = MetricSum(), None, 0.0, 0, 0
    trained_tokens, skipped = 0.0, 0
    last_saved: Optional[Path] = adapter_file if adapter_file.is_file() else None
    done = saved = start_step  # the last step finished, the last step checkpointed

    def checkpoint(it: int, numbered: bool = True) -> None:
        nonlocal last_saved, saved
        if world.rank() == 0:
            save_checkpoint(model, optimizer, adapter_file, it, numbered)
        last_saved, saved = adapter_file, it
        say(f"Iter {it}: saved adapters and training state to {adapter_file.parent}." if numbered else f"Saved final weights to {adapter_file}.")

    def next_or_save(source: Callable):
        """``source()``; where a batch cannot be made, the steps finished are kept if they end a save unit."""
        try:
            return source()
        except BatchSourceError:
            if done > saved and done % save_unit == 0:
                checkpoint(done)
            raise

    def stopped_now(e: StoppedNow) -> BaseException:
        """Stopped at once: outside a step, the steps finished are kept, as a stop at a boundary would."""
        if stop.in_step or done % save_unit or done == 0:  # mid-step, mid-accumulation, or nothing to keep
            return e
        if done > saved:
            checkpoint(done)
        return TrainingInterrupted(done, e.signum, adapter_file)

    model.train()
    bar = Progress(args.iters, "Training", initial=start_step, enabled=world.rank() == 0)
    say = bar.write
    with _stop_signals() as stop, bar, _checkpointed_layers(model, args.grad_checkpoint):
        try:
            for it in range(start_step + 1, args.iters + 1):
                if val_dataset and args.val_batches != 0 and (it == start_step + 1 or it % args.steps_per_eval == 0 or it == args.iters):
                    next_or_save(lambda: _validate(model, loss_fn, val_dataset, iterate_batches, args, it - 1, say, training_callback))

                tic = time.perf_counter()
                batch = next_or_save(lambda: next(batches))
                stop.in_step = True
                mx.random.seed(step_seed(args.seed, it))
                loss, metrics, new_grad, finite = grad_step(batch, grad)
                # One reduction carries both flags: a NaN anywhere, a stop signal anywhere.
                flags = mx.stack([(~finite).astype(mx.float32), mx.array(float(len(stop.received)))])
                if world.size() > 1:
                    flags = mx.distributed.all_sum(flags, stream=mx.cpu)
                mx.eval(loss, metrics, new_grad, flags)
                bad, signalled = flags.tolist()
                if bad > 0:
                    skipped = _skip_nonfinite(metrics, batch, it, args, last_saved, skipped, say)
                else:
                    window.add(loss, metrics)
                    grad, accumulated = new_grad, accumulated + 1
                    mx.eval(window.arrays())
                if it % accum_steps == 0:  # at a boundary: no half-accumulated gradient would be lost
                    if accumulated:
                        if accumulated < accum_steps:  # skipped micro-batches: average over the rest
                            grad = tree_map(lambda g: g * (accum_steps / accumulated), grad)
                        update(grad)
                        mx.eval(model.state, optimizer.state)
                    grad, accumulated = None, 0
                if args.clear_cache_threshold and mx.get_cache_memory() > args.clear_cache_threshold:
                    mx.clear_cache()
                stop.in_step, done = False, it
                train_time += time.perf_counter() - tic
                window_steps += 1
                bar.update()

                if (it % args.steps_per_report == 0 or it == args.iters) and window.sums:
                    report = window.result()
                    trained_tokens += report["ntoks"]
                    info = _report(report, it, window_steps, train_time, trained_tokens, optimizer, skipped, world.size())
                    say(f"Iter {it}: {format_metrics(report, prefix='Train ')}, lr {info['learning_rate']:.3e}, it/s "
                        f"{info['iterations_per_second']:.3f}, tok/s {info['tokens_per_second']:.1f}, peak mem {info['peak_memory']:.3f} GB")
                    if training_callback is not None:
                        training_callback.on_train_loss_report(info)
                    window, train_time, window_steps = MetricSum(), 0.0, 0

                at_save_point = it % save_unit == 0
                if it % args.steps_per_save == 0 and at_save_point:
                    checkpoint(it)
                if signalled and at_save_point:
                    checkpoint(it)
                    raise TrainingInterrupted(it, stop.received[0] if stop.received else signal.SIGTERM, adapter_file)
        except StoppedNow as e:
            raise stopped_now(e) from None

    checkpoint(args.iters, numbered=False)
    return skipped
