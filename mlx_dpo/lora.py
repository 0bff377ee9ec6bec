"""``python -m mlx_dpo.lora --config dpo.yaml``: load the model, load the data, build the method,
train and/or test.

Mirrors ``mlx_lm.lora``: the same keys, the same adapter folder, the same LoRA layers. Which
method trains is decided once, in ``methods.py``; this file puts the pieces in order.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner.callbacks import TrainingCallback, get_reporting_callbacks
from mlx_lm.tuner.utils import build_schedule

import mlx_dpo

from . import methods
from ._platform import blas
from ._platform.files import atomic_write_json
from ._platform.progress import rank0_print
from .compute import fastops
from .compute.batching import BatchSourceError, process_ranks
from .compute.forward import Forward
from .compute.logps import auto_chunk_size
from .compute.streams import blas_budget, blas_threads, cpu_stream, local_processes, resolve_streams
from .config import ConfigError, load_config, public
from .data import DataError
from .loading import (
    cast,
    load_model,
    load_reference,
    load_sets,
    peft_start,
    prepare_adapters,
    resolve_dtype,
)
from .methods import Method, Parts
from .objectives.terms import LossTermError
from .train.checkpoint import ADAPTERS, STATE, restore, state_file_for
from .train.metrics_log import MetricsLogger
from .train.trainer import (
    CallbackList,
    NonFiniteError,
    TrainingArgs,
    TrainingInterrupted,
    evaluate,
)

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD, "adafactor": optim.Adafactor}
# What an adapter was trained with and a test of it must reuse, unless set again.
INHERITED_KEYS = (
    "loss_type", "loss_weights", "fine_tune_type", "beta", "label_smoothing", "reference_model",
    "gamma", "tau", "cpo_alpha", "desirable_weight", "undesirable_weight", "center_rewards_coefficient",
    "loss_terms", "coh_positive", "coh_negative", "reward_funcs", "reward_weights", "reward_model", "judge", "num_generations", "scale_rewards", "advantage_estimator", "normalize_advantages", "kl_in_reward", "epsilon", "epsilon_high",
    "importance_sampling_level", "max_completion_length", "temperature", "top_p", "top_k", "min_p",
    "mask_truncated_completions", "overlong_buffer", "online", "missing_eos_penalty",
    "rounds", "samples_per_prompt", "prompts_per_round", "epochs_per_round", "pair_selection", "reference_update",
)


def run(args: types.SimpleNamespace, training_callback: Optional[TrainingCallback] = None) -> dict:
    """Load, train and/or test as ``args`` say; returns the test metrics (if tested)."""
    check_run(args)
    if not args.train:  # --test alone: the objective and reference the adapter was trained with
        inherit_training_settings(args)
    method = methods.choose(args, mx.distributed.init().size())
    user_code = methods.find_reward_funcs(method, args), methods.find_loss_terms(args)  # a misspelt name fails now
    np.random.seed(args.seed)
    mx.random.seed(args.seed)

    rank0_print(f"Loading pretrained model {args.model}")
    model, tokenizer, model_config = load_model(args.model, args, return_config=True)
    dtype = resolve_dtype(args)
    cast(model, dtype)
    with cpu_plan(args, model_config.get("vocab_size", 0)) as how:
        rank0_print(f"Loading datasets from {args.hf_dataset or args.data} (method: {method.name}, loss_type: {args.loss_type})")
        sets = load_sets(args, method, tokenizer)
        prepare_adapters(args, model, method.scores)
        reference_model = load_reference(args, method, model)
        cast(reference_model, dtype)
        parts = methods.build(method, args, methods.Loaded(model, tokenizer, sets, reference_model, how, *user_code), rank0_print)
        del reference_model  # build kept it only where the method still needs it
        if args.train:
            train_model(args, method, model, parts, training_callback)
        return test_model(args, method, model, parts) if args.test else {}


def check_run(args: types.SimpleNamespace) -> None:
    """What no single key can say: the run has something to do, somewhere to write, a batch every process can share."""
    if not args.train and not args.test:
        raise ConfigError("nothing to do: set 'train: true' and/or 'test: true' (or pass --train / --test)")
    try:
        process_ranks(mx.distributed.init(), args.batch_size)
    except ValueError as e:
        raise ConfigError(f"invalid value for 'batch_size': {e}") from None
    if args.train and not args.adapter_path:
        raise ConfigError("invalid value for 'adapter_path': '' (training needs a folder to write to)")


def compiled(args: types.SimpleNamespace) -> tuple[bool, bool]:
    """(compile the training step, compile the optimizer update). ``auto`` compiles the step on a
    GPU only: on a CPU a compiled step computes no faster and is traced again for every new batch
    shape. The update's shapes never change, so it is traced once and stays compiled."""
    step = args.compile if args.compile != "auto" else mx.default_device() != mx.cpu
    return step, args.compile is not False


