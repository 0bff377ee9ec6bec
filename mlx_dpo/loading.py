"""What a run loads: the model (a hub id or a folder, in its training dtype), its adapters, the
reference model, and the data splits its method reads, each failure one line."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub import errors as hub_errors
from mlx.utils import tree_flatten
from mlx_lm.tuner.datasets import load_custom_hf_dataset
from mlx_lm.tuner.utils import (
    linear_to_lora_layers,
    load_adapters,
    print_trainable_parameters,
)
from mlx_lm.utils import load

from ._platform.progress import rank0_print
from .export.peft import AdapterFormatError, from_peft
from .compute.batching import padding_fraction
from .compute.fastops import use_fast_mlps
from .compute.reference import has_adapters
from .compute.scores import HEAD, ScoreHeadError, add_score_head, load_head
from .data import (
    DATA_OPTION_KEYS,
    DataError,
    load_datasets,
    load_prompt_splits,
    sft_examples,
)
from .errors import ConfigError
from .methods import Method
from .train.checkpoint import ADAPTERS

HUB_ERRORS = tuple(getattr(hub_errors, n) for n in (
    "HFValidationError", "LocalEntryNotFoundError", "RepositoryNotFoundError", "GatedRepoError",
    "RevisionNotFoundError", "EntryNotFoundError", "HfHubHTTPError", "OfflineModeIsEnabled") if hasattr(hub_errors, n))


def load_model(path: str, args: types.SimpleNamespace, what: str = "model", **kwargs):
    """``mlx_lm.load`` with a one-line error for a path that is neither a folder nor a reachable hub model."""
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(f"{what} folder '{path}' has no config.json (is it a Hugging Face model folder?)")
    try:
        return load(str(local) if local.is_dir() else path, tokenizer_config={"trust_remote_code": args.trust_remote_code},
                    trust_remote_code=args.trust_remote_code, **kwargs)
    except HUB_ERRORS as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load {what} '{path}': no such local folder, and the hub did not provide it ({reason})") from None


def resolve_dtype(args: types.SimpleNamespace) -> Optional[mx.Dtype]:
    """The training dtype: ``auto`` is float32 on a CPU (only float32 matmuls use the
    fast BLAS there, so they are far faster than bfloat16 ones) and the model's own dtype on a GPU."""
    if args.dtype != "auto":
        return getattr(mx, args.dtype)
    on_cpu = mx.default_device() == mx.cpu
    rank0_print("[INFO] dtype auto: " + ("training in float32 on the CPU (float32 matmuls use BLAS, half precision does not)."
                                         if on_cpu else "keeping the model's own dtype on the GPU."))
    return mx.float32 if on_cpu else None


def cast(model: Optional[nn.Module], dtype: Optional[mx.Dtype]) -> None:
    """``model``'s floating parameters in ``dtype`` (quantized weights stay packed); on a CPU its
    SwiGLU MLPs take ``fastops.swiglu``. The policy and a separate reference both come here, so
    that they compute alike to the last bit."""
    if model is not None and dtype is not None:
        model.set_dtype(dtype)
    if model is not None and mx.default_device() == mx.cpu:
        use_fast_mlps(model)


def load_sets(args: types.SimpleNamespace, method: Method, tokenizer) -> dict:
    """The tokenized splits the run needs, checked against the batch size."""
    splits = [s for s, on in (("train", args.train), ("valid", args.train), ("test", args.test)) if on]
    sets = read_splits(args, method, tokenizer, splits)
    train = sets.get("train")
    if args.train and not train:
        raise DataError(f"no training data: {args.data} has no usable train split")
    if args.train and method.name == "grpo" and len(train) < args.batch_size * args.grad_accumulation_steps:
        raise ConfigError(f"invalid value for 'batch_size': {args.batch_size} (one generation batch takes batch_size x "
                          f"grad_accumulation_steps prompts; the train split has only {len(train)})")
    if args.train and len(train) < args.batch_size:
        raise ConfigError(f"invalid value for 'batch_size': {args.batch_size} (the train split has only {len(train)} usable examples)")
    if args.test and not sets.get("test"):
        raise DataError(f"no test data: {args.data} has no usable test split")
    if args.train and not method.samples:
        rank0_print(f"Length-grouped batches: {padding_fraction(train, args.batch_size, args.pad_to_multiple):.1%} of train token slots are padding.")
    return sets


