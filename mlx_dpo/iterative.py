"""Iterative DPO: rounds of sample -> score -> pair -> train, the reference fixed or renewed per round.

Each round samples ``samples_per_prompt`` completions for every prompt with the
policy as it stands, scores them with the reward functions, pairs the best with
the worst (``pair_selection: best_worst``; a prompt whose samples all score the
same gives no pair), writes the pairs to ``adapter_path/round_K/pairs.jsonl``
(text, scores and token ids: a person can read them, a resumed run reuses
them), takes the reference log-probs of those pairs once (the base model, or
with ``reference_update: per_round`` the policy at the start of the round) and
trains ``iters`` steps on them with the paired objective, offline. Steps are
counted over the whole run (round K is steps (K-1)·iters+1 .. K·iters), so a
checkpoint names its round and a stopped run resumes at the round and step
where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .advantages import combine_rewards
from .checkpoint import atomic_save_safetensors
from .data import DataError, Dataset
from .data.prompts import Prompt
from .online import completion_text, rollout_seed, score_rollouts
from .progress import Progress
from .reference import compute_reference_logps
from .rollout import SamplingParams, eos_ids_of, sample_groups

PAIR_SELECTIONS = ("best_worst",)
REFERENCE_UPDATES = ("base", "per_round")


@dataclass
class RoundArgs:
    """What one round samples and how it pairs (the config's keys)."""

    samples_per_prompt: int = 4
    pair_selection: str = "best_worst"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    reward_weights: Optional[Sequence[float]] = None
    missing_eos_penalty: Optional[float] = None
    batch_size: int = 4
    seed: int = 0


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
    with Progress(len(prompts), f"{label}: sampling {split} ({K} per prompt)", unit="prompt") as bar:
        for start in range(0, len(prompts), step):
            chunk = list(prompts[start : start + step])
            mx.random.seed(rollout_seed(args.seed + 7 * round_index, start // step + 1, 0) + (split != "train"))
            comps = sample_groups(model, [p.ids for p in chunk], K, args.sampling, eos_ids)
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


def round_pairs(
    folder: Path, split: str, make: Callable[[], list[dict]]
) -> list[dict]:
    """``folder/<split>_pairs.jsonl`` (``pairs.jsonl`` for train) if a run already wrote it, else
    made now and written (one JSON object per line) before any training on it."""
    path = folder / ("pairs.jsonl" if split == "train" else f"{split}_pairs.jsonl")
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = make()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    tmp.replace(path)
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


def train_rounds(
    rounds: int,
    iters: int,
    start_step: int,
    folder: Path,
    make_round: Callable[[int, str], Optional[Dataset]],
    train_round: Callable[[int, Dataset, Optional[Dataset], int, int], None],
) -> None:
    """Run rounds ``start_step // iters + 1 .. rounds``: for each, its data (``make_round(k, split)``)
    then ``train_round(k, train, valid, first_step, last_step)``. Only round 1 without pairs is an
    error; a later round without (enough) pairs trains nothing and the run goes on (the reward has
    saturated: the policy's samples no longer differ)."""
    for k in range(start_step // iters + 1, rounds + 1):
        train = make_round(k, "train")
        if k == 1 and (train is None or len(train) == 0):
            raise DataError(f"round 1: every prompt's samples scored the same, so there are no pairs to train on "
                            f"(see {folder / 'round_1' / 'pairs.jsonl'}); use more samples_per_prompt or a finer reward")
        valid = make_round(k, "valid")
        train_round(k, train, valid, max(start_step, (k - 1) * iters), k * iters)
