"""Writing a model folder (mlx-lm / Hugging Face layout) as a GGUF file for llama.cpp, Ollama and
LM Studio: the weights under llama.cpp's tensor names and conventions (``families``), the
hyper-parameters, and the tokenizer (byte-level BPE, or SentencePiece BPE with a score per token)
with its chat template, so that llama.cpp tokenizes as the model was trained. The file is written
with the ``gguf`` package (llama.cpp's own ``gguf-py``); quantized types are computed by its
``quants`` module.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from .families import TOP, Family, GGUFError, family_for_model, is_norm
from .tokenizer import BYTE, CONTROL, NORMAL, SPACE, UNKNOWN, USER_DEFINED

TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
         "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
_GGUF_TOP = {hf: g for g, hf in TOP.items()}


def gguf_name(name: str, family: Family) -> str:
    """llama.cpp's tensor name for an mlx-lm parameter name (``model.layers.3.self_attn.q_proj.weight``...)."""
    module, leaf = name.rsplit(".", 1)
    if module in _GGUF_TOP:
        return f"{_GGUF_TOP[module]}.{leaf}"
    parts, layer = module.split("."), {hf: g for g, hf in family.layer.items()}
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in layer:
        return f"blk.{parts[2]}.{layer['.'.join(parts[3:])]}.{leaf}"
    raise GGUFError(f"tensor {name!r} has no GGUF name: only the tensors of a plain {family.model_type} decoder are supported")


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
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and "\\p{N}" in json.dumps(steps[0].get("pattern")):
        return "qwen2"
    raise GGUFError(f"pre-tokenizer {kinds} has no llama.cpp name here; supported: byte-level BPE as gpt-2, smollm or qwen2 split it")


def _byte_level(writer: gguf.GGUFWriter, spec: dict, names: list[str], merges: list) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(spec.get("pre_tokenizer") or {}))
    writer.add_token_list(names)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])


def _sentencepiece(writer: gguf.GGUFWriter, spec: dict, names: list[str], merges: list) -> None:
    """A score per token: minus the rank of the first merge that makes it, so that llama.cpp's
    highest-score-first joining makes the merges in the BPE's order (what ``tokenizer.py`` undoes)."""
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault("".join(m.split(" ", 1) if isinstance(m, str) else m), r)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(names)
    writer.add_token_scores([-float(rank.get(t, len(merges))) for t in names])
    steps = spec.get("normalizer") or {}
    steps = steps.get("normalizers", [steps])
    writer.add_add_space_prefix(any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in steps))


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_rows: int, config: dict) -> None:
    """The tokenizer of ``model_dir`` (``tokenizer.json``: byte-level or SentencePiece BPE) and its chat template."""
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    if model["type"] != "BPE":
        raise GGUFError(f"tokenizer model {model['type']!r} is not supported; supported: byte-level or SentencePiece BPE")
    pieces = model.get("byte_fallback", False)
    tokens = {i: t for t, i in model["vocab"].items()}
    types = {i: BYTE if pieces and len(t) == 6 and t.startswith("<0x") and t.endswith(">") else NORMAL
             for i, t in tokens.items()}
    unk = model["vocab"].get(model.get("unk_token")) if pieces else None
    if unk is not None:
        types[unk] = UNKNOWN
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_rows)]
    (_sentencepiece if pieces else _byte_level)(writer, spec, names, model["merges"])
    writer.add_token_types([types.get(i, 5) for i in range(vocab_rows)])  # 5: unused rows past the vocabulary
    if unk is not None:
        writer.add_unk_token_id(unk)
    _special_ids(writer, spec, config)
    template = model_dir / "chat_template.jinja"
    tokenizer_config = model_dir / "tokenizer_config.json"
    text = template.read_text(encoding="utf-8") if template.is_file() else None
    if text is None and tokenizer_config.is_file():
        text = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(text, str):
        writer.add_chat_template(text)


def _special_ids(writer: gguf.GGUFWriter, spec: dict, config: dict) -> None:
    bos, eos = config.get("bos_token_id"), config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if bos is not None:
        writer.add_bos_token_id(bos)
        writer.add_add_bos_token(Tokenizer.from_str(json.dumps(spec)).encode("a").ids[:1] == [bos])
    if eos is not None:
        writer.add_eos_token_id(eos)
    if config.get("pad_token_id") is not None:
        writer.add_pad_token_id(config["pad_token_id"])


def _hyperparameters(writer: gguf.GGUFWriter, config: dict, family: Family) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if family.arch == "gemma3":
        _gemma3(writer, config, head_dim)
    elif config.get("rope_scaling"):
        raise GGUFError(f"rope scaling {config['rope_scaling']} cannot be exported; supported: plain rotary embeddings")


def _gemma3(writer: gguf.GGUFWriter, config: dict, head_dim: int) -> None:
    """Gemma 3's sliding-window layers and rotary bases, as llama.cpp reads them."""
    if config.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise GGUFError("llama.cpp scales Gemma 3's queries by 1/sqrt(head_dim); this model's query_pre_attn_scalar differs")
    if config.get("final_logit_softcapping") or config.get("attn_logit_softcapping"):
        raise GGUFError("Gemma 3 with logit soft-capping cannot be exported (llama.cpp's gemma3 has none)")
    writer.add_sliding_window(config.get("sliding_window", 512))
    writer.add_sliding_window_pattern(int(config.get("sliding_window_pattern", 6)))
    writer.add_float32("gemma3.rope.freq_base_swa", float(config.get("rope_local_base_freq", 10000.0)))
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling:
        raise GGUFError(f"Gemma 3 rope scaling {scaling} cannot be exported; supported: linear")


def write_gguf(model_dir: Path, out: Path, gguf_type: str = "f32") -> Path:
    """``model_dir`` (a model of a family in ``families.FAMILIES``, not quantized) as one GGUF file of ``gguf_type``."""
    model_dir, out = Path(model_dir), Path(out)
    if gguf_type not in TYPES:
        raise GGUFError(f"GGUF type {gguf_type!r} is not supported; supported: {', '.join(TYPES)}")
    config = json.loads((model_dir / "config.json").read_text())
    family = family_for_model(config.get("model_type"))
    weights = _weights(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), family.arch)
    _hyperparameters(writer, config, family)
    writer.add_file_type(FILE_TYPES[gguf_type])
    add_tokenizer(writer, model_dir, weights["model.embed_tokens.weight"].shape[0], config)
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    for name, x in sorted(weights.items()):
        target = gguf_name(name, family)
        if family.permute_qk and target.split(".")[-2] in ("attn_q", "attn_k"):
            x = permute(x, heads if target.split(".")[-2] == "attn_q" else kv)
        if family.norm_offset and is_norm(target):
            x = x + family.norm_offset
        kind = TYPES[gguf_type] if x.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms and biases stay F32
        if kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0) and x.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # rows not a whole number of blocks, as llama.cpp's converter does
        writer.add_tensor(target, gguf.quants.quantize(x, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
