"""A whole decode step of a Llama-shaped model on the host: the packed weights through the decode
kernel, everything between them (norms, rotary embedding, attention over the cache, SwiGLU) in
NumPy, with no MLX operation on the way.

With only the linear layers on the kernel (``compute/decode.py``), two thirds of a decode step
was MLX's own per-operation cost between them: about 25 small operations a layer, each a
dispatch and a scalar loop on a CPU (BENCHMARKS.md). At a few rows those operations are a few
thousand numbers each, which NumPy does in microseconds.

What runs here is the forward pass of mlx-lm's ``llama`` (and so ``mistral``), ``qwen2`` and
``qwen3`` decoder blocks, read off the model: RMSNorm, q/k/v projections (with bias where the
model has one), Qwen3's per-head q/k norms, the rotary embedding, grouped-query attention over the
cache, the output projection, SwiGLU, the final norm and the head. The rotary embedding's
cos/sin come from the model's own RoPE module (applied once to a basis vector), so scaled
variants (``linear``, ``llama3``) are covered as they are computed. Any other model, a sliding
window, a quantized or unpacked layer: ``host_model`` answers None and the caller keeps the
model's own layers.

The KV cache is taken over from the MLX batch cache the prefill filled (same padding, same
positions), so prefill is unchanged. The logits are the adapted model's up to float32 rounding
(tests/compute/test_host_decode.py checks them against the model and against float64 NumPy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.rope_utils import Llama3RoPE

from .kernel import Kernel, Slots

SUPPORTED = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MatMul = Callable[[np.ndarray], np.ndarray]  # (rows, in) -> (rows, out), bias included


@dataclass(frozen=True)
class Block:
    proj: dict[str, MatMul]  # PROJECTIONS -> its packed matmul
    input_norm: np.ndarray
    post_norm: np.ndarray
    q_norm: Optional[np.ndarray]  # Qwen3's per-head norms, else None
    k_norm: Optional[np.ndarray]


@dataclass(frozen=True)
class HostModel:
    embed: np.ndarray  # (vocab, hidden): the embedding's own memory, not a copy
    blocks: list[Block]
    norm: np.ndarray
    head: MatMul
    eps: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    rope: nn.Module  # the model's, for its cos/sin tables
    traditional: bool  # rotary pairs interleaved (else the two halves)
    kernel: Kernel  # norms, attention and SwiGLU (the matmuls come bound in ``proj`` and ``head``)
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


def _host(a: mx.array) -> np.ndarray:
    mx.eval(a)
    return np.asarray(memoryview(a)) if a.dtype == mx.float32 else np.asarray(a.astype(mx.float32))


def _rope_of(attn: nn.Module, head_dim: int) -> Optional[tuple[nn.Module, bool]]:
    rope = attn.rope
    if type(rope) not in (nn.RoPE, Llama3RoPE) or getattr(rope, "dims", None) != head_dim:
        return None  # partial rotary or position-dependent scaling: the model's own layers
    return rope, bool(rope.traditional)


def _block(layer: nn.Module, name: str, packed: dict[str, MatMul]) -> Optional[Block]:
    if type(layer).__module__ not in SUPPORTED or getattr(layer, "use_sliding", False):
        return None
    attn = layer.self_attn
    names = {p: f"{name}.{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}" for p in PROJECTIONS}
    if any(n not in packed for n in names.values()):
        return None  # a quantized layer, say
    norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
    return Block({p: packed[n] for p, n in names.items()}, _host(layer.input_layernorm.weight),
                 _host(layer.post_attention_layernorm.weight), *[_host(n.weight) if n is not None else None for n in norms])


def host_model(model: nn.Module, packed: dict[str, MatMul], kernel: Kernel, threads: int) -> Optional[HostModel]:
    """The model as ``step`` runs it, or None where it is not one of ``SUPPORTED`` as built by
    mlx-lm. ``packed``: layer name -> the packed matmul standing in for it (``decode.py``)."""
    if type(model).__module__ not in SUPPORTED:
        return None
    inner, head = model.model, packed.get("lm_head", packed.get("model.embed_tokens"))
    if ("lm_head" not in packed and "model.embed_tokens" not in packed) or type(inner.embed_tokens) is not nn.Embedding:
        return None
    if inner.embed_tokens.weight.dtype != mx.float32 or type(inner.norm) is not nn.RMSNorm:
        return None
    blocks = [_block(layer, f"model.layers.{i}", packed) for i, layer in enumerate(inner.layers)]
    if any(b is None for b in blocks):
        return None
    attn = inner.layers[0].self_attn
    base_q = attn.q_proj["linear"] if "linear" in attn.q_proj else attn.q_proj
    rope = _rope_of(attn, base_q.weight.shape[0] // attn.n_heads)
    if rope is None:
        return None
    return HostModel(_host(inner.embed_tokens.weight), blocks, _host(inner.norm.weight), head, float(inner.norm.eps),
                     attn.n_heads, attn.n_kv_heads, rope[0].dims, float(attn.scale), rope[0], rope[1], kernel, threads)


def _rope_tables(hm: HostModel, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin at positions ``[0, positions)``: the model's RoPE applied to a vector whose
    rotary pairs are (1, 0), so whatever frequencies and scaling it has are the ones used."""
    half = hm.head_dim // 2
    basis = np.zeros(hm.head_dim, np.float32)
    basis[slice(0, None, 2) if hm.traditional else slice(0, half)] = 1.0
    out = np.array(hm.rope(mx.broadcast_to(mx.array(basis), (1, 1, positions, hm.head_dim))))[0, 0]
    if hm.traditional:
        return out[:, 0::2].copy(), out[:, 1::2].copy()
    return out[:, :half].copy(), out[:, half:].copy()


