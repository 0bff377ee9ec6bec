"""What a loss term sees and how terms are loaded: the public names for your own terms
(``from mlx_dpo.loss_terms import TermInputs``); the code lives in ``objectives/terms.py``."""

from .objectives.terms import (
    LossTerm,
    LossTermError,
    TermInputs,
    load_loss_terms,
    term_inputs,
)

__all__ = ["LossTerm", "LossTermError", "TermInputs", "load_loss_terms", "term_inputs"]
