"""Read a llama.cpp GGUF file into mlx-lm's Hugging Face layout: config and weights.

``mx.load`` reads GGUF itself: Q4_0, Q4_1 and Q8_0 tensors come back as MLX
affine-quantized triples (weight, scales, biases; group size 32) that are the
file's values exactly. Other block formats it turns into float16 through a
reader that is wrong for some of them (Q4_K) and fails on others, and its
result does not say which format a tensor had, so the tensor table is read
here first: a file with any other format (BF16, the K-quants, Q5_0...) is read
by gguf-py instead, every tensor dequantized to float32 as llama.cpp does.
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import gguf
import mlx.core as mx
import numpy as np

from .families import FAMILIES, TOP, Family, GGUFError, family_for_arch, is_norm

GROUP_SIZE = 32  # every block format MLX maps onto its own quantization

# GGML type ids that MLX's reader returns intact: packed as MLX's own quantization, or floats.
QUANTIZED = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
FLOATS = {0: "F32", 1: "F16"}
SUPPORTED_TYPES = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and the IQ formats gguf-py dequantizes"



# GGUF metadata value types: id -> fixed byte size (8 is a string, 9 an array).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def tensor_types(path: str | Path) -> dict[str, int]:
    """The GGML type id of every tensor, from the file's header (``mx.load`` does not say)."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
        if version < 2:
            raise GGUFError(f"{path} is GGUF version {version}; versions 2 and 3 are supported")

        def u(fmt: str) -> int:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def skip_value(kind: int) -> None:
            if kind == 8:
                f.seek(u("<Q"), 1)
            elif kind == 9:
                inner, count = u("<I"), u("<Q")
                if inner in _SCALAR_SIZES:
                    f.seek(_SCALAR_SIZES[inner] * count, 1)
                else:
                    for _ in range(count):
                        skip_value(inner)
            elif kind in _SCALAR_SIZES:
                f.seek(_SCALAR_SIZES[kind], 1)
            else:
                raise GGUFError(f"{path}: unknown GGUF metadata type {kind}")

        for _ in range(n_kv):
            f.seek(u("<Q"), 1)  # the key
            skip_value(u("<I"))
        types = {}
        for _ in range(n_tensors):
            name = f.read(u("<Q")).decode("utf-8")
            f.seek(8 * u("<I"), 1)  # the dimensions
            types[name] = u("<I")
            f.seek(8, 1)  # the data offset
        return types


def value(metadata: dict, key: str, default: Any = None) -> Any:
    """A metadata value as a plain Python value (``mx.load`` gives numbers as arrays)."""
    v = metadata.get(key, default)
    return v.tolist() if isinstance(v, mx.array) else v


def read(path: str | Path) -> tuple[dict[str, mx.array], dict]:
    """The tensors and metadata of a GGUF: through MLX's reader when every tensor format arrives
    intact that way (Q4_0/Q4_1/Q8_0 stay packed), else all dequantized to float32 by gguf-py."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"no such file: {path}")
    try:
        types = tensor_types(path)
    except (struct.error, UnicodeDecodeError, OSError, MemoryError) as e:
        raise GGUFError(f"{path} is not a readable GGUF file ({e})") from None
    if any(t not in QUANTIZED and t not in FLOATS for t in types.values()):
        return _read_dequantized(path)
    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise GGUFError(f"MLX cannot read {path}: {e}") from None


def _read_dequantized(path: Path) -> tuple[dict[str, mx.array], dict]:
    """Every tensor as gguf-py (llama.cpp's reference code, in NumPy) dequantizes it, in float32."""
    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        try:
            x = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{t.name} is in {t.tensor_type.name}, which gguf-py cannot dequantize; "
                            f"supported: {SUPPORTED_TYPES}") from None
        tensors[t.name] = mx.array(np.asarray(x, np.float32).reshape(tuple(reversed(t.shape.tolist()))))
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return tensors, metadata


