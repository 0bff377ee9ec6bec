"""Writing a model folder (mlx-lm / Hugging Face layout) as a GGUF file for llama.cpp, Ollama and
LM Studio: the weights under llama.cpp's tensor names (rotary Q/K rows in its order for llama),
the hyper-parameters, and the byte-level BPE tokenizer with its chat template, so that llama.cpp
tokenizes as the model was trained. The file is written with the ``gguf`` package (llama.cpp's
own ``gguf-py``); quantized types are computed by its ``quants`` module.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from .reader import ARCHITECTURES, GGUFError, _LAYER_NAMES, _TOP_NAMES

TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
         "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
_GGUF_LAYER = {hf: g for g, hf in _LAYER_NAMES.items()}
_GGUF_TOP = {hf: g for g, hf in _TOP_NAMES.items()}


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for an mlx-lm parameter name (``model.layers.3.self_attn.q_proj.weight``...)."""
    module, leaf = name.rsplit(".", 1)
    if module in _GGUF_TOP:
        return f"{_GGUF_TOP[module]}.{leaf}"
    parts = module.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _GGUF_LAYER:
        return f"blk.{parts[2]}.{_GGUF_LAYER['.'.join(parts[3:])]}.{leaf}"
    raise GGUFError(f"tensor {name!r} has no GGUF name: only the tensors of a plain llama/qwen2 decoder are supported")


def permute(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's per-head row order for rotary Q/K (the inverse of ``reader._unpermute``)."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        for k, v in mx.load(str(path)).items():
            if k.endswith((".scales", ".biases")) or v.dtype == mx.uint32:
                raise GGUFError(f"{model_dir} holds quantized weights: fuse with --dequantize first")
            weights[k] = np.array(v.astype(mx.float32))
    return weights


def _pre_name(pre: dict) -> str:
    """llama.cpp's pre-tokenizer name for a ``tokenizer.json`` pre-tokenizer (the ones ``tokenizer.py`` rebuilds)."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and "\\p{N}" in json.dumps(steps[0].get("pattern")):
        return "qwen2"
    raise GGUFError(f"pre-tokenizer {kinds} has no llama.cpp name here; supported: byte-level BPE as gpt2, smollm or qwen2 split it")


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_rows: int, config: dict) -> None:
    """The byte-level BPE tokenizer of ``model_dir`` (``tokenizer.json``) and its chat template."""
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE":
        raise GGUFError(f"tokenizer model {spec['model']['type']!r} is not supported; supported: byte-level BPE")
    tokens = {i: t for t, i in spec["model"]["vocab"].items()}
    types = {i: 1 for i in tokens}  # normal
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4  # control / user-defined
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_rows)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(spec.get("pre_tokenizer") or {}))
    writer.add_token_list(names)
    writer.add_token_types([types.get(i, 5) for i in range(vocab_rows)])  # 5: unused rows past the vocabulary
    writer.add_token_merges(merges)
    bos, eos = config.get("bos_token_id"), config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if bos is not None:
        writer.add_bos_token_id(bos)
        writer.add_add_bos_token(Tokenizer.from_str(json.dumps(spec)).encode("a").ids[:1] == [bos])
    if eos is not None:
        writer.add_eos_token_id(eos)
    template = model_dir / "chat_template.jinja"
    tokenizer_config = model_dir / "tokenizer_config.json"
    text = template.read_text(encoding="utf-8") if template.is_file() else None
    if text is None and tokenizer_config.is_file():
        text = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(text, str):
        writer.add_chat_template(text)


def write_gguf(model_dir: Path, out: Path, gguf_type: str = "f32") -> Path:
    """``model_dir`` (a llama or qwen2 model folder, not quantized) as one GGUF file of ``gguf_type``."""
    model_dir, out = Path(model_dir), Path(out)
    if gguf_type not in TYPES:
        raise GGUFError(f"GGUF type {gguf_type!r} is not supported; supported: {', '.join(TYPES)}")
    config = json.loads((model_dir / "config.json").read_text())
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"architecture {arch!r} cannot be exported; supported: {', '.join(ARCHITECTURES)}")
    weights = _weights(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_value_length(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(FILE_TYPES[gguf_type])
    add_tokenizer(writer, model_dir, weights["model.embed_tokens.weight"].shape[0], config)
    for name, x in sorted(weights.items()):
        target = gguf_name(name)
        if arch == "llama" and target.split(".")[-2] in ("attn_q", "attn_k"):
            x = permute(x, heads if target.split(".")[-2] == "attn_q" else kv)
        kind = TYPES[gguf_type] if x.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms and biases stay F32
        if kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0) and x.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # rows not a whole number of blocks, as llama.cpp's converter does
        writer.add_tensor(target, gguf.quants.quantize(x, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
