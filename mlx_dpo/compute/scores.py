"""A scalar score per sequence: the reward model's forward pass.

A reward model is the language model's body with a linear head of one output (``score``, no
bias: the name and shape of transformers' sequence-classification head) read at each row's last
real token, which for trained pairs is the EOS that ends the response (as TRL's ``RewardTrainer``
appends it). The head is an attribute of the model, so its weight trains with the adapters; it is
saved beside them as ``score_head.safetensors`` (``score.weight``, shape ``(1, hidden)``), so the
adapter folder still loads in ``mlx_lm.generate`` and ``mlx_lm.fuse``, which refuse unknown keys.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .logps import split_head

SCORE = "score"  # the head's attribute, and the prefix of its weight's key
HEAD = "score_head.safetensors"  # beside adapters.safetensors


class ScoreHeadError(ValueError):
    """The model cannot carry a score head, or a folder holds none."""


def hidden_size(model: nn.Module) -> int:
    parts = split_head(model)
    if parts is None:
        raise ScoreHeadError(f"a reward model needs a known architecture; {getattr(model, 'model_type', type(model).__name__)} is not one")
    return int(parts[0].embed_tokens.weight.shape[-1])


def add_score_head(model: nn.Module, seed: int = 0) -> None:
    """Give ``model`` a trainable ``score`` head (hidden -> 1), initialised as transformers does
    (normal, std 0.02) from ``seed`` so that a run is repeatable."""
    width = hidden_size(model)
    head = nn.Linear(width, 1, bias=False)
    head.weight = 0.02 * mx.random.normal((1, width), key=mx.random.key(seed))
    setattr(model, SCORE, head)


def sequence_scores(model: nn.Module, tokens: mx.array, lengths: mx.array) -> mx.array:
    """(N,) float32 score of each right-padded row of ``tokens`` at its last real token (``lengths - 1``)."""
    body, _ = split_head(model)
    hidden = body(tokens)
    last = (lengths.astype(mx.int32) - 1)[:, None, None]
    picked = mx.take_along_axis(hidden, last, axis=1).squeeze(1)
    return model[SCORE](picked).squeeze(-1).astype(mx.float32)


def head_file_for(adapter_file: Path) -> Path:
    """``adapters.safetensors`` -> ``score_head.safetensors``; ``N_adapters.safetensors`` -> ``N_score_head.safetensors``."""
    adapter_file = Path(adapter_file)
    if adapter_file.name == "adapters.safetensors":
        return adapter_file.with_name(HEAD)
    stem = adapter_file.name.removesuffix(".safetensors").removesuffix("_adapters")
    return adapter_file.with_name(f"{stem}_score_head.safetensors")


def load_head(model: nn.Module, adapter_file: Path) -> bool:
    """Load the score head saved beside ``adapter_file`` into ``model``; whether there was one."""
    path = head_file_for(adapter_file)
    if not path.is_file():
        return False
    model.load_weights(list(mx.load(str(path)).items()), strict=False)
    return True
