"""A whole decode step of a Llama-shaped model on the host: every decoder layer in one call of
the decode kernel (``decode_kernel.c``'s ``decode_layers``) over the packed weights and a host
copy of the batch cache, with no MLX operation from the embedding to the logits.

With only the linear layers on the kernel (``compute/decode.py``), two thirds of a decode step
was MLX's own per-operation cost between them: about 25 small operations a layer, each a
dispatch and a scalar loop on a CPU (BENCHMARKS.md). At a few rows those operations are a few
thousand numbers each: microseconds in C.

What runs here is the forward pass of mlx-lm's ``llama`` (and so ``mistral``), ``qwen2`` and
``qwen3`` decoder blocks, read off the model: RMSNorm, q/k/v projections (with their biases
where the model has them), Qwen3's per-head q/k norms, the rotary embedding, grouped-query
attention over the cache, the output projection, SwiGLU, the final norm and the head. The rotary
embedding's cos/sin come from the model's own RoPE module (applied once to a basis vector), so
scaled variants (``linear``, ``llama3``) are covered as they are computed. Any other model, a
sliding window, a quantized or unpacked layer: ``host_model`` answers None and the caller keeps
the model's own layers.

The KV cache is moved from the MLX batch cache the prefill filled (same padding, same
positions), so prefill is unchanged. The logits are the adapted model's up to float32 rounding
(tests/compute/test_host_decode.py checks the parts against float64 NumPy and the logits against
the model's own step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.rope_utils import Llama3RoPE

from .kernel import Dims, Kernel, LayerStack, Packed, Slots

SUPPORTED = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
               "mlp.down_proj")  # the order decode_layers takes them in
NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")


@dataclass(frozen=True)
class HostModel:
    embed: np.ndarray  # (vocab, hidden): the embedding's own memory, not a copy
    stack: LayerStack  # the decoder layers, as the kernel runs them
    norm: np.ndarray
    head: Packed
    rope: nn.Module  # the model's, for its cos/sin tables
    kernel: Kernel
    threads: int


@dataclass
class HostCache:
    """One decode batch's keys and values, rows x kv heads x slots x head_dim per layer. Slots
    ``[0, length)`` are filled; a row's slots before its ``start`` are padding (masked)."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    length: int
    start: np.ndarray  # (rows,) first real slot of each row
    position: np.ndarray  # (rows,) rotary position of each row's next token
    cos: np.ndarray  # (positions, rotary pairs)
    sin: np.ndarray


