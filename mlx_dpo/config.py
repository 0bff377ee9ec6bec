"""Configuration: mlx-lm's LoRA keys plus the preference keys, merged and checked.

Precedence is defaults < YAML file < command-line flags. Every problem is a
one-line ``ConfigError`` naming the key (and, for a misspelling, the closest
valid key), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import difflib
import types
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.optimizers as optim
import yaml
from mlx_lm.lora import CONFIG_DEFAULTS as MLX_LM_DEFAULTS
from mlx_lm.lora import build_parser as mlx_lm_parser
from mlx_lm.lora import yaml_loader  # SafeLoader that also reads 1e-5 as a float
from mlx_lm.tuner.utils import build_schedule

from . import methods
from .data import DATA_FORMATS, DATA_OPTION_KEYS
from .errors import ConfigError
from .methods import LOSS_TYPES, RL_ALIASES
from .online.advantages import ADVANTAGE_ESTIMATORS
from .online.iterative import PAIR_SELECTIONS, REFERENCE_UPDATES
from .online.policy_losses import IMPORTANCE_LEVELS, SCALE_REWARDS

DTYPES = ("auto", "float32", "bfloat16", "float16")
HUB_SPLIT_KEYS = ("train_split", "valid_split", "test_split")

DEFAULTS: dict[str, Any] = {
    **MLX_LM_DEFAULTS,
    # Keys mlx-lm reads with getattr and documents, but has no default for.
    "hf_dataset": None,
    "prompt_feature": None,
    "completion_feature": None,
    "chat_feature": None,
    "text_feature": None,
    # Preference optimisation.
    "loss_type": "dpo",
    "beta": 0.1,
    "label_smoothing": 0.0,
    "reference_model": None,
    "compile": "auto",
    "cpu_streams": "auto",
    # The family of objectives (see objectives/losses.py for each formula).
    "loss_weights": None,
    "gamma": 0.5,
    "tau": 0.05,
    "cpo_alpha": 1.0,
    "desirable_weight": 1.0,
    "undesirable_weight": 1.0,
    "center_rewards_coefficient": None,  # loss_type reward (TRL's RewardConfig; its recommended value is 0.01)
    # Your own penalty terms (objectives/terms.py) and Chain of Hindsight's phrases.
    "loss_terms": None,
    "coh_positive": "A helpful answer: ",
    "coh_negative": " An unhelpful answer: ",
    # Data layouts.
    "data_format": "auto",
    **{k: None for k in DATA_OPTION_KEYS},
    **{k: None for k in HUB_SPLIT_KEYS},
    # Learning from rewards (GRPO's family, online and iterative DPO; TRL's names and defaults).
    "online": False,
    "missing_eos_penalty": None,
    "rounds": None,
    "samples_per_prompt": 4,
    "prompts_per_round": None,
    "epochs_per_round": None,
    "pair_selection": "best_worst",
    "reference_update": "base",
    "rl": None,
    "reward_funcs": None,
    "reward_weights": None,
    "reward_model": None,
    "judge": None,
    "num_generations": 8,
    "num_iterations": 1,
    "scale_rewards": "group",
    "advantage_estimator": "group",
    "normalize_advantages": False,
    "kl_in_reward": False,
    "epsilon": 0.2,
    "epsilon_high": None,
    "importance_sampling_level": "token",
    "max_prompt_length": 512,
    "max_completion_length": 256,
    "temperature": 1.0,
    "fast_decode": "auto",
    "top_p": 1.0,
    "top_k": 0,
    "min_p": None,
    "mask_truncated_completions": False,
    "overlong_buffer": None,
    # Reliability.
    "resume": False,
    "skip_nonfinite": False,
    # Speed and memory.
    "dtype": "auto",
    "precompute_reference": False,
    "prefix_sharing": "auto",
    "pad_to_multiple": 1,
    "logits_chunk_size": None,
}

LORA_PARAMETER_KEYS = {"rank", "scale", "dropout", "keys"}
LR_SCHEDULE_KEYS = {"name", "arguments", "warmup", "warmup_init"}


def _closest(key: str, valid: Any) -> str:
    hit = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{hit[0]}'?)" if hit else ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# key -> (check, what a valid value looks like)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str) and v != "", "a hub id or a local path"),
    "data": (lambda v: isinstance(v, str) and v != "", "a folder or a hub dataset id"),
    "train": (lambda v: isinstance(v, bool), "true or false"),
    "test": (lambda v: isinstance(v, bool), "true or false"),
    "fine_tune_type": (lambda v: v in ("lora", "dora", "full"), "one of lora, dora, full"),
    "optimizer": (lambda v: v in ("adam", "adamw", "muon", "sgd", "adafactor"), "one of adam, adamw, muon, sgd, adafactor"),
    "optimizer_config": (lambda v: isinstance(v, dict), "a mapping of optimizer name to its arguments"),
    "seed": (_is_int, "an integer"),
    "num_layers": (lambda v: _is_int(v) and (v == -1 or v > 0), "a positive integer or -1 for all"),
    "batch_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "iters": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "val_batches": (lambda v: _is_int(v) and (v == -1 or v >= 0), "a non-negative integer or -1 for all"),
    "test_batches": (lambda v: _is_int(v) and (v == -1 or v >= 0), "a non-negative integer or -1 for all"),
    "learning_rate": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "steps_per_report": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "steps_per_eval": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "save_every": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "resume_adapter_file": (_opt(lambda v: isinstance(v, str)), "a path to an adapters .safetensors file"),
    "adapter_path": (lambda v: isinstance(v, str), "a folder path (\"\" with test only: no adapters)"),
    "max_seq_length": (lambda v: _is_int(v) and v > 1, "an integer > 1"),
    "grad_checkpoint": (lambda v: isinstance(v, bool), "true or false"),
    "grad_accumulation_steps": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "clear_cache_threshold": (lambda v: _is_int(v) and v >= 0, "a size in bytes"),
    "lr_schedule": (_opt(lambda v: isinstance(v, dict)), "a mapping with name and arguments"),
    "lora_parameters": (lambda v: isinstance(v, dict), "a mapping with rank, scale, dropout"),
    "mask_prompt": (lambda v: isinstance(v, bool), "true or false"),
    "report_to": (_opt(lambda v: isinstance(v, str)), "e.g. wandb"),
    "project_name": (_opt(lambda v: isinstance(v, str)), "a name"),
    "trust_remote_code": (lambda v: isinstance(v, bool), "true or false"),
    "config": (_opt(lambda v: isinstance(v, str)), "a path"),
    "hf_dataset": (_opt(lambda v: isinstance(v, (dict, list))), "a mapping or a list of mappings"),
    "loss_type": (
        lambda v: v in LOSS_TYPES or (isinstance(v, list) and v and all(t in LOSS_TYPES for t in v)),
        "one of " + ", ".join(LOSS_TYPES) + ", or a list of them",
    ),
    "loss_weights": (_opt(lambda v: isinstance(v, list) and all(_is_num(w) for w in v)), "a list of numbers, one per loss type"),
    "gamma": (_is_num, "a number (SimPO's target reward margin)"),
    "tau": (lambda v: _is_num(v) and v > 0, "a number > 0 (DiscoPOP's temperature)"),
    "cpo_alpha": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "desirable_weight": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "undesirable_weight": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "center_rewards_coefficient": (_opt(lambda v: _is_num(v) and v >= 0), "a number >= 0 (loss_type reward: pulls rewards toward 0)"),
    "loss_terms": (_opt(lambda v: isinstance(v, list) and all(isinstance(t, dict) and isinstance(t.get("fn"), str) and t["fn"] for t in v)),
                   "a list of {fn: module.function, weight: number, ...keyword arguments}"),
    "coh_positive": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty phrase"),
    "coh_negative": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty phrase"),
    "data_format": (lambda v: v in DATA_FORMATS, "one of " + ", ".join(DATA_FORMATS)),
    "beta": (lambda v: _is_num(v) and v >= 0, "a number > 0 (>= 0 for the online losses)"),
    "online": (lambda v: isinstance(v, bool), "true or false (a paired objective on the policy's own samples)"),
    "rounds": (_opt(lambda v: _is_int(v) and v >= 1), "a positive integer (iterative DPO: rounds of sample, pair, train)"),
    "samples_per_prompt": (lambda v: _is_int(v) and v >= 2, "an integer >= 2 (completions sampled per prompt each round)"),
    "pair_selection": (lambda v: v in PAIR_SELECTIONS, " or ".join(PAIR_SELECTIONS)),
    "epochs_per_round": (_opt(lambda v: _is_int(v) and v >= 1), "a positive integer (at most this many passes over a round's pairs; unset: iters steps)"),
    "prompts_per_round": (_opt(lambda v: _is_int(v) and v >= 1), "a positive integer (train prompts sampled each round; unset: all)"),
    "reference_update": (lambda v: v in REFERENCE_UPDATES, " or ".join(REFERENCE_UPDATES)),
    "missing_eos_penalty": (_opt(_is_num), "a number subtracted from the reward of completions without EOS"),
    "rl": (_opt(lambda v: v in RL_ALIASES), "one of " + ", ".join(RL_ALIASES) + " (axolotl's name for the method)"),
    "reward_funcs": (_opt(lambda v: isinstance(v, list) and v and all(isinstance(f, str) and f for f in v)),
                     'a list of "module.function" names (a module file beside the config, or importable) or built-ins'),
    "reward_weights": (_opt(lambda v: isinstance(v, list) and all(_is_num(w) for w in v)),
                       "a list of numbers, one per reward function, then one per reward model"),
    "judge": (_opt(lambda v: isinstance(v, dict)), "a mapping: url or model, mode (pointwise | pairwise), template, timeout, retries, concurrency"),
    "reward_model": (_opt(lambda v: (isinstance(v, str) and v) or (isinstance(v, list) and v and all(isinstance(f, str) and f for f in v))),
                     "a reward model's folder (trained with loss_type: reward), or a list of them"),
    "num_generations": (lambda v: _is_int(v) and v >= 2, "an integer >= 2 (completions per prompt)"),
    "num_iterations": (lambda v: _is_int(v) and v >= 1, "a positive integer (optimizer steps per generation batch)"),
    "scale_rewards": (lambda v: v in SCALE_REWARDS, "one of " + ", ".join(SCALE_REWARDS)),
    "advantage_estimator": (lambda v: v in ADVANTAGE_ESTIMATORS, "one of " + ", ".join(ADVANTAGE_ESTIMATORS) + " (GRPO's group baseline, RLOO, REINFORCE++)"),
    "normalize_advantages": (lambda v: isinstance(v, bool), "true or false (advantage_estimator rloo: whiten over the batch)"),
    "kl_in_reward": (lambda v: isinstance(v, bool), "true or false (beta x the summed log-ratio to the reference comes off the reward)"),
    "epsilon": (lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    "epsilon_high": (_opt(lambda v: _is_num(v) and v > 0), "a number > 0 (default: epsilon)"),
    "importance_sampling_level": (lambda v: v in IMPORTANCE_LEVELS, "one of " + ", ".join(IMPORTANCE_LEVELS)),
    "max_prompt_length": (_opt(lambda v: _is_int(v) and v > 0), "a positive integer (longer prompts keep their end)"),
    "max_completion_length": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "temperature": (lambda v: _is_num(v) and v >= 0, "a number >= 0 (0: greedy)"),
    "fast_decode": (lambda v: isinstance(v, bool) or v == "auto", "auto, true or false"),
    "top_p": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "a non-negative integer (0: off)"),
    "min_p": (_opt(lambda v: _is_num(v) and 0 <= v < 1), "a number in [0, 1)"),
    "mask_truncated_completions": (lambda v: isinstance(v, bool), "true or false"),
    "overlong_buffer": (_opt(lambda v: _is_int(v) and v > 0), "a positive integer (DAPO's soft over-long buffer, in tokens)"),
    "label_smoothing": (lambda v: _is_num(v) and 0 <= v < 0.5, "a number in [0, 0.5)"),
    "reference_model": (_opt(lambda v: isinstance(v, str) and v != ""), "a hub id or a local path"),
    "compile": (lambda v: isinstance(v, bool) or v == "auto", "auto, true or false"),
    "cpu_streams": (lambda v: v == "auto" or (_is_int(v) and v >= 1), "auto or a positive integer"),
    "dtype": (lambda v: v in DTYPES, "one of " + ", ".join(DTYPES)),
    "precompute_reference": (lambda v: isinstance(v, bool), "true or false"),
    "prefix_sharing": (lambda v: isinstance(v, bool) or v == "auto", "auto, true or false"),
    "resume": (lambda v: isinstance(v, bool), "true or false"),
    "skip_nonfinite": (lambda v: isinstance(v, bool), "true or false"),
    "pad_to_multiple": (lambda v: _is_int(v) and v > 0, "a positive integer (1: pad to the batch maximum)"),
    "logits_chunk_size": (_opt(lambda v: _is_int(v) and v >= 0), "a non-negative integer (0: off; unset: auto)"),
}
for _k in ("prompt_feature", "completion_feature", "chat_feature", "text_feature", *DATA_OPTION_KEYS, *HUB_SPLIT_KEYS):
    RULES[_k] = (_opt(lambda v: isinstance(v, str)), "a string")


def validate(cfg: dict[str, Any]) -> None:
    """Raise ``ConfigError`` for the first unknown key, wrong type or out-of-range value."""
    for key, value in cfg.items():
        if key not in DEFAULTS:
            raise ConfigError(f"unknown config key '{key}'{_closest(key, DEFAULTS)}")
        check, want = RULES.get(key, (lambda v: True, ""))
        if not check(value):
            raise ConfigError(f"invalid value for '{key}': {value!r} (expected {want})")
    lora = cfg.get("lora_parameters") or {}
    for key, value in lora.items():
        if key not in LORA_PARAMETER_KEYS:
            hint = " (mlx-lm uses 'scale', the multiplier itself, not 'alpha')" if key == "alpha" else _closest(key, LORA_PARAMETER_KEYS)
            raise ConfigError(f"unknown key 'lora_parameters.{key}'{hint}")
    for key, check, want in (
        ("rank", lambda v: _is_int(v) and v > 0, "a positive integer"),
        ("scale", _is_num, "a number"),
        ("dropout", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("keys", lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v), "a list of layer names"),
    ):
        if key in lora and not check(lora[key]):
            raise ConfigError(f"invalid value for 'lora_parameters.{key}': {lora[key]!r} (expected {want})")
    methods.check(cfg)
    save_every, accumulate = cfg.get("save_every"), cfg.get("grad_accumulation_steps")
    if _is_int(save_every) and _is_int(accumulate) and accumulate > 0 and save_every % accumulate:
        raise ConfigError(
            f"invalid value for 'save_every': {save_every} (must be a multiple of grad_accumulation_steps="
            f"{accumulate}, so no checkpoint falls inside an accumulation)"
        )
    schedule = cfg.get("lr_schedule")
    if schedule:
        for key in schedule:
            if key not in LR_SCHEDULE_KEYS:
                raise ConfigError(f"unknown key 'lr_schedule.{key}'{_closest(key, LR_SCHEDULE_KEYS)}")
        _check_schedule(schedule)


def flatten_trl_block(cfg: dict[str, Any]) -> dict[str, Any]:
    """axolotl nests TRL's keys under ``trl:``; read them as top-level keys (a key set twice is an error)."""
    block = cfg.pop("trl", None)
    if block is None:
        return cfg
    if not isinstance(block, dict):
        raise ConfigError(f"invalid value for 'trl': {block!r} (expected a mapping of TRL keys)")
    for key, value in block.items():
        if key not in DEFAULTS:
            raise ConfigError(f"unknown config key 'trl.{key}'{_closest(key, DEFAULTS)}")
        if key in cfg and cfg[key] != value:
            raise ConfigError(f"'{key}' is set both at the top level and under 'trl:' with different values")
        cfg[key] = value
    return cfg


