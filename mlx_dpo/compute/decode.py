"""Decode steps on a CPU at the speed of memory: the sampling model's linear layers (and a tied
vocabulary head) multiplied by a small C kernel instead of the BLAS.

A decode step multiplies a few rows, one token per sequence, by every weight matrix, so its cost is
reading the weights once. A BLAS GEMM copies (packs) each matrix before using it, and at 8 rows
reaches a third to a half of the memory bandwidth here (BENCHMARKS.md). ``decode_kernel.c`` reads
weights packed once per rollout instead, the adapters merged in on the way, and gets close to it.

``decode_weights(model, fast)`` is what sampling wraps itself in:

- ``fast`` off: the model as it is;
- the kernel built (``_platform/cc.py``): every float32 linear layer, LoRA/DoRA-adapted or not,
  and a float32 embedding that is also the vocabulary head (``as_linear``, where the model has
  no ``lm_head``) is packed on entry; each decode
  batch then runs inside ``decoding()``, which swaps in ``PackedLinear``/``PackedEmbedding``
  layers and back. Prefill keeps the model's own layers (many rows: the BLAS is the right tool);
  quantized layers keep theirs;
- no compiler: the adapters merged into MLX weights (``reference.adapters_merged``) throughout.

The sampled distribution is the adapted model's up to float rounding, as with the adapter layers
(tests/compute/test_decode.py bounds it against float64 NumPy).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .._platform import blas, cc
from .reference import adapters_merged, modules_replaced

MAX_ROWS = 16  # more rows than this per call (a prefill, big batches): the model's own layer
SOURCE = os.path.join(os.path.dirname(__file__), "decode_kernel.c")
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


@dataclass(frozen=True)
class Kernel:
    """The compiled ``decode_kernel.c``: ``pack`` a weight (and adapter), ``matmul`` rows by it."""

    lib: ctypes.CDLL
    tile: int
    how: str  # compiler, flags, threading

    def packed_shape(self, weight_shape: tuple) -> tuple[int, int, int]:
        n_out, k = weight_shape
        return -(-n_out // self.tile), k, self.tile

    def pack(self, weight: np.ndarray, lora: Optional[tuple[np.ndarray, np.ndarray, float]], out: np.ndarray, threads: int) -> None:
        """``out`` (``packed_shape``, C-contiguous float32) = the packed ``weight + scale (a b)^T``."""
        n_out, k = weight.shape
        a, b, scale = lora if lora is not None else (None, None, 0.0)
        rank = a.shape[1] if a is not None else 0
        self.lib.pack(weight.ctypes.data, a.ctypes.data if a is not None else None, b.ctypes.data if b is not None else None,
                      scale, rank, n_out, k, out.ctypes.data, threads)

    def matmul(self, x: np.ndarray, packed: np.ndarray, n_out: int, threads: int) -> np.ndarray:
        if x.shape[1] != packed.shape[1]:  # the C code would read past the buffer
            raise ValueError(f"rows of {x.shape[1]} values for a weight of {packed.shape[1]} inputs")
        y = np.empty((x.shape[0], n_out), np.float32)
        self.lib.rows_matmul(x.ctypes.data, packed.ctypes.data, y.ctypes.data, x.shape[0], x.shape[1], n_out, threads)
        return y


@functools.lru_cache(maxsize=1)
def load_kernel() -> tuple[Optional[Kernel], str]:
    """The kernel built for this machine (once per process), or None and why not."""
    lib, how = cc.build(SOURCE)
    if lib is None:
        return None, how
    lib.pack.argtypes = [_P, _P, _P, _F, _I, _I, _I, _P, _I]
    lib.rows_matmul.argtypes = [_P, _P, _P, _I, _I, _I, _I]
    return Kernel(lib, int(lib.tile_width()), how), how


def _host(a: mx.array) -> np.ndarray:
    """A C-contiguous float32 NumPy view (or copy) of an evaluated array."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


class _Packed(nn.Module):
    """Shared by both packed layers: few float32 rows through the kernel, others to the layer itself."""

    def __init__(self, kernel: Kernel, packed: np.ndarray, n_out: int, threads: int, original: nn.Module):
        super().__init__()
        # Plain attributes, not children: neither is a parameter of the sampling model.
        object.__setattr__(self, "_run", functools.partial(kernel.matmul, packed=packed, n_out=n_out, threads=threads))
        object.__setattr__(self, "_original", original)

    @staticmethod
    def _fits(x: mx.array) -> bool:
        return x.size // x.shape[-1] <= MAX_ROWS and x.dtype == mx.float32

    def _project(self, x: mx.array) -> mx.array:
        mx.eval(x)
        y = self._run(_host(x).reshape(-1, x.shape[-1]))
        return mx.array(y).reshape(*x.shape[:-1], y.shape[-1])


