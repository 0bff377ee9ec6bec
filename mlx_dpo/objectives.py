"""Glue from a batch to a loss: log-probs of the policy (and reference), then pure losses.

``make_loss`` returns ``loss_fn(model, batch) -> (loss, metrics)``, the one
function the trainer calls; it never needs to know which objective it runs.
``metrics`` holds batch means plus three bookkeeping entries the trainer sums
rather than averages: ``weight`` (what the means are over: pairs or examples,
or tokens for SFT), ``count`` (examples) and ``ntoks`` (real tokens
forwarded, prompt and response).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from .losses import PAIR_LOSSES, REFERENCE_FREE, USES_LABEL_SMOOTHING, kto_loss, nll_loss, sft_loss
from .policy_losses import ONLINE_LOSSES
from .loss_terms import LossTerm, TokenReferenceFn, term_inputs
from .prefix import sequence_logps, sequence_token_logps
from .reference import ReferenceFn

LossFn = Callable[[nn.Module, dict], tuple[mx.array, dict]]

SUMMED = ("weight", "count", "ntoks")


def is_summed(key: str) -> bool:
    """Bookkeeping metrics (and per-kind counts like ``count/desirable``) add up over batches."""
    return key in SUMMED or key.startswith(("count/", "time/"))
LOSS_TYPES = ("sft", "coh", "kto", *PAIR_LOSSES, *ONLINE_LOSSES)


def loss_list(loss_type: Union[str, Sequence[str]]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def is_online(loss_type: Union[str, Sequence[str]]) -> bool:
    """Whether the objective trains on the policy's own samples (GRPO's family)."""
    return any(t in ONLINE_LOSSES for t in loss_list(loss_type))


def needs_reference(loss_type: Union[str, Sequence[str]]) -> bool:
    """Whether any component compares with a sequence-level reference (SFT, SimPO/ORPO/CPO and
    the online losses do not: GRPO's per-token reference depends on ``beta``)."""
    return any(t not in REFERENCE_FREE and t not in ("sft", "coh") and t not in ONLINE_LOSSES for t in loss_list(loss_type))


def data_kind(loss_type: Union[str, Sequence[str]]) -> str:
    """What the data must look like: ``sft`` records, ``kto`` unpaired examples, ``pairs``, ``coh``
    (pairs read as Chain of Hindsight sequences), or ``prompts``."""
    types = loss_list(loss_type)
    if is_online(types):
        return "prompts"
    if types in (["sft"], ["coh"]):
        return types[0]
    return "kto" if "kto" in types else "pairs"


def check_combination(loss_type: Union[str, Sequence[str]], loss_weights: Optional[Sequence[float]] = None) -> None:
    """Raise ValueError for combinations no objective can run."""
    types = loss_list(loss_type)
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown or not types:
        raise ValueError(f"unknown loss_type {unknown or types}: choose from {', '.join(LOSS_TYPES)}")
    if "kto" in types and len(types) > 1:
        raise ValueError("'kto' trains on unpaired data and cannot be combined with other loss types")
    if "coh" in types and len(types) > 1:
        raise ValueError("'coh' trains on one hindsight sequence per pair and order and cannot be combined with other loss types")
    if is_online(types) and len(types) > 1:
        raise ValueError(f"{', '.join(ONLINE_LOSSES)} train on the policy's own samples and cannot be combined with other loss types")
    if loss_weights is not None and len(loss_weights) != len(types):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries for {len(types)} loss types")


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


def make_loss(
    loss_type: Union[str, Sequence[str]],
    reference: Optional[ReferenceFn] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chunk_size: int = 0,
    loss_weights: Optional[Sequence[float]] = None,
    loss_terms: Sequence[LossTerm] = (),
    token_reference: Optional[TokenReferenceFn] = None,
    **hparams,
) -> LossFn:
    """The loss function for ``loss_type`` (a name or a weighted list of names).

    ``reference`` gives reference log-probs where an objective needs them; a
    batch may carry precomputed ``reference_logps`` instead, and then no
    reference pass runs. A batch ``confidence`` (per pair) replaces the global
    ``label_smoothing`` with ``1 - confidence``. In a list, ``sft`` is the NLL of
    the chosen responses (``[dpo, sft]`` is RPO). ``hparams`` go to the
    losses that take them (``gamma``, ``tau``, ``alpha``,
    ``desirable_weight``, ``undesirable_weight``). ``loss_terms`` (paired
    objectives only) add ``weight * term(TermInputs)`` each, logged as
    ``loss_terms/<name>``; ``token_reference(batch)`` gives the per-token
    reference log-probs a term may read. ``coh`` is the next-token loss on a
    Chain of Hindsight sequence's answers (the batch mask holds them).
    """
    check_combination(loss_type, loss_weights)
    types = loss_list(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(types)
    use_reference = needs_reference(types)

    if loss_terms and data_kind(types) != "pairs":
        raise ValueError(f"loss_terms work with the paired objectives, not loss_type {loss_type!r}")

    if data_kind(types) in ("sft", "coh"):

        def sft(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
            logps, ntoks = sequence_logps(model, batch, chunk_size)
            # Sum the token counts once and reuse it: two identical ``ntoks.sum()``
            # in one compiled value_and_grad crash MLX 0.32 (IndexError _Map_base::at).
            total = ntoks.sum()
            loss, metrics = sft_loss(logps, total)
            count = mx.array(logps.shape[0], mx.float32)
            return loss * weights[0], {**metrics, "weight": total, "count": count, "ntoks": _forwarded(batch)}

        return sft

    if types == ["kto"]:
        kto_args = {k: v for k, v in hparams.items() if k in ("desirable_weight", "undesirable_weight")}

        def kto(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
            # Rows: each example's own completion, then the same prompts with
            # mismatched completions (for the KL baseline).
            logps, _ = sequence_logps(model, batch, chunk_size)
            ref = _reference(batch, reference)
            b = logps.shape[0] // 2
            loss, metrics = kto_loss(logps[:b], ref[:b], batch["label"], logps[b:], ref[b:], beta=beta, **kto_args)
            n = mx.array(b, mx.float32)
            return loss * weights[0], {**metrics, "weight": n, "count": n, "ntoks": _forwarded(batch)}

        return kto

    def pairs(model: nn.Module, batch: dict) -> tuple[mx.array, dict]:
        if loss_terms:  # per-token log-probs for the terms; their sums are the objective's input
            token_logps, _, mask = sequence_token_logps(model, batch, chunk_size=chunk_size)
            mask = mask.astype(mx.float32)
            logps, ntoks = (token_logps * mask).sum(axis=-1), mask.sum(axis=-1)
        else:
            logps, ntoks = sequence_logps(model, batch, chunk_size)
        b = logps.shape[0] // 2
        ref_tokens = None
        if loss_terms and use_reference and token_reference is not None and "reference_logps" not in batch:
            # One reference pass serves both: the objective's sums and the terms' tokens.
            ref_tokens = token_reference(batch)
            ref = (ref_tokens * mask).sum(axis=-1)
        else:
            ref = _reference(batch, reference) if use_reference else None
        eps = 1.0 - batch["confidence"] if "confidence" in batch else label_smoothing
        inputs = dict(
            policy_chosen=logps[:b],
            policy_rejected=logps[b:],
            reference_chosen=ref[:b] if ref is not None else None,
            reference_rejected=ref[b:] if ref is not None else None,
            chosen_tokens=ntoks[:b],
            rejected_tokens=ntoks[b:],
        )
        total, metrics = None, {}
        for t, w in zip(types, weights):
            if t == "sft":
                part, m = nll_loss(inputs["policy_chosen"], inputs["chosen_tokens"])
            else:
                part, m = PAIR_LOSSES[t](**inputs, beta=beta, label_smoothing=eps, **hparams)
            total = w * part if total is None else total + w * part
            for k, v in m.items():
                metrics.setdefault(k, v)  # the first objective names the shared metrics
            if len(types) > 1:
                metrics[f"loss/{t}"] = part
        if loss_terms:
            if ref_tokens is not None:
                later = lambda: ref_tokens  # noqa: E731
            elif token_reference is not None and use_reference:
                later = lambda: token_reference(batch)  # noqa: E731  (a precomputed run: on first use)
            else:
                later = None
            inputs = term_inputs(token_logps, mask, ref, batch, beta, later)
            for term in loss_terms:
                value = term(inputs)
                total = total + term.weight * value
                metrics[f"loss_terms/{term.name}"] = value
        if "stats" in batch:  # a pair batch sampled by the policy (online: true)
            metrics.update(online_metrics(logps, ref, beta, batch["stats"]))
        n = mx.array(b, mx.float32)
        return total, {**metrics, "weight": n, "count": n, "ntoks": _forwarded(batch)}

    return pairs


def online_metrics(logps: mx.array, reference: Optional[mx.array], beta: float, stats: dict) -> dict:
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


def confidence_supported(loss_type: Union[str, Sequence[str]]) -> bool:
    """Per-pair confidences act through label smoothing: every component must use it."""
    return all(t in USES_LABEL_SMOOTHING or t == "sft" for t in loss_list(loss_type))
