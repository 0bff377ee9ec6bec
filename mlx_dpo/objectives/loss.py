"""From a batch to a loss: log-probs of the policy (and reference), then the pure losses.

Each builder returns ``loss_fn(model, batch) -> (loss, metrics)``, the one function the trainer
calls; which builder a run uses is decided in ``methods.py``. ``metrics`` holds batch means
plus the bookkeeping entries the trainer sums rather than averages (``train.trainer.is_summed``):
``weight`` (what the means are over: pairs or examples, or tokens for SFT), ``count``
(examples) and ``ntoks`` (real tokens forwarded, prompt and response).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..compute.forward import PLAIN, Forward, sequence_logps, sequence_token_logps
from ..compute.reference import ReferenceFn, TokenReferenceFn
from ..compute.scores import sequence_scores
from .losses import (
    PAIR_LOSSES,
    REFERENCE_FREE,
    USES_LABEL_SMOOTHING,
    kto_loss,
    nll_loss,
    reward_model_loss,
    sft_loss,
)
from .terms import LossTerm, term_inputs

LossFn = Callable[[nn.Module, dict], tuple[mx.array, dict]]
OFFLINE_LOSSES = ("sft", "coh", "kto", "reward", *PAIR_LOSSES)  # every offline loss_type name


@dataclass(frozen=True)
class Objective:
    """An offline objective: its loss types, their weights and every hyper-parameter they read."""

    loss_types: tuple[str, ...] = ("dpo",)
    weights: Optional[tuple[float, ...]] = None  # one per loss type; None: all 1.0
    beta: float = 0.1
    label_smoothing: float = 0.0
    hparams: dict = field(default_factory=dict)  # gamma, tau, alpha, desirable_weight, undesirable_weight

    def weighted(self) -> list[tuple[str, float]]:
        return list(zip(self.loss_types, self.weights or [1.0] * len(self.loss_types)))


def needs_reference(loss_types: Sequence[str]) -> bool:
    """Whether a paired or KTO objective compares with a sequence-level reference."""
    return any(t not in REFERENCE_FREE and t not in ("sft", "coh", "reward") for t in loss_types)


def confidence_supported(loss_types: Sequence[str]) -> bool:
    """Per-pair confidences act through label smoothing: every component must use it."""
    return all(t in USES_LABEL_SMOOTHING or t == "sft" for t in loss_types)


def check_combination(loss_types: Sequence[str], loss_weights: Optional[Sequence[float]] = None) -> None:
    """Raise ValueError for offline combinations no objective can run."""
    if "kto" in loss_types and len(loss_types) > 1:
        raise ValueError("'kto' trains on unpaired data and cannot be combined with other loss types")
    if "reward" in loss_types and len(loss_types) > 1:
        raise ValueError("'reward' trains a reward model (a score head) and cannot be combined with other loss types")
    if "coh" in loss_types and len(loss_types) > 1:
        raise ValueError("'coh' trains on one hindsight sequence per pair and order and cannot be combined with other loss types")
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries for {len(loss_types)} loss types")


def _forwarded(batch: dict) -> mx.array:
    """Real (non-padding) tokens in the batch, prompt and response: the throughput unit."""
    return batch["lengths"].sum().astype(mx.float32)


def _reference(batch: dict, reference: Optional[ReferenceFn]) -> mx.array:
    ref = batch.get("reference_logps")
    if ref is None:
        if reference is None:
            raise ValueError("this objective needs reference log-probs, but there is no reference")
        ref = reference(batch)
    return ref


def sft_loss_fn(how: Forward = PLAIN, weight: float = 1.0) -> LossFn:
    """The next-token loss over the batch's masked tokens: SFT, and Chain of Hindsight's answers."""

    def sft(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
        logps, ntoks = sequence_logps(model, batch, how)
        # Sum the token counts once and reuse it: two identical ``ntoks.sum()``
        # in one compiled value_and_grad crash MLX 0.32 (IndexError _Map_base::at).
        total = ntoks.sum()
        loss, metrics = sft_loss(logps, total)
        count = mx.array(logps.shape[0], mx.float32)
        return loss * weight, {**metrics, "weight": total, "count": count, "ntoks": _forwarded(batch)}

    return sft


def reward_loss_fn(center_coefficient: float = 0.0) -> LossFn:
    """A reward model's Bradley-Terry loss on chosen/rejected rows, each scored at its last token;
    a pair's ``margin`` column (TRL's) is subtracted from its score difference."""

    def reward(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
        scores = sequence_scores(model, batch["tokens"], batch["lengths"])
        b = scores.shape[0] // 2
        loss, metrics = reward_model_loss(scores[:b], scores[b:], batch.get("column.margin"), center_coefficient)
        n = mx.array(b, mx.float32)
        return loss, {**metrics, "weight": n, "count": n, "ntoks": _forwarded(batch)}

    return reward


def kto_loss_fn(objective: Objective, reference: Optional[ReferenceFn], how: Forward = PLAIN) -> LossFn:
    """KTO on unpaired rows: each example's own completion, then the same prompts with
    mismatched completions (the KL baseline)."""
    weights = {k: v for k, v in objective.hparams.items() if k in ("desirable_weight", "undesirable_weight")}
    weight = objective.weighted()[0][1]

    def kto(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
        logps, _ = sequence_logps(model, batch, how)
        ref = _reference(batch, reference)
        b = logps.shape[0] // 2
        loss, metrics = kto_loss(logps[:b], ref[:b], batch["label"], logps[b:], ref[b:], beta=objective.beta, **weights)
        n = mx.array(b, mx.float32)
        return loss * weight, {**metrics, "weight": n, "count": n, "ntoks": _forwarded(batch)}

    return kto


def pair_loss_fn(
    objective: Objective,
    reference: Optional[ReferenceFn] = None,
    how: Forward = PLAIN,
    terms: Sequence[LossTerm] = (),
    token_reference: Optional[TokenReferenceFn] = None,
    sampled: bool = False,
) -> LossFn:
    """A paired objective (a weighted list such as ``[dpo, sft]``, RPO) on chosen/rejected rows.

    ``reference`` gives summed reference log-probs unless the batch carries ``reference_logps``.
    A batch ``confidence`` replaces ``label_smoothing`` with ``1 - confidence``. In a list,
    ``sft`` is the NLL of the chosen responses. ``terms`` add ``weight * term(TermInputs)``
    each, logged as ``loss_terms/<name>``; ``token_reference(batch)`` gives the per-token
    reference log-probs a term may read. ``sampled``: the pairs are the policy's own samples
    (online DPO), and TRL's ``objective/*`` metrics are added (``sampled_pair_metrics``).
    """
    use_reference = needs_reference(objective.loss_types)

    def policy(model: nn.Module, batch: dict):
        if not terms:
            return (*sequence_logps(model, batch, how), None, None)
        token_logps, _, mask = sequence_token_logps(model, batch, how)  # the terms read tokens; their sums are the input
        mask = mask.astype(mx.float32)
        return (token_logps * mask).sum(axis=-1), mask.sum(axis=-1), token_logps, mask

    def references(batch: dict, mask: Optional[mx.array]):
        """(summed reference, per-token reference on demand) for this batch."""
        if not use_reference:
            return None, None
        if terms and token_reference is not None and "reference_logps" not in batch:
            tokens = token_reference(batch)  # one reference pass serves the sums and the terms
            return (tokens * mask).sum(axis=-1), (lambda: tokens)
        later = (lambda: token_reference(batch)) if token_reference is not None else None
        return _reference(batch, reference), later

    def pairs(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
        logps, ntoks, token_logps, mask = policy(model, batch)
        ref, ref_tokens = references(batch, mask)
        b = logps.shape[0] // 2
        total, metrics = _objective_terms(objective, logps, ntoks, ref, batch)
        if terms:
            inputs = term_inputs(token_logps, mask, ref, batch, objective.beta, ref_tokens)
            for term in terms:
                value = term(inputs)
                total = total + term.weight * value
                metrics[f"loss_terms/{term.name}"] = value
        if sampled:
            metrics.update(sampled_pair_metrics(logps, ref, objective.beta, batch["stats"]))
        n = mx.array(b, mx.float32)
        return total, {**metrics, "weight": n, "count": n, "ntoks": _forwarded(batch)}

    return pairs


def _objective_terms(objective: Objective, logps: mx.array, ntoks: mx.array, ref: Optional[mx.array], batch: dict):
    """The weighted sum of the objective's paired losses and their metrics (the first names the shared ones)."""
    b = logps.shape[0] // 2
    eps = 1.0 - batch["confidence"] if "confidence" in batch else objective.label_smoothing
    inputs = dict(
        policy_chosen=logps[:b], policy_rejected=logps[b:],
        reference_chosen=ref[:b] if ref is not None else None, reference_rejected=ref[b:] if ref is not None else None,
        chosen_tokens=ntoks[:b], rejected_tokens=ntoks[b:],
    )
    total, metrics = None, {}
    for t, w in objective.weighted():
        if t == "sft":
            part, m = nll_loss(inputs["policy_chosen"], inputs["chosen_tokens"])
        else:
            part, m = PAIR_LOSSES[t](**inputs, beta=objective.beta, label_smoothing=eps, **objective.hparams)
        total = w * part if total is None else total + w * part
        for k, v in m.items():
            metrics.setdefault(k, v)
        if len(objective.loss_types) > 1:
            metrics[f"loss/{t}"] = part
    return total, metrics


def sampled_pair_metrics(logps: mx.array, reference: Optional[mx.array], beta: float, stats: dict) -> dict:
    """TRL's online DPO metrics from the summed log-probs of all 2B sampled completions, which
    cover their real tokens only (up to and including EOS, never the padding after it):
    ``objective/kl`` = mean of log π(y) - log π_ref(y) (a sampled estimate of the sequence KL),
    ``objective/entropy`` = mean of -log π(y), ``objective/non_score_reward`` = -β·kl and
    ``objective/rlhf_reward`` = scores - β·kl; the sampler's stats pass through."""
    out = {**stats, "objective/entropy": -logps.mean()}
    if reference is not None:
        kl = (logps - reference).mean()
        out.update({"objective/kl": kl, "objective/non_score_reward": -beta * kl,
                    "objective/rlhf_reward": stats["objective/scores"] - beta * kl})
    return out
