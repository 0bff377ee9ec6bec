"""Decode steps on a CPU at the speed of memory: the sampling model's linear layers (and a tied
vocabulary head) multiplied by a small C kernel instead of the BLAS.

A decode step multiplies a few rows, one token per sequence, by every weight matrix, so its cost is
reading the weights once. A BLAS GEMM copies (packs) each matrix before using it, and at 8 rows
reaches a third to a half of the memory bandwidth here (BENCHMARKS.md). ``decode_kernel.c`` reads
weights packed once per rollout instead, the adapters merged in on the way, and gets close to it.

``decode_weights(model, fast)`` is what sampling wraps itself in. It yields
``decoding(cache, max_tokens)``, a context giving the ``Step`` to run a batch's decode steps
with, over the batch cache a prefill filled:

- ``fast`` off: the model's own forward pass (``ModelStep``);
- the kernel built (``compute/kernel.py``): every float32 linear layer, LoRA/DoRA-adapted or not,
  and a float32 embedding that is also the vocabulary head (``as_linear``, where the model has
  no ``lm_head``) is packed on entry. Where ``host_decode`` knows the model (Llama, Mistral,
  Qwen2, Qwen3, every layer packed), the whole step runs on the host over a copy of the cache
  (``HostStep``); otherwise each decode batch runs the model's forward pass with
  ``PackedLinear``/``PackedEmbedding`` layers swapped in, and back afterwards. Prefill keeps the
  model's own layers (many rows: the BLAS is the right tool); quantized layers keep theirs;
- no compiler: the adapters merged into MLX weights (``reference.adapters_merged``) throughout.

The sampled distribution is the adapted model's up to float rounding, as with the adapter layers
(tests/compute/test_decode.py and test_host_decode.py bound it against float64 NumPy and the
model's own forward pass).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .._platform import blas
from .host_decode import HostCache, HostModel, can_run, host_array, host_cache, host_model, keep_rows
from .host_decode import step as host_step
from .kernel import Kernel, Packed, load_kernel
from .reference import adapters_merged, modules_replaced

MAX_ROWS = 16  # more rows than this per call (a prefill, big batches): the model's own layer
Decoding = Callable[[list, int], ContextManager]  # (batch cache, max new tokens) -> context giving the step


class _Packed(nn.Module):
    """Shared by both packed layers: few float32 rows through the kernel, others to the layer itself."""

    def __init__(self, kernel: Kernel, weight: Packed, threads: int, original: nn.Module):
        super().__init__()
        # Plain attributes, not children: none is a parameter of the sampling model.
        object.__setattr__(self, "weight_packed", weight)
        object.__setattr__(self, "_run", functools.partial(kernel.matmul, packed=weight.matrix, n_out=weight.n_out, threads=threads))
        object.__setattr__(self, "_original", original)

    @staticmethod
    def _fits(x: mx.array) -> bool:
        return x.size // x.shape[-1] <= MAX_ROWS and x.dtype == mx.float32

    def _project(self, x: mx.array) -> mx.array:
        mx.eval(x)
        y = self._run(host_array(x).reshape(-1, x.shape[-1]))
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


def _packable_layers(model: nn.Module) -> list[tuple[str, nn.Module, tuple]]:
    """``(name, layer, (weight, lora))`` of every layer the kernel can take."""
    modules = model.named_modules()
    tied_head = "lm_head" not in dict(modules)
    found, names = [], set()
    for name, module in modules:
        if name.rpartition(".")[0] in names:
            continue  # an adapter's own base layer
        if (weight_lora := _packable(module, tied_head)) is not None:
            found.append((name, module, weight_lora))
            names.add(name)
    return found


def _packed_layers(model: nn.Module, kernel: Kernel, threads: int, keep: dict) -> list[tuple[str, _Packed]]:
    """The packed layers, each as ``(name of the layer it stands in for, module)``. The packed
    weights share one buffer, kept in ``keep["arena"]`` for the next call: a fresh one would be
    mapped page by page again each rollout."""
    found = _packable_layers(model)
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
        kernel.pack(host_array(weight), (host_array(lora[0]), host_array(lora[1]), lora[2]) if lora else None, matrix, threads)
        kind = PackedEmbedding if isinstance(module, nn.Embedding) else PackedLinear
        base = module["linear"] if "lora_a" in module else module
        bias = base["bias"] if kind is PackedLinear and "bias" in base else None
        layer = kind(kernel, Packed(matrix, weight.shape[0], host_array(bias) if bias is not None else None), threads, module)
        if bias is not None:
            layer["bias"] = bias
        packed.append((name, layer))
    return packed


def whole_step_on_host(model: nn.Module) -> bool:
    """Whether ``fast_decode`` runs this model's whole decode step on the host (``host_decode``),
    rather than only its linear layers."""
    return load_kernel()[0] is not None and can_run(model, {name for name, _, _ in _packable_layers(model)})


class ModelStep:
    """A decode step by the model's own forward pass over mlx-lm's batch cache."""

    def __init__(self, model: nn.Module, cache: list):
        self.model, self.cache = model, cache

    def __call__(self, ids: mx.array) -> mx.array:
        return self.model(ids[:, None], cache=self.cache)[:, -1, :]

    def keep_rows(self, rows: list[int]) -> None:
        idx = mx.array(rows)
        for c in self.cache:
            c.filter(idx)


class HostStep:
    """A decode step by ``host_decode.step`` over the batch cache copied to the host."""

    def __init__(self, hm: HostModel, cache: HostCache):
        self.hm, self.cache = hm, cache

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.array(host_step(self.hm, self.cache, np.asarray(ids, np.int64)))

    def keep_rows(self, rows: list[int]) -> None:
        keep_rows(self.cache, np.array(rows))


Step = Union[ModelStep, HostStep]  # ids (rows,) -> logits (rows, vocab); ``keep_rows`` drops finished rows


@contextlib.contextmanager
def _on_host_or_swapped(model: nn.Module, packed: list, hm: Optional[HostModel], cache: list, max_tokens: int) -> Iterator:
    host = host_cache(hm, cache, max_tokens) if hm is not None else None
    if host is not None:
        yield HostStep(hm, host)
        return
    with modules_replaced(model, packed):
        yield ModelStep(model, cache)


@contextlib.contextmanager
def decode_weights(model: nn.Module, fast: bool, threads: int = 0, keep: Optional[dict] = None) -> Iterator[Decoding]:
    """Yields ``decoding(cache, max_tokens)``: a context giving the step (``ModelStep`` or
    ``HostStep``) to run a batch's decode steps with, over the batch cache a prefill filled (see
    the module's docstring). The kernel runs on ``threads`` threads (0: as many as the BLAS has
    now). What it computes does not depend on the count: each output is one sum over k, in order.
    ``keep``: a dict of the caller's that holds the packed weights' memory from one call to the
    next (the size of the float32 weights; None: freed on exit)."""
    plain: Decoding = lambda cache, max_tokens: contextlib.nullcontext(ModelStep(model, cache))  # noqa: E731
    if not fast:
        yield plain
        return
    kernel = load_kernel()[0]
    if kernel is None:
        with adapters_merged(model):
            yield plain
        return
    threads = threads or blas.get_threads() or 1
    packed = _packed_layers(model, kernel, threads, {} if keep is None else keep)
    hm = host_model(model, {name: layer.weight_packed for name, layer in packed}, kernel, threads)
    yield functools.partial(_on_host_or_swapped, model, packed, hm)