def host_cache(hm: HostModel, cache: list, max_tokens: int) -> Optional[HostCache]:
    """The MLX batch cache a prefill filled, copied to the host with room for ``max_tokens`` more
    slots; None where it is not mlx-lm's plain ``BatchKVCache``."""
    if len(cache) != len(hm.blocks) or any(type(c).__name__ != "BatchKVCache" for c in cache):
        return None
    c0 = cache[0]
    rows, length = int(c0.offset.shape[0]), int(c0._idx)
    keys, values = [], []
    for c in cache:
        k = np.zeros((rows, hm.n_kv_heads, length + max_tokens, hm.head_dim), np.float32)
        v = np.zeros_like(k)
        if length:
            k[:, :, :length] = np.array(c.keys[..., :length, :].astype(mx.float32))
            v[:, :, :length] = np.array(c.values[..., :length, :].astype(mx.float32))
        keys.append(k)
        values.append(v)
    position = np.array(c0.offset, np.int64)
    cos, sin = _rope_tables(hm, int(position.max()) + max_tokens + 1)
    return HostCache(keys, values, length, np.array(c0.left_padding, np.int64), position, cos, sin)


def keep_rows(cache: HostCache, rows: np.ndarray) -> None:
    cache.keys = [k[rows] for k in cache.keys]
    cache.values = [v[rows] for v in cache.values]
    cache.start, cache.position = cache.start[rows], cache.position[rows]


def _attention(hm: HostModel, block: Block, h: np.ndarray, cache: HostCache, layer: int) -> np.ndarray:
    rows = h.shape[0]
    q = block.proj["q_proj"](h).reshape(rows, hm.n_heads, hm.head_dim)
    k = block.proj["k_proj"](h).reshape(rows, hm.n_kv_heads, hm.head_dim)
    v = block.proj["v_proj"](h).reshape(rows, hm.n_kv_heads, hm.head_dim)
    if block.q_norm is not None:
        q, k = hm.kernel.rms_norm(q, block.q_norm, hm.eps), hm.kernel.rms_norm(k, block.k_norm, hm.eps)
    slots = Slots(cache.keys[layer], cache.values[layer], cache.length, cache.start, cache.position, cache.cos, cache.sin,
                  hm.traditional)
    out = hm.kernel.attend(q, k, v, slots, hm.scale, hm.threads)
    return block.proj["o_proj"](out)


def step(hm: HostModel, cache: HostCache, ids: np.ndarray) -> np.ndarray:
    """Logits ``(rows, vocab)`` for one new token per row; the cache takes its keys and values."""
    x, norm = hm.embed[ids], hm.kernel.rms_norm
    for layer, block in enumerate(hm.blocks):
        x = x + _attention(hm, block, norm(x, block.input_norm, hm.eps), cache, layer)
        h = norm(x, block.post_norm, hm.eps)
        x = x + block.proj["down_proj"](hm.kernel.silu_mul(block.proj["gate_proj"](h), block.proj["up_proj"](h)))
    cache.length += 1
    cache.position = cache.position + 1
    return hm.head(norm(x, hm.norm, hm.eps))