def model_config(metadata: dict, tensors: dict[str, mx.array]) -> dict:
    """The Hugging Face ``config.json`` of a GGUF of a family in ``families.BY_ARCH``."""
    arch = value(metadata, "general.architecture")
    family = family_for_arch(arch)

    def get(key: str, default: Any = None) -> Any:
        v = value(metadata, f"{arch}.{key}", default)
        if v is None or isinstance(v, list):
            raise GGUFError(f"metadata {arch}.{key} is {'missing' if v is None else 'per-layer'}; one number is supported")
        return v

    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError("rotary embedding on part of each head is not supported")
    scaling = value(metadata, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and arch != "gemma3") or "rope_freqs.weight" in tensors:
        raise GGUFError("rope scaling is not supported; supported: plain rotary embeddings (and Gemma 3's linear scaling)")
    if "token_embd.weight" not in tensors:
        raise GGUFError("the file has no token_embd.weight: only the tensors of a plain decoder are supported")
    config = {
        "architectures": [family.hf_class],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _decimal(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _decimal(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length"),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if arch == "gemma3":
        config.update(_gemma3_config(get, head_dim, scaling))
    for name in ("bos", "eos", "padding"):
        if (token_id := value(metadata, f"tokenizer.ggml.{name}_token_id")) is not None:
            config[f"{name.replace('padding', 'pad')}_token_id"] = token_id
    return config


def _gemma3_config(get, head_dim: int, scaling: str) -> dict:
    """Gemma 3's sliding-window layers, as llama.cpp reads them (pattern 6 and its attention scale)."""
    window, pattern = get("attention.sliding_window", 0), get("attention.sliding_window_pattern", 6)
    if get("block_count") == 62:
        raise GGUFError("Gemma 3 27B's attention scale is not supported; supported: the 270M to 12B sizes")
    config = {
        "sliding_window": window or get("context_length"),
        "sliding_window_pattern": pattern if window else 1,
        "rope_local_base_freq": _decimal(get("rope.freq_base_swa", 10000.0)),
        "query_pre_attn_scalar": head_dim,  # llama.cpp scales queries by 1/sqrt(head_dim)
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "rope_scaling": {"rope_type": "linear", "factor": _decimal(get("rope.scaling.factor"))} if scaling == "linear" else None,
    }
    if get("final_logit_softcapping", 0.0):
        raise GGUFError("Gemma 3 with final logit soft-capping is not supported (mlx-lm's gemma3_text has none)")
    return config


def _decimal(x: float) -> float:
    """A float32 metadata number as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def hf_name(name: str, family: Family) -> str:
    """mlx-lm's parameter name for a llama.cpp tensor name (``blk.3.attn_q.weight``...)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in family.layer:
        return f"model.layers.{parts[1]}.{family.layer[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP:
        return f"{TOP[parts[0]]}.{parts[1]}"
    raise GGUFError(f"unexpected tensor {name!r}: only the tensors of a plain {family.arch} decoder are supported")


def _unpermute(x: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's per-head row order for rotary Q/K (it pairs rows i and i + d/2 as 2i, 2i+1)."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def convert_weights(
    tensors: dict[str, mx.array], config: dict, dequantize: bool, dtype: Optional[mx.Dtype]
) -> tuple[dict[str, mx.array], Optional[dict]]:
    """mlx-lm weights and, when packed weights are kept, the ``quantization`` entry of the config.

    ``dtype`` casts every floating tensor (scales and biases of packed weights too);
    ``None`` keeps each as the file stores it. Dequantizing goes through float32
    scales, so the values equal llama.cpp's float32 dequantization.
    """
    weights, bits = {}, {}
    family = FAMILIES[config["model_type"]]
    for name, x in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        base, out = name.rsplit(".", 1)[0], hf_name(name, family)
        module = out.rsplit(".", 1)[0]
        group = {out: x}
        if x.dtype == mx.uint32:
            scales, biases = tensors[f"{base}.scales"], tensors[f"{base}.biases"]
            b = x.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
            if dequantize:
                scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
                group = {out: mx.dequantize(x, scales, biases, group_size=GROUP_SIZE, bits=b)}
            else:
                group = {out: x, f"{module}.scales": scales, f"{module}.biases": biases}
                bits[module] = b
        elif x.ndim == 2:
            bits[module] = None
        rotary = family.permute_qk and base.split(".")[-1] in ("attn_q", "attn_k")
        heads = config["num_attention_heads" if base.endswith("attn_q") else "num_key_value_heads"]
        for key, t in group.items():
            if rotary:
                t = _unpermute(t, heads)
            if family.norm_offset and is_norm(name):
                t = t.astype(mx.float32) - family.norm_offset
            if dtype is not None and mx.issubdtype(t.dtype, mx.floating):
                t = t.astype(dtype)
            weights[key] = t
    return weights, (None if dequantize else quantization(bits))


def quantization(bits: dict[str, Optional[int]]) -> Optional[dict]:
    """mlx-lm's ``quantization`` config: the commonest bit width, and per-module entries for the rest.

    A module left in floating point gets ``false`` so that mlx-lm's loader keeps it as is.
    """
    counts = Counter(b for b in bits.values() if b is not None)
    if not counts:
        return None
    common = counts.most_common(1)[0][0]
    spec = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
    for module, b in sorted(bits.items()):
        if b != common:
            spec[module] = False if b is None else {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return spec
