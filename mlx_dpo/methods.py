"""The one decision: which training method a configuration asks for, and what that method needs.

| method | chosen by | data | batches | loss |
|---|---|---|---|---|
| ``sft`` | ``loss_type: sft`` | SFT records | padded records | next-token loss |
| ``offline_dpo`` | a paired ``loss_type`` (dpo, ipo, simpo, ``[dpo, sft]``, ...) | pairs | length-grouped pairs | the paired objective |
| ``kto`` | ``loss_type: kto`` | unpaired examples | examples and their KL rows | KTO |
| ``coh`` | ``loss_type: coh`` | pairs, as hindsight sequences | padded sequences | next-token loss on the answers |
| ``reward`` | ``loss_type: reward`` | pairs | length-grouped pairs | Bradley-Terry on a score head (a reward model) |
| ``grpo`` | ``loss_type`` grpo, bnpo, dr_grpo or dapo (``rl: grpo``) | prompts | rollouts: G samples a prompt, advantages | GRPO's policy loss |
| ``online_dpo`` | ``online: true`` with a paired loss | prompts | two samples a prompt, paired by reward | the paired objective |
| ``iterative_dpo`` | ``rounds: N`` with a paired loss | prompts | each round's sampled pairs | the paired objective |

``choose`` names the method once; ``settle`` and ``check`` are the configuration's rules that
depend on it; ``build`` makes its parts (batches, loss, data sets, rounds). Nothing else in
the package asks ``loss_type``, ``online``, ``rounds`` or ``rl`` which method runs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .compute.batching import iterate_batches
from .compute.decode import load_kernel, whole_step_on_host
from .compute.forward import Forward, resolve_prefix_sharing
from .compute.reference import make_reference, token_reference
from .errors import ConfigError
from .objectives.loss import (
    OFFLINE_LOSSES,
    LossFn,
    Objective,
    check_combination,
    confidence_supported,
    kto_loss_fn,
    needs_reference,
    pair_loss_fn,
    reward_loss_fn,
    sft_loss_fn,
)
from .objectives.reference_cache import cached_reference, weights_fingerprint
from .objectives.terms import LossTermError, load_loss_terms
from .online.grpo import GRPOArgs, make_grpo_loss, make_rollout_source
from .online.iterative import RoundArgs, RoundData
from .online.judge import JudgeConfig, make_judge
from .online.online_dpo import OnlineDPOArgs, make_pair_rollout_source
from .online.policy_losses import ONLINE_LOSSES
from .online.reward_model import load_reward_model
from .online.rewards import RewardError, load_reward_funcs
from .online.rollout import SamplingParams, rollout_problem
from .train.rounds import train_rounds
from .train.trainer import TrainingArgs, train

METHODS = ("sft", "offline_dpo", "kto", "coh", "reward", "grpo", "online_dpo", "iterative_dpo")
LOSS_TYPES = (*OFFLINE_LOSSES, *ONLINE_LOSSES)
DATA = {"sft": "sft", "offline_dpo": "pairs", "kto": "kto", "coh": "coh", "reward": "pairs",
        "grpo": "prompts", "online_dpo": "prompts", "iterative_dpo": "prompts"}
# axolotl's ``rl:`` names and the loss_type each means here (GRPO: TRL's default, dapo).
RL_ALIASES = {"dpo": "dpo", "ipo": "ipo", "kto": "kto", "orpo": "orpo", "simpo": "simpo", "grpo": "dapo"}


@dataclass(frozen=True)
class Method:
    """The method a run trains with: its name, the records it reads, whether a reference model runs."""

    name: str
    data: str  # sft | pairs | kto | coh | prompts
    reference: bool  # a reference pass: summed (paired, KTO) or per token (GRPO with beta > 0)
    unit: str  # what its test counts: pairs, completions or examples

    @property
    def samples(self) -> bool:
        """Whether it trains on the policy's own samples, scored by rewards."""
        return self.data == "prompts"

    @property
    def scores(self) -> bool:
        """Whether it trains a reward model: a score head on the body, no log-probs."""
        return self.name == "reward"


