"""Checkpoints that survive a kill at any moment and resume exactly.

A checkpoint is the adapter weights in mlx-lm's format (``adapters.safetensors``,
numbered ``0000100_adapters.safetensors``) plus a training-state file beside
them (``training_state.safetensors``, numbered ``0000100_state.safetensors``)
with the optimizer state (moments and step, which also positions the
learning-rate schedule) and the step in its metadata. A reward model's score head, which mlx-lm's
adapter loader would refuse, goes in a third file (``score_head.safetensors``,
``0000100_score_head.safetensors``). The random state needs
no saving: the trainer reseeds from ``(seed, step)`` before every step, and the
batch order is a function of ``(seed, epoch)``. Every file is written to a
temporary name and renamed, so a crash leaves the previous complete file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .._platform.files import atomic_save_safetensors
from ..compute.scores import SCORE, head_file_for, load_head

STATE_FORMAT = "mlx-dpo-training-state-1"
ADAPTERS = "adapters.safetensors"
STATE = "training_state.safetensors"


def save_adapters(model: nn.Module, path: Path, step: Optional[int] = None) -> None:
    """The trainable weights in mlx-lm's adapter format, written atomically.

    The step goes into the file's metadata (mlx-lm ignores it) so a resume can
    check that adapters and training state belong together.
    """
    meta = {"step": str(step)} if step is not None else {}
    weights = dict(tree_flatten(model.trainable_parameters()))
    head = {k: weights.pop(k) for k in list(weights) if k.startswith(f"{SCORE}.")}
    if head:
        atomic_save_safetensors(head_file_for(path), head, meta)
    atomic_save_safetensors(path, weights, meta)


def state_file_for(adapter_file: Path) -> Path:
    """``adapters.safetensors`` -> ``training_state.safetensors``; ``N_adapters.safetensors`` ->
    ``N_state.safetensors``; any other ``X.safetensors`` -> ``X_state.safetensors``."""
    adapter_file = Path(adapter_file)
    if adapter_file.name == ADAPTERS:
        return adapter_file.with_name(STATE)
    stem = adapter_file.name.removesuffix(".safetensors").removesuffix("_adapters")
    return adapter_file.with_name(f"{stem}_state.safetensors")


def save_checkpoint(model: nn.Module, optimizer, adapter_file: Path, step: int, numbered: bool = True) -> list[Path]:
    """Write adapters + optimizer state for ``step`` (and numbered copies); state first, adapters last."""
    adapter_file = Path(adapter_file)
    state = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
    meta = {"format": STATE_FORMAT, "step": str(step)}
    targets = ([adapter_file.with_name(f"{step:07d}_adapters.safetensors")] if numbered else []) + [adapter_file]
    for target in targets:  # numbered pair first: a kill never leaves only a mismatched latest pair
        atomic_save_safetensors(state_file_for(target), state, meta)
        save_adapters(model, target, step)
    return targets


def load_training_state(path: Path) -> tuple[dict, int]:
    """(optimizer state tree, step) from a training-state file."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an mlx-dpo training state")
    return tree_unflatten(list(arrays.items())), int(meta["step"])


def restore(model: nn.Module, optimizer, adapter_file: Path) -> int:
    """Load adapter weights and, where a training state sits beside them, the optimizer.

    Returns the step to continue after (0 when only weights were found, as
    mlx-lm's ``resume_adapter_file`` does).
    """
    weights, meta = mx.load(str(adapter_file), return_metadata=True)
    model.load_weights(list(weights.items()), strict=False)
    if SCORE in model and not load_head(model, adapter_file):
        raise ValueError(f"{adapter_file} has no reward model's score head beside it ({head_file_for(adapter_file).name})")
    state_file = state_file_for(adapter_file)
    if not state_file.is_file():
        return 0
    state, step = load_training_state(state_file)
    if meta.get("step") not in (None, str(step)):
        numbered = adapter_file.with_name(f"{int(meta['step']):07d}_adapters.safetensors")
        raise ValueError(
            f"{adapter_file} (step {meta['step']}) and {state_file} (step {step}) are from different steps "
            f"(a write was interrupted): resume from {numbered}"
        )
    optimizer.state = state
    return step
