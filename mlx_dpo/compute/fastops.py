"""Vectorised exponentials for a CPU: ``fastops.cpp`` built as an MLX extension, and the models'
SwiGLU MLPs switched to it.

MLX's x86 CPU build computes ``exp`` and ``sigmoid`` one element at a time. On SmolLM2 that made
the SiLU of every MLP (policy and reference forward) and the vocabulary's log-softmax a large
share of a DPO step (BENCHMARKS.md). ``fastops.cpp`` computes both as MLX operations of their own
(so they run inside ``value_and_grad``, on MLX's streams), with loops the compiler vectorises.

Every function here falls back to MLX's own operations where the extension does not build
(``extension()`` says why), off the CPU, or for anything but float32, so callers need not ask.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import activations, llama

from .._platform import extension as build_extension

SOURCE = os.path.join(os.path.dirname(__file__), "fastops.cpp")
NAME = "_mlx_dpo_fastops"


@functools.cache
def extension() -> tuple[Optional[ModuleType], str]:
    """``(module, how it was built)``, or ``(None, why not)``; built once per machine, loaded
    once per process, and used only once it has computed what MLX computes on a few values."""
    module, how = build_extension.build(SOURCE, NAME)
    if module is None:
        return None, how
    why = _disagreement(module)
    return (module, how) if not why else (None, why)


def _disagreement(module: ModuleType) -> str:
    """Why ``module`` cannot serve (its results are not MLX's, or its functions do not take
    ``mx.array``: a nanobind unlike the one MLX was built with), or ``""``."""
    z = mx.array([[-100.0, -20.0, -1.5, -0.25, 0.0, 0.5, 3.0, 30.0]])
    with mx.stream(mx.cpu):
        try:
            got = [module.swiglu(z, z + 1), module.exp_shifted(z, z.max(axis=-1))]
            mx.eval(got)
        except (TypeError, RuntimeError, ValueError) as e:
            return f"the extension does not work with this MLX: {str(e).splitlines()[0]}"
        want = [nn.silu(z) * (z + 1), mx.exp(z - z.max(axis=-1, keepdims=True))]
    if not all(mx.allclose(g, w, rtol=1e-5, atol=1e-30).item() for g, w in zip(got, want)):
        return "the extension's results differ from MLX's"
    return ""


def _fast(*arrays: mx.array) -> Optional[ModuleType]:
    """The extension, where it can compute on ``arrays``: float32 on the CPU."""
    if mx.default_device() != mx.cpu or any(a.dtype != mx.float32 for a in arrays):
        return None
    return extension()[0]


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x``, mlx-lm's ``swiglu``: one operation (and one for its gradient) with a
    vectorised sigmoid on a CPU."""
    fast = _fast(gate, x) if gate.shape == x.shape else None
    return fast.swiglu(gate, x) if fast is not None else activations.swiglu(gate, x)


def exp_shifted(z: mx.array, top: mx.array) -> mx.array:
    """``exp(z - top[..., None])`` for ``top`` the maximum of each row of ``z`` (every argument
    is at most 0); no gradient of its own."""
    fast = _fast(z, top)
    return fast.exp_shifted(z, top) if fast is not None else mx.exp(z - top[..., None])


def _swiglu_mlp_call(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_swiglu_mlp(cls: type) -> bool:
    """Whether ``cls.__call__`` is, to the bytecode, mlx-lm's Llama MLP: ``down_proj(swiglu(gate_proj(x),
    up_proj(x)))`` with ``swiglu`` mlx-lm's. Most of mlx-lm's dense families (Qwen, Mistral, Llama,
    OLMo...) define their MLP so."""
    call, model = getattr(cls.__call__, "__code__", None), llama.MLP.__call__.__code__
    if call is None or (call.co_code, call.co_names, call.co_varnames) != (model.co_code, model.co_names, model.co_varnames):
        return False
    return cls.__call__.__globals__.get("swiglu") is activations.swiglu  # the name __call__ looks up


@functools.cache
def _fast_class(cls: type) -> type:
    return type(cls.__name__, (cls,), {"__call__": _swiglu_mlp_call, "__module__": cls.__module__, "_mlx_dpo_fast": True,
                                       "__doc__": f"{cls.__module__}.{cls.__name__} with mlx_dpo's fastops.swiglu."})


def use_fast_mlps(model: nn.Module) -> int:
    """Give every SwiGLU MLP of ``model`` (``_is_swiglu_mlp``) ``swiglu`` from here; how many.

    It changes the class of those module objects only (to a subclass computing the same thing),
    so the policy and a separate reference model must both pass through here to agree to the
    last bit."""
    changed = 0
    for _, module in model.named_modules():
        cls = type(module)
        if not getattr(cls, "_mlx_dpo_fast", False) and _is_swiglu_mlp(cls):
            module.__class__ = _fast_class(cls)
            changed += 1
    return changed