@contextmanager
def cpu_plan(args: types.SimpleNamespace, vocab_size: int) -> Iterator[Forward]:
    """How this run computes log-probs (``Forward``), said in one info line; the BLAS threads it
    sets for its CPU streams are restored when the run ends."""
    on_cpu, step, world = mx.default_device() == mx.cpu, compiled(args)[0], mx.distributed.init()
    processes = local_processes(world.size(), world.rank())
    try:
        n = resolve_streams(args.cpu_streams, step, processes, on_cpu, mlx_dpo.wide_eval_order)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    chunk = args.logits_chunk_size if args.logits_chunk_size is not None else auto_chunk_size(vocab_size)
    budget = blas_budget(processes)
    how = Forward(chunk, tuple(cpu_stream(i) for i in range(n)) if n > 1 else (), pack_head=not step,
                  sampling_threads=budget if on_cpu and n > 1 else 0)
    with blas_threads(max(1, budget // n)) as threads:
        if on_cpu:
            each = f" (BLAS: {threads} thread{'s' if threads != 1 else ''}{' each' if n > 1 else ''})" if threads else ""
            where = f"each batch's rows split over {n} parallel streams" if n > 1 else "one stream"
            fast, built = fastops.extension()
            exp = f"vectorised ({built})" if fast is not None else f"MLX's, one element at a time ({built})"
            rank0_print(f"[INFO] CPU: {where}{each}; training step {'compiled' if step else 'not compiled'}; SiLU and exp {exp}.")
        yield how


def train_model(args: types.SimpleNamespace, method: Method, model: nn.Module, parts: Parts, callback: Optional[TrainingCallback]) -> None:
    """Train from the start or from the checkpoint to resume, writing adapter_config.json first."""
    lr = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
    optimizer = OPTIMIZERS[args.optimizer](learning_rate=lr, **((args.optimizer_config or {}).get(args.optimizer) or {}))
    path = resume_file(args)
    if path is not None and path.is_dir():  # a PEFT adapter: converted, checked against this run's LoRA layers
        path = peft_start(path, args, model)
    start = restore_checkpoint(model, optimizer, path) if path is not None else 0
    adapter_path = Path(args.adapter_path)
    rank0 = mx.distributed.init().rank() == 0
    if rank0:
        adapter_path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(adapter_path / "adapter_config.json", public(args))
    step, update = compiled(args)
    training_args = TrainingArgs(
        batch_size=args.batch_size, iters=args.iters, val_batches=args.val_batches, steps_per_report=args.steps_per_report,
        steps_per_eval=args.steps_per_eval, steps_per_save=args.save_every, adapter_file=str(adapter_path / ADAPTERS),
        grad_checkpoint=args.grad_checkpoint, grad_accumulation_steps=args.grad_accumulation_steps,
        clear_cache_threshold=args.clear_cache_threshold, seed=args.seed, compile=step, compile_update=update,
        skip_nonfinite=args.skip_nonfinite, save_multiple=parts.save_multiple,
    )
    callbacks = [callback, MetricsLogger(adapter_path, start) if rank0 else None]
    if args.report_to:
        try:
            callbacks.append(get_reporting_callbacks(args.report_to, project_name=args.project_name, log_dir=args.adapter_path, config=public(args)))
        except (ImportError, ValueError) as e:  # e.g. wandb not installed, an unknown service
            raise ConfigError(f"invalid value for 'report_to': {args.report_to!r} ({e})") from None
    rank0_print(f"Training ({method.name}) with loss_type={args.loss_type} for {parts.length(args.iters)}")
    parts.train(model, optimizer, training_args, CallbackList(callbacks), start)


def resume_file(args: types.SimpleNamespace) -> Optional[Path]:
    """The adapter file to resume from: ``resume`` means this adapter_path's latest checkpoint."""
    if args.resume:
        path = Path(args.adapter_path) / ADAPTERS
        if not path.is_file() or not state_file_for(path).is_file():
            raise ConfigError(f"nothing to resume: no checkpoint ({ADAPTERS} + {STATE}) in '{args.adapter_path}'")
        return path
    if args.resume_adapter_file is not None:
        path = Path(args.resume_adapter_file)
        if not path.is_file() and not (path / "adapter_config.json").is_file():
            raise ConfigError(f"resume_adapter_file not found: {path} (an adapters .safetensors file or a PEFT adapter folder)")
        return path
    return None


def restore_checkpoint(model: nn.Module, optimizer, path: Path) -> int:
    """Load weights (and the training state beside them, if any); the step to continue after."""
    try:
        step = restore(model, optimizer, path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if step:
        rank0_print(f"Resuming from step {step} of {path} (weights, optimizer state, schedule and data order)")
    else:
        rank0_print(f"Loading fine-tuned weights from {path} (no training state beside it: starting at step 1)")
    return step


def test_model(args: types.SimpleNamespace, method: Method, model: nn.Module, parts: Parts) -> dict:
    """The test split's metrics under TRL's names, printed and written to test_metrics.json."""
    test_set = parts.test_set()
    if not test_set:
        raise DataError("no test pairs: every test prompt's samples scored the same (the reward cannot tell them apart)")
    metrics = evaluate(model, parts.loss_fn, test_set, args.batch_size, args.test_batches, parts.batches, "Testing")
    metrics.pop("weight", None)
    if method.name in ("sft", "coh"):
        metrics["ppl"] = math.exp(metrics["loss"])
    metrics[f"num_{method.unit}"] = int(metrics.pop("count"))
    metrics["num_tokens"] = int(metrics.pop("ntoks"))
    rank0_print("Test: " + ", ".join(f"{k} {v:.7g}" for k, v in metrics.items()))
    if mx.distributed.init().rank() == 0 and args.adapter_path:
        Path(args.adapter_path).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.adapter_path) / "test_metrics.json", metrics)
        print(f"Wrote {Path(args.adapter_path) / 'test_metrics.json'}")
    return metrics


def inherit_training_settings(args: types.SimpleNamespace) -> None:
    """For ``--test`` alone: take the objective and reference from adapter_config.json."""
    path = Path(args.adapter_path) / "adapter_config.json"
    if not args.adapter_path or not path.is_file():
        return
    saved = json.loads(path.read_text())
    args._trained_config = saved.get("config")  # its folder holds the loss terms' modules
    explicit = getattr(args, "_explicit", set())
    for key in INHERITED_KEYS:
        if key in saved and key not in explicit and saved[key] != getattr(args, key):
            rank0_print(f"Testing with {key}={saved[key]!r} from {path}")
            setattr(args, key, saved[key])


def one_line(error: Exception) -> str:
    """The error's message with line breaks folded (some come from mlx-lm or the hub)."""
    return " ".join(str(error).split())


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run."""
    kept = [a for a in argv if a != "--resume"]
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", "mlx_dpo.lora", *kept, "--resume"])


def main(argv: Optional[list[str]] = None) -> None:
    """Run; user errors end in one line and exit status 2 (3 for a non-finite loss), never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = load_config(argv)
        if line := blas.describe():
            rank0_print(line)
        run(args)
    except (ConfigError, DataError, BatchSourceError, LossTermError, NonFiniteError) as e:
        print(f"mlx_dpo.lora: error: {one_line(e)}", file=sys.stderr)
        sys.exit(3 if isinstance(e, NonFiniteError) else 2)
    except TrainingInterrupted as e:
        rank0_print(f"\nStopped by signal {e.signum} after step {e.step}; checkpoint saved in {e.checkpoint.parent}.")
        rank0_print(f"Resume with:\n  {resume_command(argv)}")
        sys.exit(128 + e.signum)
    except KeyboardInterrupt as e:  # Ctrl-C while loading, or a second one (or SIGTERM) while training
        signum = getattr(e, "signum", signal.SIGINT)
        what = "Ctrl-C" if signum == signal.SIGINT else f"signal {signum}"
        print(f"mlx_dpo.lora: stopped ({what}); checkpoints already in adapter_path are kept", file=sys.stderr)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
