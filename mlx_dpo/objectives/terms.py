"""Your own penalty terms added to a paired loss: ``loss = objective + sum_k w_k * term_k``.

A term is one Python function of a ``TermInputs`` (the batch's per-pair log-probs
under the policy and the reference, per token and summed, with masks, lengths
and the data's numeric columns) and its own keyword arguments from the config::

    loss_terms:
      - {fn: constraints.no_chosen_drop, weight: 1.0}
      - {fn: constraints.length_budget, weight: 0.5, max_tokens: 120}

It returns an MLX scalar or a per-pair array (averaged), written in MLX so that
gradients flow through it and ``mx.compile`` can trace it. Each term's value is
logged as ``loss_terms/<name>``. DPOP (Pal et al. 2024, "Smaug"), length
budgets and unlikelihood penalties are examples (``examples/constraints.py``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from .._platform.user_code import error_text, find_function


class LossTermError(Exception):
    """A loss term that cannot be found, called or used; one line naming it."""


@dataclass
class TermInputs:
    """What a loss term sees for a batch of B pairs (T: response positions of the batch).

    Summed log-probs are (B,); per-token ones are (B, T), aligned with ``chosen_mask`` /
    ``rejected_mask`` (1.0 on response tokens) and 0.0 where the mask is 0. The policy's
    carry gradients; the reference's never do, and are None for reference-free objectives.
    The per-token reference log-probs are computed on first use only (one forward pass
    without gradient), so terms that do not read them cost nothing. ``columns`` holds the
    data's numeric fields, one float32 value per pair (``{"unsafe": (B,)}``).
    """

    policy_chosen: mx.array
    policy_rejected: mx.array
    policy_chosen_tokens: mx.array
    policy_rejected_tokens: mx.array
    chosen_mask: mx.array
    rejected_mask: mx.array
    chosen_length: mx.array
    rejected_length: mx.array
    reference_chosen: Optional[mx.array]
    reference_rejected: Optional[mx.array]
    columns: dict[str, mx.array]
    beta: float
    _token_reference: Optional[Callable[[], mx.array]] = field(default=None, repr=False)
    _reference_tokens: Optional[mx.array] = field(default=None, repr=False)

    def _ref_tokens(self) -> mx.array:
        if self._reference_tokens is None:
            if self._token_reference is None:
                raise LossTermError("per-token reference log-probs are not available: this objective has no reference")
            self._reference_tokens = self._token_reference()
        return self._reference_tokens

    @property
    def reference_chosen_tokens(self) -> mx.array:
        """(B, T) reference log-probs of the chosen responses, 0.0 off the mask."""
        b = self.policy_chosen.shape[0]
        return self._ref_tokens()[:b] * self.chosen_mask

    @property
    def reference_rejected_tokens(self) -> mx.array:
        """(B, T) reference log-probs of the rejected responses, 0.0 off the mask."""
        b = self.policy_chosen.shape[0]
        return self._ref_tokens()[b:] * self.rejected_mask


@dataclass
class LossTerm:
    name: str
    fn: Callable[..., mx.array]
    weight: float
    kwargs: dict

    def __call__(self, inputs: TermInputs) -> mx.array:
        """The term's value for the batch: a scalar (a per-pair result is averaged)."""
        try:
            value = self.fn(inputs, **self.kwargs)
        except LossTermError as e:
            raise LossTermError(f"loss term {self.name!r}: {e}") from None
        except Exception as e:
            raise LossTermError(f"loss term {self.name!r} raised {error_text(e)}") from e
        b = inputs.policy_chosen.shape[0]
        if not isinstance(value, mx.array):
            raise LossTermError(f"loss term {self.name!r} returned {type(value).__name__}, not an MLX array (scalar or one value per pair)")
        if value.shape not in ((), (b,), (1,)):
            raise LossTermError(f"loss term {self.name!r} returned shape {tuple(value.shape)}; expected a scalar or ({b},), one value per pair")
        if not mx.issubdtype(value.dtype, mx.floating):
            raise LossTermError(f"loss term {self.name!r} returned {value.dtype}, not a floating-point array")
        return value.mean() if value.ndim else value


RESERVED = ("fn", "weight", "name")


def load_loss_terms(entries: list, search_dirs: list) -> list[LossTerm]:
    """The configured terms, each found before training (a misspelt name fails in the first second).

    An entry is ``{fn: module.function, weight: w, name: optional, **kwargs}``; the module is a
    ``.py`` file beside the config, else an importable module. A term
    is named by its function, or by ``name``; repeats get ``_2``, ``_3``.
    """
    dirs = list(dict.fromkeys(Path(d) for d in search_dirs if d is not None))
    terms, taken = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("fn"), str) or not entry["fn"].strip():
            raise LossTermError(f"loss_terms entry {i + 1}: expected {{fn: module.function, weight: number, ...}}, got {entry!r}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise LossTermError(f"loss term {entry['fn']!r}: weight must be a number, not {weight!r}")
        attr, fn = find_function(entry["fn"].strip(), dirs, "loss term", LossTermError, "constraints.no_chosen_drop")
        base = str(entry.get("name") or attr)
        name, k = base, 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        kwargs = {key: v for key, v in entry.items() if key not in RESERVED}
        terms.append(LossTerm(name, fn, float(weight), kwargs))
    return terms


def term_inputs(
    token_logps: mx.array,
    mask: mx.array,
    reference: Optional[mx.array],
    batch: dict,
    beta: float,
    token_reference: Optional[Callable[[], mx.array]] = None,
) -> TermInputs:
    """``TermInputs`` from the policy's per-token log-probs and mask of a pair batch (chosen rows
    first), the summed reference log-probs (or None) and the batch's ``column.*`` fields."""
    mask = mask.astype(mx.float32)
    tokens = token_logps * mask
    summed, lengths = tokens.sum(axis=-1), mask.sum(axis=-1)
    b = summed.shape[0] // 2
    columns = {k[len("column."):]: v for k, v in batch.items() if k.startswith("column.")}
    return TermInputs(
        policy_chosen=summed[:b], policy_rejected=summed[b:],
        policy_chosen_tokens=tokens[:b], policy_rejected_tokens=tokens[b:],
        chosen_mask=mask[:b], rejected_mask=mask[b:],
        chosen_length=lengths[:b], rejected_length=lengths[b:],
        reference_chosen=reference[:b] if reference is not None else None,
        reference_rejected=reference[b:] if reference is not None else None,
        columns=columns, beta=beta, _token_reference=token_reference,
    )
