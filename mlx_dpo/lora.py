"""``python -m mlx_dpo.lora --config dpo.yaml``: build everything and call the trainer.

Mirrors ``mlx_lm.lora``: same keys, same adapter folder, same LoRA layers; the
objective is chosen by ``loss_type``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import types
from functools import partial
from pathlib import Path
from typing import Optional

from . import _blas
from .config import ConfigError, load_config, public

import mlx.core as mx  # noqa: E402  (after the BLAS preload in mlx_dpo/__init__)
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.tuner.callbacks import TrainingCallback, get_reporting_callbacks  # noqa: E402
from mlx_lm.tuner.utils import (  # noqa: E402
    build_schedule,
    linear_to_lora_layers,
    load_adapters,
    print_trainable_parameters,
)
from mlx_lm.utils import load  # noqa: E402

from .batching import iterate_batches, padding_fraction  # noqa: E402
from .data import DATA_OPTION_KEYS, DataError, load_datasets  # noqa: E402
from .objectives import confidence_supported, data_kind, is_online, make_loss, needs_reference  # noqa: E402
from .logps import auto_chunk_size  # noqa: E402
from .loss_terms import LossTermError  # noqa: E402
from .prefix import resolve_prefix_sharing  # noqa: E402
from .rollout import SamplingParams  # noqa: E402
from .streams import resolve_streams, use_streams  # noqa: E402
from .reference import cached_reference, has_adapters, make_reference, weights_fingerprint  # noqa: E402
from .checkpoint import ADAPTERS, STATE, atomic_write_json, restore, save_checkpoint, state_file_for  # noqa: E402
from .metrics_log import MetricsLogger  # noqa: E402
from .trainer import (  # noqa: E402
    BatchSourceError,
    CallbackList,
    NonFiniteError,
    TrainingArgs,
    TrainingInterrupted,
    evaluate,
    train,
)

OPTIMIZERS = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "muon": optim.Muon,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
}


def _hub_errors() -> tuple[type, ...]:
    from huggingface_hub import errors

    names = ("HFValidationError", "LocalEntryNotFoundError", "RepositoryNotFoundError", "GatedRepoError",
             "RevisionNotFoundError", "EntryNotFoundError", "HfHubHTTPError", "OfflineModeIsEnabled")
    return tuple(getattr(errors, n) for n in names if hasattr(errors, n))


def load_model(path: str, args: types.SimpleNamespace, what: str = "model", **kwargs):
    """``mlx_lm.load`` with a one-line error for a path that is neither a folder nor a reachable hub model."""
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(f"{what} folder '{path}' has no config.json (is it a Hugging Face model folder?)")
    try:
        return load(
            str(local) if local.is_dir() else path,
            tokenizer_config={"trust_remote_code": args.trust_remote_code},
            trust_remote_code=args.trust_remote_code,
            **kwargs,
        )
    except _hub_errors() as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot load {what} '{path}': no such local folder, and the hub did not provide it ({reason})"
        ) from None


def rank0_print(*args) -> None:
    if mx.distributed.init().rank() == 0:
        print(*args, flush=True)


def build_optimizer(args: types.SimpleNamespace) -> optim.Optimizer:
    lr = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
    extra = (args.optimizer_config or {}).get(args.optimizer, {}) or {}
    return OPTIMIZERS[args.optimizer](learning_rate=lr, **extra)


def setup_trainable(model: nn.Module, args: types.SimpleNamespace) -> None:
    """Freeze the model, then add LoRA/DoRA layers or unfreeze the last layers (as mlx-lm)."""
    model.freeze()
    n_layers = len(model.layers)
    if args.num_layers > n_layers:
        raise ConfigError(f"invalid value for 'num_layers': {args.num_layers} (the model has {n_layers} layers)")
    if args.fine_tune_type == "full":
        for layer in model.layers[-max(args.num_layers, 0):]:
            layer.unfreeze()
        args.lora_parameters = None
    else:
        linear_to_lora_layers(model, args.num_layers, args.lora_parameters, use_dora=args.fine_tune_type == "dora")
    print_trainable_parameters(model)


def resume_file(args: types.SimpleNamespace) -> Optional[Path]:
    """The adapter file to resume from: ``resume`` means this adapter_path's latest checkpoint."""
    if args.resume:
        path = Path(args.adapter_path) / ADAPTERS
        if not path.is_file() or not state_file_for(path).is_file():
            raise ConfigError(f"nothing to resume: no checkpoint ({ADAPTERS} + {STATE}) in '{args.adapter_path}'")
        return path
    if args.resume_adapter_file is not None:
        path = Path(args.resume_adapter_file)
        if not path.is_file():
            raise ConfigError(f"resume_adapter_file not found: {path}")
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


