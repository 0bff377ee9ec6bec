"""Iterative DPO: rounds of sample -> score -> pair -> train, the reference fixed or renewed per round.

Each round samples ``samples_per_prompt`` completions for every prompt with the
policy as it stands, scores them with the reward functions, pairs the best with
the worst (``pair_selection: best_worst``; a prompt whose samples all score the
same gives no pair), writes the pairs to ``adapter_path/round_K/pairs.jsonl``
(text, scores and token ids: a person can read them, a resumed run reuses
them), takes the reference log-probs of those pairs once (the base model, or
with ``reference_update: per_round`` the policy at the start of the round) and
trains ``iters`` steps on them with the paired objective, offline
(``train/rounds.py`` runs the rounds).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .._platform.files import atomic_save_safetensors, atomic_write_text
from .._platform.progress import Progress
from ..compute.forward import PLAIN, Forward, eval_mode, sequence_logps
from ..compute.reference import ReferenceFn, compute_reference_logps
from ..data import Dataset
from ..data.prompts import Prompt
from .advantages import combine_rewards
from .generations import RewardFuncs, completion_text, rollout_seed, score_rollouts
from .rollout import SamplingParams, eos_ids_of, sample_groups

PAIR_SELECTIONS = ("best_worst",)
REFERENCE_UPDATES = ("base", "per_round")


@dataclass
class RoundArgs:
    """What one round samples, how it pairs and where it writes (the config's keys)."""

    rounds: int = 1
    samples_per_prompt: int = 4
    pair_selection: str = "best_worst"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    reward_weights: Optional[Sequence[float]] = None
    missing_eos_penalty: Optional[float] = None
    batch_size: int = 4
    seed: int = 0
    prompts_per_round: Optional[int] = None  # train prompts sampled each round (None: all)
    epochs_per_round: Optional[int] = None  # at most this many passes over a round's pairs
    reference_update: str = "base"  # or per_round: the policy at the start of the round
    max_seq_length: int = 2048
    folder: Path = Path("adapters")  # adapter_path: round_K/ and test/ are written here


def best_worst(scores: np.ndarray) -> list[tuple[int, int]]:
    """For scores (N, K), the (best, worst) sample of each prompt; None where all K tie (or none
    was scored). Ties for best go to the first sample, for worst to the last."""
    out = []
    for row in np.asarray(scores, np.float64):
        ok = np.where(np.isnan(row), -np.inf, row)
        best = int(np.argmax(ok))
        worst = len(ok) - 1 - int(np.argmin(ok[::-1]))
        out.append(None if ok[best] == ok[worst] else (best, worst))
    return out


def sample_round_pairs(
    model: nn.Module, tokenizer, reward_funcs: list[tuple[str, Callable]], prompts: Sequence[Prompt],
    args: RoundArgs, round_index: int, split: str = "train", label: Optional[str] = None,
) -> list[dict]:
    """One round's pairs from ``prompts``: K samples each, scored, best against worst."""
    eos_ids = eos_ids_of(tokenizer)
    K = args.samples_per_prompt
    pairs = []
    step = max(1, args.batch_size)
    label = label or f"Round {round_index}"
    keep: dict = {}  # the decode kernel's packed weights, from chunk to chunk of this round
    with Progress(len(prompts), f"{label}: sampling {split} ({K} per prompt)", unit="prompt") as bar:
        for start in range(0, len(prompts), step):
            chunk = list(prompts[start : start + step])
            mx.random.seed(rollout_seed(args.seed + 7 * round_index, start // step + 1, 0) + (split != "train"))
            comps = sample_groups(model, [p.ids for p in chunk], K, args.sampling, eos_ids, keep=keep)
            rewards = score_rollouts(tokenizer, reward_funcs, chunk, comps, eos_ids)
            scores = combine_rewards(rewards, args.reward_weights).reshape(len(chunk), K)
            if args.missing_eos_penalty is not None:
                unfinished = np.array([not c.finished for c in comps]).reshape(len(chunk), K)
                scores = scores - args.missing_eos_penalty * unfinished
            for i, picked in enumerate(best_worst(scores)):
                if picked is None:
                    continue
                good, bad = comps[i * K + picked[0]], comps[i * K + picked[1]]
                pairs.append({
                    "prompt": chunk[i].prompt,
                    "chosen": completion_text(tokenizer, good.token_ids, eos_ids),
                    "rejected": completion_text(tokenizer, bad.token_ids, eos_ids),
                    "score_chosen": float(scores[i, picked[0]]), "score_rejected": float(scores[i, picked[1]]),
                    "prompt_ids": list(chunk[i].ids), "chosen_ids": list(good.token_ids), "rejected_ids": list(bad.token_ids),
                })
            bar.update(len(chunk))
    return pairs


def pairs_dataset(pairs: list[dict], max_seq_length: int) -> Dataset:
    """Pair examples straight from the sampled token ids (no re-tokenization), cut to the limit."""
    examples = []
    for p in pairs:
        prompt = p["prompt_ids"]
        if len(prompt) >= max_seq_length:
            continue
        seqs = [prompt + p["chosen_ids"], prompt + p["rejected_ids"]]
        examples.append(tuple((s[:max_seq_length], len(prompt)) for s in seqs))
    return Dataset(examples)


def round_pairs(folder: Path, split: str, make: Callable[[], list[dict]]) -> list[dict]:
    """``folder/<split>_pairs.jsonl`` (``pairs.jsonl`` for train) if a run already wrote it, else
    made now and written (one JSON object per line) before any training on it."""
    path = folder / ("pairs.jsonl" if split == "train" else f"{split}_pairs.jsonl")
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = make()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return pairs


def round_reference(
    folder: Path, split: str, dataset: Dataset, reference: Callable[[dict], mx.array], batch_size: int, pad_id: int,
) -> Dataset:
    """The round's pairs with their reference log-probs, computed once per round and kept in
    ``folder`` (a run resumed inside the round reuses them: the policy has moved since)."""
    path = folder / f"{split}_reference.safetensors"
    if path.is_file():
        values = np.array(mx.load(str(path))["reference_logps"])
    else:
        values = compute_reference_logps(reference, dataset, batch_size, pad_id)
        atomic_save_safetensors(path, {"reference_logps": mx.array(values)})
    return dataset.with_fields(reference_logps=values)


class RoundData:
    """Each round's data: the prompts of a split sampled by the policy as it stands, scored,
    paired best against worst, written, with the round's reference log-probs (the base model's,
    or with ``reference_update: per_round`` the policy's at the start of the round)."""

    def __init__(self, model: nn.Module, tokenizer, reward_funcs: RewardFuncs, prompts: dict, args: RoundArgs,
                 base_reference: Optional[ReferenceFn], pad_id: int, how: Forward = PLAIN):
        self.model, self.tokenizer, self.funcs, self.prompts, self.args = model, tokenizer, reward_funcs, prompts, args
        self.base_reference, self.pad_id, self.how = base_reference, pad_id, how

    def policy_reference(self, batch: dict) -> mx.array:
        """The policy as it stands (dropout off), without gradient: the per-round reference."""
        with eval_mode(self.model):
            return mx.stop_gradient(sequence_logps(self.model, batch, self.how)[0])

    def data(self, k: Optional[int], split: str) -> Optional[Dataset]:
        """Round ``k``'s pairs for ``split`` (``k`` None: the final test pairs), with reference log-probs."""
        prompts, args = self.prompts.get(split), self.args
        if not prompts:
            return None
        n = args.prompts_per_round
        if split == "train" and n and n < len(prompts):  # a fresh seeded subset each round
            pick = np.sort(np.random.default_rng((args.seed, k)).choice(len(prompts), n, replace=False))
            prompts = [prompts[i] for i in pick]
        folder = args.folder / (f"round_{k}" if k is not None else "test")
        pairs = round_pairs(folder, split, lambda: sample_round_pairs(
            self.model, self.tokenizer, self.funcs, prompts, args, k or self.args.rounds + 1, split,
            label=None if k is not None else "Test"))
        dataset = pairs_dataset(pairs, args.max_seq_length)
        print(f"Round {k if k is not None else 'test'}: {len(dataset)} {split} pairs from {len(prompts)} prompts "
              f"(written to {folder})", flush=True)
        if not len(dataset):
            return dataset
        per_round = k is not None and args.reference_update == "per_round"
        reference = self.policy_reference if per_round else self.base_reference
        return round_reference(folder, split, dataset, reference, args.batch_size, self.pad_id)

    def clear(self, patterns: Sequence[str]) -> None:
        """Remove earlier runs' folders of pairs (this run writes its own)."""
        old = [d for pattern in patterns for d in self.args.folder.glob(pattern) if d.is_dir()]
        for d in old:
            shutil.rmtree(d)
        if old:
            print(f"[INFO] removed {len(old)} folder(s) of an earlier run's pairs from {self.args.folder}", flush=True)