def loss_list(loss_type: Union[str, Sequence[str]]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def method_name(loss_type: Union[str, Sequence[str]], online: bool = False, rounds: Optional[int] = None) -> str:
    """The method of a loss_type (a name or a weighted list) and the sampling keys."""
    types = loss_list(loss_type)
    if any(t in ONLINE_LOSSES for t in types):
        return "grpo"
    if types == ["reward"]:  # a reward model learns from pairs only: online or rounds are refused by ``check``
        return "reward"
    if rounds:
        return "iterative_dpo"
    if online:
        return "online_dpo"
    if types in (["sft"], ["coh"]):
        return types[0]
    return "kto" if "kto" in types else "offline_dpo"


def choose(args: Any, processes: int = 1) -> Method:
    """The method ``args`` (a validated configuration) asks for, run by ``processes`` processes."""
    name = method_name(args.loss_type, args.online, args.rounds)
    if name == "iterative_dpo" and processes > 1:
        raise ConfigError("'rounds' runs in one process (each round samples all its prompts there); run it without mlx.launch")
    if name == "grpo":
        reference = args.beta > 0
    else:
        reference = name not in ("sft", "coh", "reward") and needs_reference(loss_list(args.loss_type))
    unit = "pairs" if name in ("offline_dpo", "reward", "online_dpo", "iterative_dpo") else "completions" if name == "grpo" else "examples"
    return Method(name, DATA[name], reference, unit)


# ------------------------------------------------------------ the configuration's rules


def _loss_type(cfg: dict) -> Union[str, list]:
    return cfg.get("loss_type") or RL_ALIASES.get(cfg.get("rl"), "dpo")


def settle(cfg: dict) -> None:
    """Before defaults apply: ``rl`` (axolotl) chooses the loss unless ``loss_type`` says."""
    rl = cfg.get("rl")
    if rl is None:
        return
    wanted = RL_ALIASES[rl]
    if "loss_type" not in cfg:
        cfg["loss_type"] = wanted
    elif (method_name(cfg["loss_type"]) == "grpo") != (method_name(wanted) == "grpo"):
        raise ConfigError(f"'rl: {rl}' contradicts 'loss_type: {cfg['loss_type']}'")


def method_defaults(cfg: dict) -> dict:
    """Defaults that depend on the method: GRPO's beta is 0 (TRL's: no KL term, no reference pass)."""
    return {"beta": 0.0} if method_name(_loss_type(cfg)) == "grpo" else {}


def check_loss_type(loss_type, loss_weights=None) -> None:
    """Raise ConfigError for combinations no objective can run."""
    types = loss_list(loss_type)
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown or not types:
        raise ConfigError(f"invalid value for 'loss_type': unknown loss_type {unknown or types}: choose from {', '.join(LOSS_TYPES)}")
    if any(t in ONLINE_LOSSES for t in types) and len(types) > 1:
        raise ConfigError(f"invalid value for 'loss_type': {', '.join(ONLINE_LOSSES)} train on the policy's own samples "
                          "and cannot be combined with other loss types")
    try:
        check_combination(types, loss_weights)
    except ValueError as e:
        raise ConfigError(f"invalid value for 'loss_type': {e}") from None


def check(cfg: dict) -> None:
    """The cross-key rules of the method ``cfg`` describes; the first broken one is a ConfigError."""
    if "loss_type" in cfg or "loss_weights" in cfg:
        check_loss_type(cfg.get("loss_type", "dpo"), cfg.get("loss_weights"))
    loss_type = _loss_type(cfg)
    name = method_name(loss_type, cfg.get("online"), cfg.get("rounds"))
    funcs, models, weights = cfg.get("reward_funcs") or [], reward_models(cfg.get("reward_model")), cfg.get("reward_weights")
    judges = 1 if cfg.get("judge") else 0
    if judges:
        try:
            JudgeConfig.from_dict(cfg["judge"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid value for 'judge': {e}") from None
    if weights is not None and (funcs or models or judges) and len(weights) != len(funcs) + len(models) + judges:
        raise ConfigError(f"invalid value for 'reward_weights': {len(weights)} weights for {len(funcs)} reward functions, "
                          f"{len(models)} reward models and {judges} judge")
    if name == "grpo":
        _check_grpo(cfg)
    elif cfg.get("beta") == 0:
        raise ConfigError("invalid value for 'beta': 0 (expected a number > 0)")
    if cfg.get("online") or cfg.get("rounds"):
        _check_sampled_pairs(cfg, loss_type)
    if cfg.get("loss_terms") and (DATA[name] != "pairs" or name == "reward"):
        raise ConfigError(f"'loss_terms' work with the paired objectives (dpo, ipo, simpo, ...), not loss_type {loss_type!r}")


def _check_grpo(cfg: dict) -> None:
    if cfg.get("kl_in_reward") and not cfg.get("beta"):
        raise ConfigError("'kl_in_reward: true' takes beta x the KL to the reference off each reward: set beta > 0 (TRL's RLOO uses 0.05)")
    if cfg.get("normalize_advantages") and cfg.get("advantage_estimator", "group") != "rloo":
        raise ConfigError("'normalize_advantages' is RLOO's option (advantage_estimator: rloo); group and reinforce_pp normalise already")
    unit = (cfg.get("grad_accumulation_steps") or 1) * (cfg.get("num_iterations") or 1)
    for key in ("save_every", "iters"):  # the final checkpoint is at iters
        value = cfg.get(key)
        if isinstance(value, int) and value > 0 and value % unit:
            raise ConfigError(
                f"invalid value for '{key}': {value} (must be a multiple of grad_accumulation_steps x "
                f"num_iterations = {unit}, so a checkpoint starts a fresh generation batch)"
            )


def _check_sampled_pairs(cfg: dict, loss_type) -> None:
    """Rules of online and iterative DPO, whose pairs the policy samples."""
    if cfg.get("temperature") == 0:
        raise ConfigError("invalid value for 'temperature': 0 (greedy sampling draws the same completion twice: no pairs)")
    accumulate, iters = cfg.get("grad_accumulation_steps"), cfg.get("iters")
    if isinstance(accumulate, int) and isinstance(iters, int) and accumulate > 0 and iters % accumulate:
        raise ConfigError(f"invalid value for 'iters': {iters} (must be a multiple of grad_accumulation_steps="
                          f"{accumulate}, so no accumulated gradient is left unapplied)")
    paired = method_name(loss_type) == "offline_dpo"
    if cfg.get("online"):
        if not paired:
            raise ConfigError(f"'online: true' turns a paired objective (dpo, ipo, hinge, ...) into its online form, not loss_type {loss_type!r}")
        if cfg.get("precompute_reference"):
            raise ConfigError("'online: true' samples new completions every step, so their reference log-probs cannot be precomputed: set precompute_reference: false")
    if cfg.get("rounds"):
        _check_rounds(cfg, loss_type, paired)


def _check_rounds(cfg: dict, loss_type, paired: bool) -> None:
    if not paired or not needs_reference(loss_list(loss_type)):
        raise ConfigError(f"'rounds' trains a paired objective with a reference (dpo, ipo, hinge, ...) on sampled pairs, not loss_type {loss_type!r}")
    if cfg.get("online"):
        raise ConfigError("'rounds' and 'online: true' are two ways to sample pairs: choose one")
    if cfg.get("loss_terms") and cfg.get("reference_update") == "per_round":
        raise ConfigError("'loss_terms' with 'reference_update: per_round' is not supported: a term's per-token "
                          "reference would be the base model while the summed one is the round's policy")
    per_round, batch = cfg.get("prompts_per_round"), cfg.get("batch_size")
    if isinstance(per_round, int) and isinstance(batch, int) and per_round < batch:
        raise ConfigError(f"invalid value for 'prompts_per_round': {per_round} (fewer than batch_size={batch}: "
                          "a round would never fill a batch)")


# ------------------------------------------------------------ each method's parts


@dataclass
class Parts:
    """What a method hands the trainer and the test: its loss, its batch iterator (with
    ``compute.batching.iterate_batches``' signature), its data sets (examples or prompts, the
    reference log-probs attached where they were precomputed) and, for iterative DPO, its rounds."""

    loss_fn: LossFn
    batches: Callable
    sets: dict
    rounds: Optional[RoundData] = None
    save_multiple: int = 0  # checkpoints only on multiples of this many steps (0: grad_accumulation_steps)

    def train(self, model: nn.Module, optimizer, args: TrainingArgs, callback, start: int) -> None:
        if self.rounds is not None:
            train_rounds(model, optimizer, self.loss_fn, self.rounds, self.batches, args, callback, start)
        else:
            train(model, optimizer, self.loss_fn, self.sets["train"], self.sets.get("valid"), self.batches, args,
                  training_callback=callback, start_step=start)

    def length(self, iters: int) -> str:
        """How long training runs, in words."""
        return f"{self.rounds.args.rounds} rounds of {iters} iterations" if self.rounds else f"{iters} iterations"

    def test_set(self):
        """The test split as loaded, or for iterative DPO the pairs the final policy samples from the test prompts."""
        if self.rounds is None:
            return self.sets.get("test")
        self.rounds.clear(["test"])  # always the samples of the policy being tested
        return self.rounds.data(None, "test")


@dataclass
class Loaded:
    """What a run has loaded before its method is built."""

    model: nn.Module
    tokenizer: Any
    sets: dict
    reference_model: Optional[nn.Module]  # a separate frozen reference, or None to bypass the adapters
    how: Forward
    reward_funcs: list
    terms: list


def user_code_dirs(args: Any) -> list[Path]:
    """Where ``module.function`` files (reward functions, loss terms) are looked for: beside the
    config file (for ``--test`` alone, also beside the one the adapter was trained with). Anything
    else must be importable (on ``sys.path``); the working directory as such is not searched."""
    configs = [args.config, getattr(args, "_trained_config", None)]
    return [Path(c).resolve().parent for c in configs if c]


def find_loss_terms(args: Any) -> list:
    """The configured loss terms, found before anything loads (a misspelt name fails in the first second)."""
    if not args.loss_terms:
        return []
    try:
        return load_loss_terms(args.loss_terms, user_code_dirs(args))
    except LossTermError as e:
        raise ConfigError(str(e)) from None


def reward_models(value: Union[None, str, list]) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def find_reward_funcs(method: Method, args: Any) -> list:
    """The rewards of a method that samples, in ``reward_weights``' order: the reward functions
    (found before anything loads, so a misspelt name fails at once), the reward models, the judge."""
    if not method.samples:
        return []
    models = reward_models(args.reward_model)
    if not args.reward_funcs and not models and not args.judge:
        what = {"online_dpo": "online: true", "iterative_dpo": "rounds"}.get(method.name, f"loss_type {args.loss_type}")
        raise ConfigError(f"{what} learns from rewards: set 'reward_funcs' (e.g. [\"rewards.my_reward\"]), "
                          "'reward_model' (a folder trained with loss_type: reward) or a 'judge'")
    options = {"max_completion_length": args.max_completion_length, "overlong_buffer": args.overlong_buffer}
    try:
        funcs = load_reward_funcs(args.reward_funcs, user_code_dirs(args), options) if args.reward_funcs else []
        scorers = [load_reward_model(path, args.batch_size) for path in models]
    except RewardError as e:
        raise ConfigError(str(e)) from None
    for scorer in scorers + ([make_judge(args.judge)] if args.judge else []):
        taken = {name for name, _ in funcs}  # a name already used gets _2, _3, ...
        names = itertools.chain([scorer.__name__], (f"{scorer.__name__}_{k}" for k in itertools.count(2)))
        name = next(n for n in names if n not in taken)
        funcs.append((name, scorer))
    return funcs


def sampling_params(args: Any, how: Forward) -> SamplingParams:
    """How every method that samples draws its completions (with the run's sampling threads).
    ``fast_decode: auto`` is on for a CPU, where a decode step's BLAS matmuls are far from the
    memory bandwidth; on a GPU they are not, and the packed copy would only take memory."""
    fast = args.fast_decode
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p or 0.0, max_tokens=args.max_completion_length, threads=how.sampling_threads,
                          fast_decode=mx.default_device() == mx.cpu if fast == "auto" else fast)


def objective(args: Any) -> Objective:
    hparams = {"gamma": args.gamma, "tau": args.tau, "alpha": args.cpo_alpha,
               "desirable_weight": args.desirable_weight, "undesirable_weight": args.undesirable_weight}
    weights = tuple(args.loss_weights) if args.loss_weights is not None else None
    return Objective(tuple(loss_list(args.loss_type)), weights, args.beta, args.label_smoothing, hparams)


def prefix_sharing(method: Method, args: Any, loaded: Loaded, say: Callable[[str], None]) -> bool:
    """Whether batches run each prompt once (``prefix_sharing``), with one info line when it is off."""
    if method.data in ("sft", "coh") or method.scores or args.prefix_sharing is False:
        return False
    data = loaded.sets.get("train") or loaded.sets.get("test") or []
    lengths = [len(p.ids) for p in data] if method.samples else [ex[0][1] for ex in data]
    mean = float(np.mean(lengths)) if lengths else 0.0
    on, why = resolve_prefix_sharing(args.prefix_sharing, loaded.model, mean, loaded.reference_model, args.grad_checkpoint)
    if why:
        say(f"[INFO] {why}")
    return on


def build(method: Method, args: Any, loaded: Loaded, say: Callable[[str], None] = print) -> Parts:
    """The parts of ``method`` for this run's model, data and settings."""
    model, how, sets = loaded.model, loaded.how, loaded.sets
    pad_id = loaded.tokenizer.eos_token_id if loaded.tokenizer.eos_token_id is not None else 0
    share = prefix_sharing(method, args, loaded, say)
    fast = method.samples and sampling_params(args, loaded.how).fast_decode
    if method.samples and (problem := rollout_problem(model, fast)) is not None:
        raise ConfigError(f"{method.name} samples from the policy, but {problem}")
    if fast:
        kernel, how_built = load_kernel()
        whole = "the whole step on the host" if whole_step_on_host(model) else "the linear layers; the rest in MLX"
        say(f"[INFO] Sampling: decode steps through mlx-dpo's CPU kernel ({how_built}): {whole}." if kernel else
            f"[INFO] Sampling: adapters merged into the weights; the CPU decode kernel is off ({how_built}).")
    batches = partial(iterate_batches, pad_id=pad_id, pad_multiple=args.pad_to_multiple, share_prefix=share)
    if any(ds is not None and "confidence" in getattr(ds, "fields", {}) for ds in sets.values()):
        if not confidence_supported(loss_list(args.loss_type)):
            raise ConfigError(f"the data has per-pair 'confidence' values, which act through label smoothing, but loss_type "
                              f"{args.loss_type!r} does not use it (use dpo, robust, exo_pair, sigmoid_norm, simpo or cpo)")
    if method.name == "grpo":
        return _grpo_parts(args, loaded, share)
    if method.scores:
        return Parts(reward_loss_fn(args.center_rewards_coefficient or 0.0), batches, sets)
    reference = make_reference(model, loaded.reference_model, how) if method.reference else None
    if reference is not None and args.precompute_reference and method.name != "iterative_dpo":  # rounds take their own
        fp, folder = weights_fingerprint(loaded.reference_model or model), Path(args.adapter_path) / "reference_cache"
        sets = {split: cached_reference(reference, ds, folder, split, fp, args.batch_size, pad_id, share_prefix=share) if ds else ds
                for split, ds in sets.items()}
        reference = None  # every batch now carries its reference log-probs
        if not loaded.terms:  # and a separate reference model is no longer needed in memory
            loaded.reference_model = None
    obj = objective(args)
    if method.name in ("sft", "coh"):
        return Parts(sft_loss_fn(how, obj.weighted()[0][1]), batches, sets)
    if method.name == "kto":
        return Parts(kto_loss_fn(obj, reference, how), batches, sets)
    token_ref = token_reference(model, loaded.reference_model, 1.0, how) if loaded.terms and method.reference else None
    loss_fn = pair_loss_fn(obj, reference, how, loaded.terms, token_ref, sampled=method.name == "online_dpo")
    if method.name == "online_dpo":
        pair_args = OnlineDPOArgs(sampling=sampling_params(args, how), reward_weights=args.reward_weights,
                                  missing_eos_penalty=args.missing_eos_penalty, share_prefix=share,
                                  pad_multiple=sampled_padding(args, how))
        batches = make_pair_rollout_source(model, loaded.tokenizer, loaded.reward_funcs, pair_args)
    rounds = None
    if method.name == "iterative_dpo":
        round_args = RoundArgs(
            rounds=args.rounds, samples_per_prompt=args.samples_per_prompt, pair_selection=args.pair_selection,
            sampling=sampling_params(args, how), reward_weights=args.reward_weights, missing_eos_penalty=args.missing_eos_penalty,
            batch_size=args.batch_size, seed=args.seed, prompts_per_round=args.prompts_per_round,
            epochs_per_round=args.epochs_per_round, reference_update=args.reference_update,
            max_seq_length=args.max_seq_length, folder=Path(args.adapter_path))
        rounds = RoundData(model, loaded.tokenizer, loaded.reward_funcs, sets, round_args, reference, pad_id, how)
    return Parts(loss_fn, batches, sets, rounds)


def sampled_padding(args: Any, how: Forward) -> int:
    """What sampled rows are padded to a multiple of: ``pad_to_multiple``, at least 32 for a compiled
    step (a new width each batch would trace it again). An uncompiled step computes every padded slot,
    so padding to the longest row saves it about a third of GRPO's work at short completions."""
    return args.pad_to_multiple if how.pack_head else max(32, args.pad_to_multiple)


def _grpo_parts(args: Any, loaded: Loaded, share: bool) -> Parts:
    grpo = GRPOArgs(
        num_generations=args.num_generations, num_iterations=args.num_iterations,
        grad_accumulation_steps=args.grad_accumulation_steps, sampling=sampling_params(args, loaded.how),
        reward_weights=args.reward_weights, scale_rewards=args.scale_rewards,
        mask_truncated_completions=args.mask_truncated_completions, beta=args.beta, loss_type=args.loss_type,
        epsilon=args.epsilon, epsilon_high=args.epsilon_high, importance_sampling_level=args.importance_sampling_level,
        advantage_estimator=args.advantage_estimator, normalize_advantages=args.normalize_advantages,
        kl_in_reward=args.kl_in_reward, share_prefix=share, pad_multiple=sampled_padding(args, loaded.how),
    )
    reference = token_reference(loaded.model, loaded.reference_model, grpo.temperature, loaded.how) if args.beta > 0 else None
    batches = make_rollout_source(loaded.model, loaded.tokenizer, loaded.reward_funcs, grpo, reference, loaded.how)
    return Parts(make_grpo_loss(grpo, loaded.how), batches, loaded.sets,
                 save_multiple=args.grad_accumulation_steps * args.num_iterations)