def load_reference(args: types.SimpleNamespace, model: nn.Module) -> Optional[nn.Module]:
    """The separate frozen reference model, or None to bypass the policy's adapters (or where
    the objective has no reference: GRPO's family has one only with ``beta > 0``)."""
    if not (needs_reference(args.loss_type) or (is_online(args.loss_type) and args.beta > 0)):
        return None
    path = args.reference_model
    if path is None and args.fine_tune_type == "full":
        rank0_print("Full fine-tuning: loading a frozen copy of the model as the reference.")
        path = args.model
    if path is None:
        if not has_adapters(model):
            raise ConfigError(
                "the default reference bypasses the adapters, but the model has none: set 'reference_model'"
            )
        return None
    rank0_print(f"Loading reference model {path}")
    ref, _ = load_model(path, args, what="reference_model")
    ref.freeze()
    ref.eval()
    return ref


def resolve_dtype(args: types.SimpleNamespace) -> Optional[mx.Dtype]:
    """The training dtype: ``auto`` is float32 on a CPU (only float32 matmuls use the
    fast BLAS there: ~10x faster than bfloat16) and the model's own dtype on a GPU."""
    if args.dtype == "auto":
        on_cpu = mx.default_device() == mx.cpu
        rank0_print(
            "[INFO] dtype auto: "
            + ("training in float32 on the CPU (float32 matmuls use BLAS, half precision does not)." if on_cpu else "keeping the model's own dtype on the GPU.")
        )
        return mx.float32 if on_cpu else None
    return getattr(mx, args.dtype)


def cpu_parallelism(args: types.SimpleNamespace) -> None:
    """Resolve ``compile`` and ``cpu_streams`` (both ``auto``) for this device, in one info line.

    On a CPU a compiled step computes no faster, and retraces at every new batch shape (about
    2 s a step on SmolLM2); two streams keep both cores busy (``streams.py``; BENCHMARKS.md).
    """
    on_cpu = mx.default_device() == mx.cpu
    args._compile_update = args.compile is not False  # fixed shapes: traced once, fused Adam
    if args.compile == "auto":
        args.compile = not on_cpu
    try:
        n = resolve_streams(args.cpu_streams, args.compile, mx.distributed.init().size(), on_cpu)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    threads = use_streams(n, pack_head=not args.compile)
    if on_cpu:
        blas = f" (BLAS: {threads} thread{'s' if threads != 1 else ''}{' each' if n > 1 else ''})" if threads else ""
        where = f"each batch's rows split over {n} parallel streams" if n > 1 else "one stream"
        rank0_print(f"[INFO] CPU: {where}{blas}; training step {'compiled' if args.compile else 'not compiled'}.")


def cast(model: Optional[nn.Module], dtype: Optional[mx.Dtype]) -> None:
    if model is not None and dtype is not None:
        model.set_dtype(dtype)  # floating parameters only: quantized weights stay packed


def prefix_sharing(args: types.SimpleNamespace, model: nn.Module, sets: dict, reference_model: Optional[nn.Module] = None) -> bool:
    """Whether batches run each prompt once (``prefix_sharing``), with one info line when it is off."""
    if data_kind(args.loss_type) in ("sft", "coh") or args.prefix_sharing is False:
        return False
    data = sets.get("train") or sets.get("test") or []
    if is_online(args.loss_type) or args.online or args.rounds:
        lengths = [len(p.ids) for p in data]
    else:
        lengths = [ex[0][1] for ex in data]
    mean = float(np.mean(lengths)) if lengths else 0.0
    on, why = resolve_prefix_sharing(args.prefix_sharing, model, mean, reference_model, args.grad_checkpoint)
    if why:
        rank0_print(f"[INFO] {why}")
    return on


def with_reference_logps(args, sets: dict, reference, fingerprint_model: nn.Module, pad_id: int, share: bool = False) -> dict:
    """Replace each preference split by one carrying cached reference log-probs."""
    fp = weights_fingerprint(fingerprint_model)
    cache_dir = Path(args.adapter_path) / "reference_cache"
    return {
        split: cached_reference(reference, ds, cache_dir, split, fp, args.batch_size, pad_id, share_prefix=share) if ds else ds
        for split, ds in sets.items()
    }