def host_array(a: mx.array) -> np.ndarray:
    """A C-contiguous float32 NumPy view of an array (evaluated first; a copy only where it is
    another dtype or not contiguous): what the kernel's C code may read as it is."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def _module(root: nn.Module, dotted: str) -> Optional[nn.Module]:
    for part in dotted.split("."):
        root = root.get(part) if isinstance(root, nn.Module) else None
    return root


def _layout(model: nn.Module, packed: set[str]) -> Optional[Dims]:
    """The decoder's sizes where ``step`` can run it, else None: one of ``SUPPORTED`` as mlx-lm
    builds it, no sliding window, every projection and the head in ``packed``, float32 RMSNorms
    sharing one epsilon, a rotary embedding over the whole head of a kind ``_rope_tables`` reads."""
    if type(model).__module__ not in SUPPORTED or ("lm_head" not in packed and "model.embed_tokens" not in packed):
        return None
    inner = model.model
    layers, attn = inner.layers, inner.layers[0].self_attn
    if type(inner.embed_tokens) is not nn.Embedding or inner.embed_tokens.weight.dtype != mx.float32:
        return None
    rope, heads = attn.rope, attn.n_heads
    norms = [_module(layer, n) for layer in layers for n in NORMS] + [inner.norm]
    eps = {float(n.eps) for n in norms if n is not None}
    gate = layers[0].mlp.gate_proj
    inter = (gate["linear"] if "linear" in gate else gate).weight.shape[0]
    dims = Dims(inner.embed_tokens.weight.shape[1], heads, attn.n_kv_heads, getattr(rope, "dims", 0), inter,
                eps.pop() if len(eps) == 1 else 0.0, float(attn.scale), bool(getattr(rope, "traditional", False)))
    ok = (type(rope) in (nn.RoPE, Llama3RoPE) and dims.eps > 0
          and all(type(layer).__module__ in SUPPORTED and not getattr(layer, "use_sliding", False) for layer in layers)
          and all(f"model.layers.{i}.{p}" in packed for i in range(len(layers)) for p in PROJECTIONS)
          and all(type(n) is nn.RMSNorm and n.weight.dtype == mx.float32 for n in norms if n is not None))
    return dims if ok else None


def host_model(model: nn.Module, packed: dict[str, Packed], kernel: Kernel, threads: int) -> Optional[HostModel]:
    """The model as ``step`` runs it, or None where ``_layout`` says it cannot. ``packed``: layer
    name -> its weight packed by the kernel (``decode.py``)."""
    dims = _layout(model, set(packed))
    if dims is None:
        return None
    inner = model.model
    weights = [[packed[f"model.layers.{i}.{p}"] for p in PROJECTIONS] for i in range(len(inner.layers))]
    norms = [[host_array(n.weight) if (n := _module(layer, name)) is not None else None for name in NORMS] for layer in inner.layers]
    try:
        stack = kernel.stack(dims, weights, norms, threads)
    except ValueError:
        return None  # sizes the layout did not foresee: the model's own layers
    return HostModel(host_array(inner.embed_tokens.weight), stack, host_array(inner.norm.weight),
                     packed.get("lm_head") or packed["model.embed_tokens"], inner.layers[0].self_attn.rope, kernel, threads)


def can_run(model: nn.Module, packable: set[str]) -> bool:
    """Whether ``host_model`` would take this model, given the names of the layers the kernel can pack."""
    return _layout(model, packable) is not None


def _rope_tables(rope: nn.Module, dim: int, traditional: bool, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin at positions ``[0, positions)``: the model's RoPE applied to a vector whose
    rotary pairs are (1, 0), so whatever frequencies and scaling it has are the ones used."""
    half = dim // 2
    basis = np.zeros(dim, np.float32)
    basis[slice(0, None, 2) if traditional else slice(0, half)] = 1.0
    out = np.array(rope(mx.broadcast_to(mx.array(basis), (1, 1, positions, dim))))[0, 0]
    if traditional:
        return out[:, 0::2].copy(), out[:, 1::2].copy()
    return out[:, :half].copy(), out[:, half:].copy()


def host_cache(hm: HostModel, cache: list, max_tokens: int) -> Optional[HostCache]:
    """The MLX batch cache a prefill filled, moved to the host with room for ``max_tokens`` more
    slots (None where it is not mlx-lm's plain ``BatchKVCache``). Each layer's MLX keys and
    values are let go once copied: the batch decodes on the host from here, and the two copies
    are never both whole in memory."""
    d = hm.stack.dims
    if len(cache) != len(hm.stack.weights) or any(type(c).__name__ != "BatchKVCache" for c in cache):
        return None
    c0 = cache[0]
    rows, length = int(c0.offset.shape[0]), int(c0._idx)
    keys, values = [], []
    for c in cache:
        k = np.zeros((rows, d.kv_heads, length + max_tokens, d.dim), np.float32)
        v = np.zeros_like(k)
        if length:
            k[:, :, :length] = np.array(c.keys[..., :length, :].astype(mx.float32))
            v[:, :, :length] = np.array(c.values[..., :length, :].astype(mx.float32))
        c.keys = c.values = None
        keys.append(k)
        values.append(v)
    position = np.array(c0.offset, np.int64)
    cos, sin = _rope_tables(hm.rope, d.dim, d.traditional, int(position.max()) + max_tokens + 1)
    return HostCache(keys, values, length, np.array(c0.left_padding, np.int64), position, cos, sin)


def keep_rows(cache: HostCache, rows: np.ndarray) -> None:
    cache.keys = [k[rows] for k in cache.keys]
    cache.values = [v[rows] for v in cache.values]
    cache.start, cache.position = cache.start[rows], cache.position[rows]


def step(hm: HostModel, cache: HostCache, ids: np.ndarray) -> np.ndarray:
    """Logits ``(rows, vocab)`` for one new token per row; the cache takes its keys and values."""
    d = hm.stack.dims
    slots = [Slots(k, v, cache.length, cache.start, cache.position, cache.cos, cache.sin, d.traditional)
             for k, v in zip(cache.keys, cache.values)]
    x = hm.kernel.decode_layers(hm.stack, hm.embed[ids], slots)
    cache.length += 1
    cache.position = cache.position + 1
    return hm.kernel.apply(hm.head, hm.kernel.rms_norm(x, hm.norm, d.eps), hm.threads)
