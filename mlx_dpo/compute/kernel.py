"""``decode_kernel.c`` built for this machine (``_platform/cc.py``) and its functions on NumPy arrays.

The C code reads its arguments' memory as it is: every method here checks the shapes and makes
each array C-contiguous float32 first, so a wrong shape is an error rather than a read past a
buffer.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .._platform import cc

SOURCE = os.path.join(os.path.dirname(__file__), "decode_kernel.c")
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32)


@dataclass(frozen=True)
class Packed:
    """A weight packed by ``Kernel.pack`` ((tiles, inputs, tile) float32), its output count, and
    the layer's bias (or None)."""

    matrix: np.ndarray
    n_out: int
    bias: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Dims:
    """A decoder layer's sizes and constants, as ``decode_layers`` takes them."""

    hidden: int
    heads: int
    kv_heads: int
    dim: int  # per head
    inter: int  # the MLP's inner width
    eps: float
    scale: float  # the attention's query scale
    traditional: bool  # rotary pairs interleaved (else the two halves)


class _Layers(ctypes.Structure):  # decode_kernel.c's Layers
    _fields_ = [(n, ctypes.c_int) for n in ("layers", "hidden", "heads", "kv_heads", "dim", "inter", "traditional", "threads")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("weights", ctypes.POINTER(ctypes.c_void_p)), ("biases", ctypes.POINTER(ctypes.c_void_p)), ("norms", ctypes.POINTER(ctypes.c_void_p))]


class _Cache(ctypes.Structure):  # decode_kernel.c's Cache
    _fields_ = [("rows", ctypes.c_int), ("capacity", ctypes.c_int), ("slot", ctypes.c_int),
                ("keys", ctypes.POINTER(ctypes.c_void_p)), ("values", ctypes.POINTER(ctypes.c_void_p)),
                ("start", ctypes.c_void_p), ("position", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p)]


def _buffers_fit(c: "Slots", shape: tuple) -> bool:
    return (c.keys.shape == c.values.shape == shape and c.keys.dtype == c.values.dtype == np.float32
            and c.keys.flags.c_contiguous and c.values.flags.c_contiguous)