def read_splits(args: types.SimpleNamespace, method: Method, tokenizer, splits: list[str]) -> dict:
    """``data`` (a folder or hub id) read as the method's records, or mlx-lm's ``hf_dataset`` for SFT."""
    if args.hf_dataset:
        if method.data != "sft":
            raise ConfigError("'hf_dataset' is mlx-lm's SFT dataset option; for preference data set 'data' to the hub id")
        loaded = dict(zip(("train", "valid", "test"), load_custom_hf_dataset(args, tokenizer)))
        return {s: sft_examples(loaded[s], args.max_seq_length, args.mask_prompt)[0] if len(loaded[s]) else None for s in splits}
    hub_splits = {k: getattr(args, k) for k in ("train_split", "valid_split", "test_split") if getattr(args, k)} or None
    if method.samples:
        return load_prompt_splits(args.data, tokenizer, args.max_prompt_length, splits=splits, hub_splits=hub_splits)
    features = {k: getattr(args, k) for k in ("prompt_feature", "completion_feature", "chat_feature", "text_feature") if getattr(args, k)}
    options = {k: getattr(args, k) for k in DATA_OPTION_KEYS if getattr(args, k) is not None}
    return load_datasets(
        args.data, tokenizer, method.data, args.max_seq_length, mask_prompt=args.mask_prompt, splits=splits,
        data_format=args.data_format, options=options, hub_splits=hub_splits,
        columns=bool(args.loss_terms) or method.scores, coh_phrases=(args.coh_positive, args.coh_negative), **features,
    )


def prepare_adapters(args: types.SimpleNamespace, model: nn.Module, scores: bool = False) -> None:
    """Training: freeze the model, then add LoRA/DoRA layers or unfreeze the last layers (as
    mlx-lm). Testing alone: load the adapters to test (none with ``adapter_path: ""``). With
    ``scores`` (a reward model) the model also gets its trainable score head, or the tested one."""
    if not args.train:
        if args.adapter_path and not (Path(args.adapter_path) / ADAPTERS).is_file():
            raise ConfigError(f"no adapters to test in '{args.adapter_path}' (set 'adapter_path', or \"\" to test the base model)")
        if args.adapter_path:
            load_adapters(model, args.adapter_path)
        if scores:
            _score_head(model, args.seed)
            if not args.adapter_path or not load_head(model, Path(args.adapter_path) / ADAPTERS):
                raise ConfigError(f"'{args.adapter_path}' holds no reward model's score head ({HEAD}): train one with loss_type: reward")
        return
    model.freeze()
    if args.num_layers > len(model.layers):
        raise ConfigError(f"invalid value for 'num_layers': {args.num_layers} (the model has {len(model.layers)} layers)")
    if args.fine_tune_type == "full":
        for layer in model.layers[-max(args.num_layers, 0):]:
            layer.unfreeze()
        args.lora_parameters = None
    else:
        try:
            linear_to_lora_layers(model, args.num_layers, args.lora_parameters, use_dora=args.fine_tune_type == "dora")
        except ValueError as e:  # mlx-lm has no DoRA form for expert (SwitchLinear) layers
            kind = getattr(model, "model_type", "this model")
            raise ConfigError(f"fine_tune_type {args.fine_tune_type} cannot adapt {kind}: {e} (use fine_tune_type: lora)") from None
    if scores:
        _score_head(model, args.seed)
    print_trainable_parameters(model)


def _score_head(model: nn.Module, seed: int) -> None:
    try:
        add_score_head(model, seed)
    except ScoreHeadError as e:
        raise ConfigError(f"loss_type reward: {e}") from None


def load_reference(args: types.SimpleNamespace, method: Method, model: nn.Module) -> Optional[nn.Module]:
    """The separate frozen reference model, or None: the policy with its adapters bypassed, or a
    method without a reference."""
    if not method.reference:
        return None
    path = args.reference_model
    if path is None and args.fine_tune_type == "full":
        rank0_print("Full fine-tuning: loading a frozen copy of the model as the reference.")
        path = args.model
    if path is None:
        if not has_adapters(model):
            raise ConfigError("the default reference bypasses the adapters, but the model has none: set 'reference_model'")
        return None
    rank0_print(f"Loading reference model {path}")
    ref, _ = load_model(path, args, what="reference_model")
    ref.freeze()
    ref.eval()
    return ref


def peft_start(path: Path, args: types.SimpleNamespace, model: nn.Module) -> Path:
    """A PEFT LoRA adapter folder (from TRL, axolotl, Unsloth) as the mlx-lm adapter file to start
    from (written to ``adapter_path/peft_start``), checked to fit this run's LoRA layers exactly."""
    try:
        folder = from_peft(path, Path(args.adapter_path) / "peft_start", len(model.layers))
    except (AdapterFormatError, OSError, KeyError) as e:
        raise ConfigError(f"resume_adapter_file {path}: {' '.join(str(e).split())}") from None
    config = json.loads((folder / "adapter_config.json").read_text())
    theirs, ours = mx.load(str(folder / ADAPTERS)), dict(tree_flatten(model.trainable_parameters()))
    scales = {float(m.scale) for _, m in model.named_modules() if "lora_a" in m}
    lora = config["lora_parameters"]
    fits = set(theirs) == set(ours) and all(theirs[k].shape == ours[k].shape for k in ours)
    if not fits or not all(abs(s - lora["scale"]) <= 1e-6 * abs(s) for s in scales):
        raise ConfigError(
            f"resume_adapter_file {path}: its LoRA (rank {lora['rank']}, scale {lora['scale']:g}, the last "
            f"{config['num_layers']} layers, keys {lora['keys']}) does not match this run's: set lora_parameters "
            "(rank, scale, keys) and num_layers to match it"
        )
    return folder / ADAPTERS