# What an adapter was trained with and a test of it must reuse, unless set again.
INHERITED_KEYS = (
    "loss_type", "loss_weights", "fine_tune_type", "beta", "label_smoothing", "reference_model",
    "gamma", "tau", "cpo_alpha", "desirable_weight", "undesirable_weight",
    "loss_terms", "coh_positive", "coh_negative", "reward_funcs", "reward_weights", "num_generations", "scale_rewards", "epsilon", "epsilon_high",
    "importance_sampling_level", "max_completion_length", "temperature", "top_p", "top_k", "min_p",
    "mask_truncated_completions", "overlong_buffer", "online", "missing_eos_penalty",
    "rounds", "samples_per_prompt", "prompts_per_round", "epochs_per_round", "pair_selection", "reference_update",
)


def sampling_params(args: types.SimpleNamespace) -> SamplingParams:
    """How every online method samples completions (GRPO, online DPO, iterative DPO's rounds)."""
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p or 0.0, max_tokens=args.max_completion_length)


def user_code_dirs(args: types.SimpleNamespace) -> list[Path]:
    """Where ``module.function`` files (reward functions, loss terms) are looked for: beside the
    config file (for ``--test`` alone, also beside the one the adapter was trained with), then in
    the working directory."""
    configs = [args.config, getattr(args, "_trained_config", None)]
    return [Path(c).resolve().parent for c in configs if c] + [Path.cwd()]


def find_reward_funcs(args: types.SimpleNamespace) -> list:
    """The reward functions, resolved before any training (a misspelt name fails in the first second);
    their module files are looked up in ``user_code_dirs``."""
    from .rewards import RewardError, load_reward_funcs

    if not args.reward_funcs:
        what = "online: true" if args.online else "rounds" if args.rounds else f"loss_type {args.loss_type}"
        raise ConfigError(f"{what} learns from rewards: set 'reward_funcs' (e.g. [\"rewards.my_reward\"])")
    dirs = user_code_dirs(args)
    options = {"max_completion_length": args.max_completion_length, "overlong_buffer": args.overlong_buffer}
    try:
        return load_reward_funcs(args.reward_funcs, dirs, options)
    except RewardError as e:
        raise ConfigError(str(e)) from None


def online_parts(
    args: types.SimpleNamespace, model: nn.Module, tokenizer, reference_model: Optional[nn.Module] = None,
    chunk: int = 0, share: bool = False,
) -> tuple:
    """For the online losses: the rollout batch source and its loss, and the reward functions' check.

    The reward functions are resolved before any training (a misspelt name fails in the first
    second); their module files are looked up beside the config file, then in the working directory.
    """
    from .online import OnlineArgs, make_online_loss, make_rollout_source, token_reference

    funcs = find_reward_funcs(args)
    sampling = sampling_params(args)
    online = OnlineArgs(
        num_generations=args.num_generations, num_iterations=args.num_iterations,
        grad_accumulation_steps=args.grad_accumulation_steps, sampling=sampling,
        reward_weights=args.reward_weights, scale_rewards=args.scale_rewards,
        mask_truncated_completions=args.mask_truncated_completions, beta=args.beta, loss_type=args.loss_type,
        chunk_size=chunk, share_prefix=share,
    )
    reference = None
    if args.beta > 0:  # ``reference_model``: the separate one, or None to bypass the adapters
        reference = token_reference(model, reference_model, sampling.temperature or 1.0, chunk)
    batches = make_rollout_source(model, tokenizer, funcs, online, reference)
    loss_fn = make_online_loss(online, args.epsilon, args.epsilon_high, args.importance_sampling_level, args.max_completion_length)
    return batches, loss_fn


def find_loss_terms(args: types.SimpleNamespace) -> list:
    """The configured loss terms, found before anything loads (a misspelt name fails in the first
    second). Module files are looked up in ``user_code_dirs``."""
    if not args.loss_terms:
        return []
    from .loss_terms import load_loss_terms

    try:
        return load_loss_terms(args.loss_terms, user_code_dirs(args))
    except LossTermError as e:
        raise ConfigError(str(e)) from None