class PackedLinear(_Packed):
    def __call__(self, x: mx.array) -> mx.array:
        if not self._fits(x):
            return self._original(x)
        out = self._project(x)
        return out + self["bias"] if "bias" in self else out


class PackedEmbedding(_Packed):
    def __call__(self, ids: mx.array) -> mx.array:
        return self._original(ids)

    def as_linear(self, x: mx.array) -> mx.array:
        return self._project(x) if self._fits(x) else self._original.as_linear(x)


def _packable(module: nn.Module, tied_head: bool) -> Optional[tuple[mx.array, Optional[tuple]]]:
    """(float32 weight, LoRA (a, b, scale) or None) of a layer the kernel can take, else None.
    An embedding counts only where it is also the vocabulary head (``tied_head``)."""
    if "lora_a" in module:
        base = module.get("linear")
        if not isinstance(base, nn.Linear) or base.weight.dtype != mx.float32:
            return None  # quantized (or an embedding adapter): the layer stays as it is
        if "m" in module:  # DoRA: its merged weight is mlx-lm's fuse (rows rescaled to m)
            return module.fuse().weight, None
        return base.weight, (module.lora_a, module.lora_b, float(module.scale))
    kinds = (nn.Linear, nn.Embedding) if tied_head else (nn.Linear,)
    if type(module) in kinds and module.weight.dtype == mx.float32:
        return module.weight, None
    return None


def _packed_layers(model: nn.Module, kernel: Kernel, threads: int, keep: dict) -> list[tuple[str, nn.Module]]:
    """The packed layers, each as ``(name of the layer it stands in for, module)``. The packed
    weights share one buffer, kept in ``keep["arena"]`` for the next call: a fresh one would be
    mapped page by page again each rollout."""
    modules = model.named_modules()
    tied_head = "lm_head" not in dict(modules)
    found, names = [], set()
    for name, module in modules:
        if name.rpartition(".")[0] in names:
            continue  # an adapter's own base layer
        if (weight_lora := _packable(module, tied_head)) is not None:
            found.append((name, module, weight_lora))
            names.add(name)
    shapes = [kernel.packed_shape(w.shape) for _, _, (w, _) in found]
    size = sum(int(np.prod(s)) for s in shapes)
    arena = keep.get("arena")
    if arena is None or arena.size != size:
        keep["arena"] = arena = np.empty(size, np.float32)
    packed, at = [], 0
    for (name, module, (weight, lora)), shape in zip(found, shapes):
        mx.eval(weight, list(lora[:2]) if lora else [])
        matrix = arena[at : at + int(np.prod(shape))].reshape(shape)
        at += matrix.size
        kernel.pack(_host(weight), (_host(lora[0]), _host(lora[1]), lora[2]) if lora else None, matrix, threads)
        kind = PackedEmbedding if isinstance(module, nn.Embedding) else PackedLinear
        layer = kind(kernel, matrix, weight.shape[0], threads, module)
        base = module["linear"] if "lora_a" in module else module
        if kind is PackedLinear and "bias" in base:
            layer["bias"] = base["bias"]
        packed.append((name, layer))
    return packed


@contextlib.contextmanager
def decode_weights(model: nn.Module, fast: bool, threads: int = 0, keep: Optional[dict] = None) -> Iterator[Callable[[], ContextManager]]:
    """Yields ``decoding()``: a context to run each batch's decode steps in (see the module's
    docstring). The kernel runs on ``threads`` threads (0: as many as the BLAS has now). What it
    computes does not depend on the count: each output is one sum over k, in order. ``keep``: a
    dict of the caller's that holds the packed weights' memory from one call to the next (the
    size of the float32 weights; None: freed on exit)."""
    if not fast:
        yield contextlib.nullcontext
        return
    kernel = load_kernel()[0]
    if kernel is None:
        with adapters_merged(model):
            yield contextlib.nullcontext
        return
    packed = _packed_layers(model, kernel, threads or blas.get_threads() or 1, {} if keep is None else keep)
    yield functools.partial(modules_replaced, model, packed)
