"""A trained reward model (``loss_type: reward``) as a reward function: ``reward_model: PATH``.

It scores each completion after its prompt, tokenized as the reward model was trained (the
prompt's text or chat template, the completion, one EOS) and read at that EOS, batched. The
folder is the one training wrote: ``adapter_config.json`` names the base model,
``adapters.safetensors`` holds the LoRA (or full) weights and ``score_head.safetensors`` the
head. A completion that is empty gets no score (None: no opinion, as a reward function's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import load

from ..compute.forward import eval_mode
from ..compute.scores import HEAD, add_score_head, load_head, sequence_scores
from ..data import DataError
from ..data.tokenize import tokenize_parts
from .rewards import RewardError


class RewardModel:
    """``fn(prompts, completions, **_) -> list[float | None]``: a reward model's score of each completion."""

    def __init__(self, model: nn.Module, tokenizer, name: str, batch_size: int = 8):
        self.model, self.tokenizer, self.__name__, self.batch_size = model, tokenizer, name, batch_size

    def tokens(self, prompt, completion) -> Optional[list[int]]:
        """The prompt and completion as training tokenized a pair's prompt and response (None if empty)."""
        try:
            prompt_ids, response_ids = tokenize_parts(prompt, (completion,), ("completion",), None, self.tokenizer)
        except DataError:
            return None
        return list(prompt_ids) + list(response_ids)

    def __call__(self, prompts: list, completions: list, **_) -> list[Optional[float]]:
        rows = [self.tokens(p, c) for p, c in zip(prompts, completions)]
        real = [i for i, r in enumerate(rows) if r is not None]
        out: list[Optional[float]] = [None] * len(rows)
        with eval_mode(self.model):
            for start in range(0, len(real), self.batch_size):
                chunk = real[start : start + self.batch_size]
                width = max(len(rows[i]) for i in chunk)
                tokens = np.zeros((len(chunk), width), np.int32)
                for r, i in enumerate(chunk):
                    tokens[r, : len(rows[i])] = rows[i]
                lengths = mx.array([len(rows[i]) for i in chunk], mx.int32)
                scores = sequence_scores(self.model, mx.array(tokens), lengths).tolist()
                for i, s in zip(chunk, scores):
                    out[i] = float(s)
        return out


def load_reward_model(path: str, batch_size: int = 8) -> RewardModel:
    """The reward model trained into folder ``path``; a folder that is not one is a RewardError."""
    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not (config_file.is_file() and (folder / HEAD).is_file()):
        raise RewardError(f"reward_model {path!r} is not a reward model's folder (adapter_config.json and {HEAD}, "
                          "written by a run with loss_type: reward)")
    base = json.loads(config_file.read_text()).get("model")
    if not base:
        raise RewardError(f"reward_model {path!r}: its adapter_config.json names no base model ('model')")
    model, tokenizer = load(base, adapter_path=str(folder))
    add_score_head(model)
    load_head(model, folder / "adapters.safetensors")
    model.freeze()
    return RewardModel(model, tokenizer, folder.resolve().name, batch_size)