def online_pair_source(args: types.SimpleNamespace, model: nn.Module, tokenizer, share: bool = False):
    """``online: true``: the batch source that samples two completions per prompt and pairs them by reward."""
    from .online_pairs import OnlinePairArgs, make_pair_rollout_source

    funcs = find_reward_funcs(args)
    sampling = sampling_params(args)
    online = OnlinePairArgs(sampling=sampling, reward_weights=args.reward_weights,
                            missing_eos_penalty=args.missing_eos_penalty, share_prefix=share)
    return make_pair_rollout_source(model, tokenizer, funcs, online)


class RoundsRun:
    """``rounds: N``: the data of each round (sampled, scored, paired, with its reference log-probs)
    and the trainer called once per round, steps counted over the whole run (see iterative.py)."""

    def __init__(self, args, model, tokenizer, sets: dict, base_reference, pad_id: int, chunk: int):
        from .iterative import RoundArgs

        self.args, self.model, self.tokenizer, self.sets = args, model, tokenizer, sets
        self.base_reference, self.pad_id, self.chunk = base_reference, pad_id, chunk
        self.funcs = find_reward_funcs(args)
        sampling = sampling_params(args)
        self.round_args = RoundArgs(samples_per_prompt=args.samples_per_prompt, pair_selection=args.pair_selection,
                                    sampling=sampling, reward_weights=args.reward_weights,
                                    missing_eos_penalty=args.missing_eos_penalty,
                                    batch_size=args.batch_size, seed=args.seed)

    def policy_reference(self, batch: dict) -> mx.array:
        """The policy as it stands (dropout off), without gradient: the per-round reference."""
        from .prefix import sequence_logps

        training = self.model.training
        self.model.eval()
        try:
            return mx.stop_gradient(sequence_logps(self.model, batch, self.chunk)[0])
        finally:
            self.model.train(training)

    def data(self, k: Optional[int], split: str):
        """Round ``k``'s pairs for ``split`` (``k`` None: the final test pairs), with reference log-probs."""
        from .iterative import pairs_dataset, round_pairs, round_reference, sample_round_pairs

        prompts = self.sets.get(split)
        if not prompts:
            return None
        n = self.args.prompts_per_round
        if split == "train" and n and n < len(prompts):  # a fresh seeded subset each round
            pick = np.sort(np.random.default_rng((self.args.seed, k)).choice(len(prompts), n, replace=False))
            prompts = [prompts[i] for i in pick]
        folder = Path(self.args.adapter_path) / (f"round_{k}" if k is not None else "test")
        pairs = round_pairs(folder, split, lambda: sample_round_pairs(
            self.model, self.tokenizer, self.funcs, prompts, self.round_args, k or self.args.rounds + 1, split,
            label=None if k is not None else "Test"))
        dataset = pairs_dataset(pairs, self.args.max_seq_length)
        rank0_print(f"Round {k if k is not None else 'test'}: {len(dataset)} {split} pairs from {len(prompts)} prompts "
                    f"(written to {folder})")
        if not len(dataset):
            return dataset
        per_round = k is not None and self.args.reference_update == "per_round"
        reference = self.policy_reference if per_round else self.base_reference
        return round_reference(folder, split, dataset, reference, self.args.batch_size, self.pad_id)

    def train(self, optimizer, loss_fn, batches, training_args: TrainingArgs, callback, start: int) -> None:
        from dataclasses import replace

        from .iterative import train_rounds

        iters = self.args.iters

        def train_round(k: int, train_set, valid_set, first: int, last: int) -> None:
            offset = (k - 1) * iters  # each round's batch order starts afresh; a resume skips within it
            full_batches = len(train_set or ()) // self.args.batch_size
            steps = iters if full_batches else 0
            if self.args.epochs_per_round:  # a round with few pairs must not go over them many times
                steps = min(iters, self.args.epochs_per_round * full_batches)
            steps -= steps % self.args.grad_accumulation_steps  # no accumulated gradient left unapplied
            if steps < 1:
                rank0_print(f"[INFO] round {k}: {len(train_set or ())} pairs, too few for a step of batch_size {self.args.batch_size}: nothing trained")
            elif first < offset + steps:
                shifted = lambda ds, bs, **kw: batches(ds, bs, **{**kw, "skip": max(kw.get("skip", 0) - offset, 0)})  # noqa: E731
                train(self.model, optimizer, loss_fn, train_set, valid_set or None, shifted,
                      replace(training_args, iters=offset + steps), callback, first)
            if offset + steps < last and mx.distributed.init().rank() == 0:  # the round is done: the next resumes after it
                save_checkpoint(self.model, optimizer, Path(training_args.adapter_file), last, True)

        def data(k: int, split: str):
            try:
                return self.data(k, split)
            except KeyboardInterrupt:  # Ctrl-C while sampling: the last round's checkpoint is the place to resume
                if k > 1:
                    raise TrainingInterrupted((k - 1) * iters, signal.SIGINT, Path(training_args.adapter_file)) from None
                raise

        if start == 0:  # a fresh run: pairs a previous run left in this folder are not this policy's samples
            self.clear(["round_*", "test"])
        train_rounds(self.args.rounds, iters, start, Path(self.args.adapter_path), data, train_round)

    def clear(self, patterns: list[str]) -> None:
        """Remove earlier rounds' folders (this run writes its own)."""
        import shutil

        folder = Path(self.args.adapter_path)
        old = [d for pattern in patterns for d in folder.glob(pattern) if d.is_dir()]
        for d in old:
            shutil.rmtree(d)
        if old:
            rank0_print(f"[INFO] removed {len(old)} folder(s) of an earlier run's pairs from {folder}")


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