def _slots_fit(c: "Slots", rows: int, kv_heads: int, dim: int) -> bool:
    """Whether the C code may read ``c`` for ``rows`` rows of ``kv_heads`` heads of ``dim``: the
    buffers' shapes and layout, the slot inside them, and every start and position inside the
    slots and the rotation tables."""
    capacity = c.keys.shape[2]
    return (_buffers_fit(c, (rows, kv_heads, capacity, dim)) and 0 <= c.slot < capacity
            and c.start.shape == c.position.shape == (rows,) and c.cos.shape == c.sin.shape == (c.cos.shape[0], dim // 2)
            and all(a.dtype == np.float32 and a.flags.c_contiguous for a in (c.cos, c.sin))
            and int(c.position.min(initial=0)) >= 0 and int(c.position.max(initial=0)) < c.cos.shape[0]
            and int(c.start.min(initial=0)) >= 0 and int(c.start.max(initial=0)) <= c.slot)


def _pointers(arrays: list) -> ctypes.Array:
    return (ctypes.c_void_p * len(arrays))(*[a.ctypes.data if a is not None else None for a in arrays])


@dataclass(frozen=True)
class LayerStack:
    """Every decoder layer's packed weights (``PROJECTIONS`` order) and norms (input,
    post-attention, per-head q and k or None), checked against ``dims`` and held as the C record."""

    dims: Dims
    weights: list  # per layer, 7 Packed
    norms: list  # per layer, 4 arrays or None
    record: _Layers
    keep: tuple  # the pointer arrays the record points into


@dataclass(frozen=True)
class Slots:
    """One layer's cache as ``attend`` takes it: keys and values (rows, kv heads, capacity, dim),
    the slot the new token goes to, each row's first real slot and rotary position, and the
    rotation tables (positions, dim / 2), the pairs interleaved where ``traditional``."""

    keys: np.ndarray
    values: np.ndarray
    slot: int
    start: np.ndarray
    position: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    traditional: bool


@dataclass(frozen=True)
class Kernel:
    """``pack`` a weight (and adapter), ``matmul`` rows by it; ``rms_norm``, ``silu_mul`` and
    ``attend``: the rest of a decode step (``host_decode``)."""

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
        x = _f32(x)
        y = np.empty((x.shape[0], n_out), np.float32)
        self.lib.rows_matmul(x.ctypes.data, packed.ctypes.data, y.ctypes.data, x.shape[0], x.shape[1], n_out, threads)
        return y

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """RMSNorm over the last axis of ``x``, scaled by ``weight``."""
        if x.shape[-1] != weight.shape[0]:
            raise ValueError(f"rows of {x.shape[-1]} values for a norm of {weight.shape[0]}")
        x, weight = _f32(x), _f32(weight)
        out = np.empty_like(x)
        self.lib.rms_norm(x.ctypes.data, weight.ctypes.data, eps, x.size // x.shape[-1], x.shape[-1], out.ctypes.data)
        return out

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        if gate.shape != up.shape:
            raise ValueError(f"gate {gate.shape} and up {up.shape} differ")
        gate, up = _f32(gate), _f32(up)
        out = np.empty_like(gate)
        self.lib.silu_mul(gate.ctypes.data, up.ctypes.data, gate.size, out.ctypes.data)
        return out

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: Slots, scale: float, threads: int) -> np.ndarray:
        """Rotate ``q`` (rows, heads, dim) and ``k`` (rows, kv heads, dim) to each row's
        position, write k and ``v`` to the cache's slot (in place), and attend over each row's
        slots ``[start, slot]``, queries scaled by ``scale``. Returns (rows, heads * dim)."""
        c = cache
        rows, heads, dim = q.shape
        kv_heads, capacity = c.keys.shape[1], c.keys.shape[2]
        ok = k.shape == v.shape == (rows, kv_heads, dim) and heads % kv_heads == 0 and dim % 2 == 0
        if not ok or not _slots_fit(c, rows, kv_heads, dim):
            raise ValueError(f"attend: shapes do not fit: q {q.shape}, k {k.shape}, v {v.shape}, cache {c.keys.shape}, slot {c.slot}")
        q, k, v = _f32(q), _f32(k), _f32(v)
        start, position = np.ascontiguousarray(c.start, np.int64), np.ascontiguousarray(c.position, np.int64)
        out = np.empty((rows, heads * dim), np.float32)
        if self.lib.attend(q.ctypes.data, k.ctypes.data, v.ctypes.data, c.keys.ctypes.data, c.values.ctypes.data, rows, heads,
                           kv_heads, dim, capacity, c.slot, start.ctypes.data, position.ctypes.data, c.cos.ctypes.data,
                           c.sin.ctypes.data, int(c.traditional), scale, out.ctypes.data, threads):
            raise MemoryError("attend: out of memory")
        return out

    def stack(self, dims: Dims, weights: list[list[Packed]], norms: list[list[Optional[np.ndarray]]], threads: int) -> LayerStack:
        """The layers as ``decode_layers`` runs them; a weight or norm of the wrong size is refused."""
        ins = (dims.hidden,) * 3 + (dims.heads * dims.dim,) + (dims.hidden,) * 2 + (dims.inter,)
        outs = (dims.heads * dims.dim,) + (dims.kv_heads * dims.dim,) * 2 + (dims.hidden,) + (dims.inter,) * 2 + (dims.hidden,)
        sizes = (dims.hidden, dims.hidden, dims.dim, dims.dim)
        for layer, (ws, ns) in enumerate(zip(weights, norms)):
            bad = [w for w, k, n in zip(ws, ins, outs) if w.matrix.shape != self.packed_shape((n, k)) or w.n_out != n
                   or (w.bias is not None and w.bias.shape != (n,))]
            bad += [x for x, n in zip(ns, sizes) if x is not None and x.shape != (n,)]
            if len(ws) != 7 or len(ns) != 4 or ns[0] is None or ns[1] is None or bad or dims.heads % dims.kv_heads:
                raise ValueError(f"layer {layer}: weights or norms do not fit {dims}")
        flat_w = [w.matrix for ws in weights for w in ws]
        flat_b = [_f32(w.bias) if w.bias is not None else None for ws in weights for w in ws]
        flat_n = [_f32(x) if x is not None else None for ns in norms for x in ns]
        keep = (_pointers(flat_w), _pointers(flat_b), _pointers(flat_n), flat_b, flat_n)
        record = _Layers(len(weights), dims.hidden, dims.heads, dims.kv_heads, dims.dim, dims.inter, int(dims.traditional),
                         threads, dims.eps, dims.scale, *keep[:3])
        return LayerStack(dims, weights, norms, record, keep)

    def decode_layers(self, stack: LayerStack, x: np.ndarray, caches: list[Slots]) -> np.ndarray:
        """``x`` (rows, hidden), the residual stream, through every layer: each attends over its
        cache in ``caches`` (the slot written in place; one slot, and the same start, position and
        rotation arrays, for every layer). Returns the stream after the last layer."""
        d, c0 = stack.dims, caches[0]
        rows, capacity = x.shape[0], c0.keys.shape[2]
        shared = ("start", "position", "cos", "sin")
        ok = (x.shape == (rows, d.hidden) and len(caches) == len(stack.weights) and _slots_fit(c0, rows, d.kv_heads, d.dim)
              and all(_buffers_fit(c, c0.keys.shape) and c.slot == c0.slot and all(getattr(c, f) is getattr(c0, f) for f in shared)
                      for c in caches))
        if not ok:
            raise ValueError(f"decode_layers: shapes do not fit: x {x.shape}, cache {c0.keys.shape}, slot {c0.slot}")
        x = np.array(x, np.float32, order="C")  # a copy: updated in place
        start, position = np.ascontiguousarray(c0.start, np.int64), np.ascontiguousarray(c0.position, np.int64)
        keys, values = _pointers([c.keys for c in caches]), _pointers([c.values for c in caches])
        cache = _Cache(rows, capacity, c0.slot, keys, values, start.ctypes.data, position.ctypes.data, c0.cos.ctypes.data, c0.sin.ctypes.data)
        if self.lib.decode_layers(ctypes.byref(stack.record), ctypes.byref(cache), x.ctypes.data):
            raise MemoryError("decode_layers: out of memory")
        return x

    def apply(self, w: Packed, x: np.ndarray, threads: int) -> np.ndarray:
        """``x`` (rows, inputs) times the packed weight, its bias added."""
        y = self.matmul(x, w.matrix, w.n_out, threads)
        return y if w.bias is None else y + w.bias


@functools.lru_cache(maxsize=1)
def load_kernel() -> tuple[Optional[Kernel], str]:
    """The kernel built for this machine (once per process), or None and why not."""
    lib, how = cc.build(SOURCE)
    if lib is None:
        return None, how
    lib.pack.argtypes = [_P, _P, _P, _F, _I, _I, _I, _P, _I]
    lib.rows_matmul.argtypes = [_P, _P, _P, _I, _I, _I, _I]
    lib.rms_norm.argtypes = [_P, _P, _F, _I, _I, _P]
    lib.silu_mul.argtypes = [_P, _P, _L, _P]
    lib.decode_layers.argtypes = [_P, _P, _P]
    lib.decode_layers.restype = lib.attend.restype = ctypes.c_int
    lib.attend.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _I, _F, _P, _I]
    return Kernel(lib, int(lib.tile_width()), how), how