def _check_schedule(schedule: dict) -> None:
    """Build the schedule once (as mlx-lm will) so a bad name or argument list fails here, in one line."""
    name = schedule.get("name")
    if not isinstance(name, str) or not callable(getattr(optim.schedulers, name, None)) or name.startswith("_"):
        known = [n for n in dir(optim.schedulers) if n.endswith("_decay") or n.endswith("_schedule")]
        raise ConfigError(f"invalid value for 'lr_schedule.name': {name!r}{_closest(str(name), known)} (one of {', '.join(known)})")
    args = schedule.get("arguments")
    if not isinstance(args, list) or not args or not all(_is_num(a) for a in args):
        raise ConfigError(f"invalid value for 'lr_schedule.arguments': {args!r} (expected a list of numbers, the first the initial rate)")
    for key in ("warmup", "warmup_init"):
        if key in schedule and not (_is_num(schedule[key]) and schedule[key] >= 0):
            raise ConfigError(f"invalid value for 'lr_schedule.{key}': {schedule[key]!r} (expected a number >= 0)")
    try:
        build_schedule(schedule)(0)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid 'lr_schedule' for {name}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    """mlx-lm's LoRA flags, plus the preference ones; every default is None so the file wins."""
    parser = mlx_lm_parser()
    parser.prog = "mlx_dpo.lora"
    parser.description = "LoRA, DoRA or full fine-tuning with DPO, its family, or SFT in MLX."
    parser.add_argument("--loss-type", type=str, choices=LOSS_TYPES, help="Training objective (default: dpo); a list only in the YAML file.")
    parser.add_argument("--data-format", type=str, help="Dataset layout (default: auto-detect per file).")
    parser.add_argument("--beta", type=float, help="DPO temperature β (default: 0.1).")
    parser.add_argument("--label-smoothing", type=float, help="Conservative DPO ε in [0, 0.5) (default: 0).")
    parser.add_argument("--reference-model", type=str, help="Separate frozen reference model (default: the policy without adapters).")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="Do not mx.compile the training step (auto: compiled on a GPU only).")
    parser.add_argument("--cpu-streams", type=int, help="CPU streams a batch's rows are split over (default auto: 2 on a CPU with 2+ cores).")
    parser.add_argument("--dtype", type=str, choices=DTYPES, help="Training dtype (auto: float32 on a CPU, the model's own on a GPU).")
    parser.add_argument("--resume", action="store_true", help="Continue from the checkpoint in adapter_path (weights, optimizer, step).")
    parser.add_argument("--skip-nonfinite", action="store_true", help="Skip batches whose loss or gradient is NaN/inf instead of stopping.")
    parser.add_argument("--online", action="store_true", help="Train the paired objective on the policy's own samples, paired by reward_funcs.")
    parser.add_argument("--precompute-reference", action="store_true", help="Compute reference log-probs once and cache them on disk.")
    parser.add_argument("--prefix-sharing", type=lambda v: {"true": True, "false": False}.get(v.lower(), v.lower()), choices=["auto", True, False],
                        help="Run each prompt once for its pair or group: auto (default), true or false.")
    parser.add_argument("--pad-to-multiple", type=int, help="Pad batches to a multiple of this length (default 1).")
    parser.add_argument("--logits-chunk-size", type=int, help="Positions per chunk of the vocabulary projection (0: off).")
    parser.set_defaults(**{a.dest: None for a in parser._actions if a.dest != "help"})
    return parser


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.load(f, yaml_loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def merge_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The user's keys over the defaults (and the method's own defaults), checked."""
    cfg = dict(cfg)
    methods.settle(cfg)
    merged = {**DEFAULTS, **methods.method_defaults(cfg), **cfg}
    if isinstance(merged.get("lora_parameters"), dict):
        merged["lora_parameters"] = {**DEFAULTS["lora_parameters"], **merged["lora_parameters"]}
    validate(merged)
    return merged


def load_config(argv: Optional[list[str]] = None, overrides: Optional[dict] = None) -> types.SimpleNamespace:
    """Parse flags, read the YAML they name, merge over the defaults and validate."""
    flags = vars(build_parser().parse_args(argv))
    cfg: dict[str, Any] = {}
    if flags.get("config"):
        cfg.update(flatten_trl_block(read_yaml(flags["config"])))
        validate(cfg)  # before defaults hide a misspelt key
    cfg.update({k: v for k, v in flags.items() if v is not None})
    cfg.update(overrides or {})
    merged = merge_config(cfg)
    args = types.SimpleNamespace(**merged)
    args._explicit = set(cfg)  # keys the user set (file, flags or overrides), vs defaults
    return args


def public(args: types.SimpleNamespace) -> dict[str, Any]:
    """The config keys of ``args`` (no private bookkeeping), e.g. for adapter_config.json."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}