def load_sets(args: types.SimpleNamespace, tokenizer, splits: list[str]) -> dict:
    """The tokenized splits: ``data`` (folder or hub id), or mlx-lm's ``hf_dataset`` for SFT."""
    if args.hf_dataset:
        if data_kind(args.loss_type) != "sft":
            raise ConfigError("'hf_dataset' is mlx-lm's SFT dataset option; for preference data set 'data' to the hub id")
        from mlx_lm.tuner.datasets import load_custom_hf_dataset

        from .data import sft_examples

        loaded = dict(zip(("train", "valid", "test"), load_custom_hf_dataset(args, tokenizer)))
        return {s: sft_examples(loaded[s], args.max_seq_length, args.mask_prompt)[0] if len(loaded[s]) else None for s in splits}
    features = {k: getattr(args, k) for k in ("prompt_feature", "completion_feature", "chat_feature", "text_feature") if getattr(args, k)}
    options = {k: getattr(args, k) for k in DATA_OPTION_KEYS if getattr(args, k) is not None}
    hub_splits = {k: getattr(args, k) for k in ("train_split", "valid_split", "test_split") if getattr(args, k)}
    if data_kind(args.loss_type) == "prompts" or args.online or args.rounds:
        from .data import load_prompt_splits

        return load_prompt_splits(args.data, tokenizer, args.max_prompt_length, splits=splits, hub_splits=hub_splits or None)
    kind = {"sft": "sft", "kto": "kto", "pairs": "dpo", "coh": "coh"}[data_kind(args.loss_type)]
    return load_datasets(
        args.data, tokenizer, kind, args.max_seq_length, mask_prompt=args.mask_prompt, splits=splits,
        data_format=args.data_format, options=options, hub_splits=hub_splits or None,
        columns=bool(args.loss_terms), coh_phrases=(args.coh_positive, args.coh_negative), **features,
    )


def run(args: types.SimpleNamespace, training_callback: Optional[TrainingCallback] = None) -> dict:
    """Load, train and test as ``args`` say (see ``_run``); the CPU streams it turns on end with it,
    so that code run later in the same process (another run, a compiled ``train()``) starts plain."""
    try:
        return _run(args, training_callback)
    finally:
        use_streams(1)


