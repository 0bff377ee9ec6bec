"""Example loss terms for ``loss_terms:`` (see LORA.md, "Your own loss terms").

Each is a plain function of ``t`` (``mlx_dpo.loss_terms.TermInputs``: per-pair
policy and reference log-probs, summed and per token, masks, lengths and the
data's numeric columns) plus its keyword arguments from the config, returning
one value per pair (averaged) in MLX, so gradients flow through it::

    loss_terms:
      - {fn: constraints.no_chosen_drop, weight: 1.0}
      - {fn: constraints.length_budget, weight: 1.0, max_tokens: 64}
      - {fn: constraints.unsafe_unlikelihood, weight: 0.5, column: rejected_unsafe}

The module is found beside the config file (or in the working directory), as
reward functions are.
"""

import mlx.core as mx


def no_chosen_drop(t, per_token: bool = False) -> mx.array:
    """DPOP's floor (Pal et al. 2024, "Smaug"): ``max(0, log π_ref(y_w) - log π(y_w))``.

    Plain DPO only widens the gap between chosen and rejected, and can do so while the
    chosen answer itself becomes less likely; this is zero while the chosen log-prob stays at
    or above the reference's and grows as it falls. DPOP puts it inside the sigmoid with a
    large λ; as an added term its weight plays λ's part. ``per_token`` divides by the length.
    """
    drop = t.reference_chosen - t.policy_chosen
    if per_token:
        drop = drop / mx.maximum(t.chosen_length, 1.0)
    return mx.maximum(drop, 0.0)


def length_budget(t, max_tokens: int, threshold: float = 0.0) -> mx.array:
    """Answers over ``max_tokens`` tokens must not gain likelihood against the reference.

    For each response longer than the budget, the per-token log-ratio
    ``(log π(y) - log π_ref(y)) / |y|`` above ``threshold`` is penalised (chosen and rejected
    alike), which counters DPO's drift towards long answers without touching short ones.
    """
    total = 0.0
    for policy, reference, length in (
        (t.policy_chosen, t.reference_chosen, t.chosen_length),
        (t.policy_rejected, t.reference_rejected, t.rejected_length),
    ):
        over = (length > max_tokens).astype(mx.float32)
        ratio = (policy - reference) / mx.maximum(length, 1.0)
        total = total + over * mx.maximum(ratio - threshold, 0.0)
    return total


def unsafe_unlikelihood(t, column: str = "rejected_unsafe", response: str = "rejected") -> mx.array:
    """Unlikelihood (Welleck et al. 2020) on responses a data column marks unsafe (1) or not (0).

    For a flagged response, the mean over its tokens of ``-log(1 - p(token))`` pushes every one of
    its tokens down, not only relative to the other answer. Unflagged pairs add 0.
    """
    if column not in t.columns:
        raise KeyError(f"no column {column!r} in the data (columns: {sorted(t.columns)})")
    tokens, mask, length = (
        (t.policy_rejected_tokens, t.rejected_mask, t.rejected_length)
        if response == "rejected"
        else (t.policy_chosen_tokens, t.chosen_mask, t.chosen_length)
    )
    logp = mx.minimum(tokens, -1e-6)  # p < 1, so log(1 - p) is finite
    per_token = -mx.log(-mx.expm1(logp)) * mask
    return t.columns[column] * per_token.sum(axis=-1) / mx.maximum(length, 1.0)