def _run(args: types.SimpleNamespace, training_callback: Optional[TrainingCallback] = None) -> dict:
    """Load, train and/or test as ``args`` says; returns the test metrics (if tested)."""
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    if not args.train and not args.test:
        raise ConfigError("nothing to do: set 'train: true' and/or 'test: true' (or pass --train / --test)")
    world = mx.distributed.init().size()
    if args.batch_size % world:
        raise ConfigError(f"invalid value for 'batch_size': {args.batch_size} (must be divisible by the {world} processes)")
    if args.rounds and world > 1:
        raise ConfigError("'rounds' runs in one process (each round samples all its prompts there); run it without mlx.launch")
    if args.train and not args.adapter_path:
        raise ConfigError("invalid value for 'adapter_path': '' (training needs a folder to write to)")
    if not args.train:
        inherit_training_settings(args)
    terms = find_loss_terms(args)

    rank0_print(f"Loading pretrained model {args.model}")
    model, tokenizer, model_config = load_model(args.model, args, return_config=True)
    dtype = resolve_dtype(args)
    cast(model, dtype)
    cpu_parallelism(args)
    chunk = args.logits_chunk_size if args.logits_chunk_size is not None else auto_chunk_size(model_config.get("vocab_size", 0))

    rank0_print(f"Loading datasets from {args.hf_dataset or args.data} (loss_type: {args.loss_type})")
    splits = [s for s, on in (("train", args.train), ("valid", args.train), ("test", args.test)) if on]
    sets = load_sets(args, tokenizer, splits)
    if args.train and not sets.get("train"):
        raise DataError(f"no training data: {args.data} has no usable train split")
    if args.train and is_online(args.loss_type) and len(sets["train"]) < args.batch_size * args.grad_accumulation_steps:
        raise ConfigError(
            f"invalid value for 'batch_size': {args.batch_size} (one generation batch takes batch_size x "
            f"grad_accumulation_steps prompts; the train split has only {len(sets['train'])})"
        )
    if args.train and len(sets["train"]) < args.batch_size:
        raise ConfigError(f"invalid value for 'batch_size': {args.batch_size} (the train split has only {len(sets['train'])} usable examples)")
    if args.test and not sets.get("test"):
        raise DataError(f"no test data: {args.data} has no usable test split")

    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    online = is_online(args.loss_type)
    if args.train and len(sets["train"]) >= args.batch_size and not online and not args.online and not args.rounds:
        frac = padding_fraction(sets["train"], args.batch_size, args.pad_to_multiple)
        rank0_print(f"Length-grouped batches: {frac:.1%} of train token slots are padding.")
    adapter_path = Path(args.adapter_path)

    if args.train:
        setup_trainable(model, args)
    elif args.adapter_path:
        if not (adapter_path / "adapters.safetensors").is_file():
            raise ConfigError(f"no adapters to test in '{adapter_path}' (set 'adapter_path', or \"\" to test the base model)")
        load_adapters(model, str(adapter_path))
    reference_model = load_reference(args, model)
    cast(reference_model, dtype)
    share = prefix_sharing(args, model, sets, reference_model)
    batches = partial(iterate_batches, pad_id=pad_id, pad_multiple=args.pad_to_multiple, share_prefix=share)
    reference = None
    if any(ds is not None and "confidence" in getattr(ds, "fields", {}) for ds in sets.values()):
        if not confidence_supported(args.loss_type):
            raise ConfigError(
                f"the data has per-pair 'confidence' values, which act through label smoothing, but loss_type "
                f"{args.loss_type!r} does not use it (use dpo, robust, exo_pair, sigmoid_norm, simpo or cpo)"
            )
    if needs_reference(args.loss_type):
        reference = make_reference(model, reference_model, chunk)
        if args.precompute_reference and not args.rounds:  # rounds take their own, once per round
            sets = with_reference_logps(args, sets, reference, reference_model or model, pad_id, share)
            reference = None  # every batch now carries its reference log-probs
            if not args.loss_terms:  # a loss term may still ask for per-token reference log-probs
                reference_model = None  # a separate reference is no longer needed in memory
    if online:
        batches, loss_fn = online_parts(args, model, tokenizer, reference_model, chunk, share)
    else:
        if args.online:  # a paired objective on the policy's own samples: only the batch source differs
            batches = online_pair_source(args, model, tokenizer, share)
        token_ref = None
        if terms and needs_reference(args.loss_type):  # the per-token reference a term may read
            from .online import token_reference

            token_ref = token_reference(model, reference_model, 1.0, chunk)
        loss_fn = make_loss(
            args.loss_type, reference, beta=args.beta, label_smoothing=args.label_smoothing, chunk_size=chunk,
            loss_weights=args.loss_weights, gamma=args.gamma, tau=args.tau, alpha=args.cpo_alpha,
            desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
            loss_terms=terms, token_reference=token_ref,
        )

    if args.train:
        optimizer = build_optimizer(args)
        start = restore_checkpoint(model, optimizer, path) if (path := resume_file(args)) else 0
        if mx.distributed.init().rank() == 0:
            adapter_path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(adapter_path / "adapter_config.json", public(args))
        training_args = TrainingArgs(
            batch_size=args.batch_size,
            iters=args.iters,
            val_batches=args.val_batches,
            steps_per_report=args.steps_per_report,
            steps_per_eval=args.steps_per_eval,
            steps_per_save=args.save_every,
            adapter_file=str(adapter_path / "adapters.safetensors"),
            max_seq_length=args.max_seq_length,
            grad_checkpoint=args.grad_checkpoint,
            grad_accumulation_steps=args.grad_accumulation_steps,
            clear_cache_threshold=args.clear_cache_threshold,
            seed=args.seed,
            compile=args.compile,
            compile_update=args._compile_update,
            skip_nonfinite=args.skip_nonfinite,
            save_multiple=args.grad_accumulation_steps * (args.num_iterations if online else 1),
        )
        callbacks = [training_callback]
        if mx.distributed.init().rank() == 0:
            callbacks.append(MetricsLogger(adapter_path, start))
        if args.report_to:
            try:
                callbacks.append(
                    get_reporting_callbacks(args.report_to, project_name=args.project_name, log_dir=args.adapter_path, config=public(args))
                )
            except (ImportError, ValueError) as e:  # e.g. wandb not installed, an unknown service
                raise ConfigError(f"invalid value for 'report_to': {args.report_to!r} ({e})") from None
        training_callback = CallbackList(callbacks)
        if args.rounds:
            rounds = RoundsRun(args, model, tokenizer, sets, reference, pad_id, chunk)
            rank0_print(f"Training with loss_type={args.loss_type} for {args.rounds} rounds of {args.iters} iterations")
            rounds.train(optimizer, loss_fn, batches, training_args, training_callback, start)
        else:
            rank0_print(f"Training with loss_type={args.loss_type} for {args.iters} iterations")
            train(model, optimizer, loss_fn, sets["train"], sets.get("valid"), batches, training_args, training_callback, start)

    if not args.test:
        return {}
    if args.rounds:  # pairs sampled from the test prompts by the final policy, against the base reference
        rounds = RoundsRun(args, model, tokenizer, sets, reference, pad_id, chunk)
        rounds.clear(["test"])  # always the samples of the policy being tested
        sets = {**sets, "test": rounds.data(None, "test")}
        if not sets["test"]:
            raise DataError("no test pairs: every test prompt's samples scored the same (the reward cannot tell them apart)")
    metrics = evaluate(model, loss_fn, sets["test"], args.batch_size, args.test_batches, batches, "Testing")
    metrics = {k: v for k, v in metrics.items() if k not in ("weight",)}
    if data_kind(args.loss_type) in ("sft", "coh"):
        metrics["ppl"] = math.exp(metrics["loss"])
    kind = data_kind(args.loss_type)
    metrics[{"pairs": "num_pairs", "prompts": "num_completions"}.get(kind, "num_examples")] = int(metrics.pop("count"))
    metrics["num_tokens"] = int(metrics.pop("ntoks"))
    rank0_print("Test: " + ", ".join(f"{k} {v:.7g}" for k, v in metrics.items()))
    if mx.distributed.init().rank() == 0 and args.adapter_path:
        adapter_path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(adapter_path / "test_metrics.json", metrics)
        print(f"Wrote {adapter_path / 'test_metrics.json'}")
    return metrics


def one_line(error: Exception) -> str:
    """The error's message with line breaks folded (some come from mlx-lm or the hub)."""
    return " ".join(str(error).split())


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run."""
    kept = [a for a in argv if a != "--resume"]
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", "mlx_dpo.lora", *kept, "--resume"])


def main(argv: Optional[list[str]] = None) -> None:
    """Run; user errors end in one line and exit status 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = load_config(argv)
        if line := _blas.describe():
            rank0_print(line)
        run(args)
    except (ConfigError, DataError) as e:
        print(f"mlx_dpo.lora: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as e:
        rank0_print(f"\nStopped by signal {e.signum} after step {e.step}; checkpoint saved in {e.checkpoint.parent}.")
        rank0_print(f"Resume with:\n  {resume_command(argv)}")
        sys.exit(128 + e.signum)
    except BatchSourceError as e:
        print(f"mlx_dpo.lora: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"mlx_dpo.lora: error: {one_line(e)}", file=sys.stderr)
        sys.exit(3)
    except LossTermError as e:
        print(f"mlx_dpo.lora: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("mlx_dpo.lora: stopped (Ctrl-C); checkpoints already in adapter_path are kept", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
