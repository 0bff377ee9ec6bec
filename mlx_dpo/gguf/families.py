"""What differs between the model families a GGUF carries, in one table read by both directions
(``reader`` for import, ``writer`` for export): llama.cpp's architecture name, its tensor names,
and the two ways its stored numbers differ from Hugging Face's.

- Rotary Q/K rows: llama.cpp applies Llama's rotary embedding to adjacent pairs of a head's rows,
  Hugging Face to its two halves, so llama-architecture Q/K weights are stored permuted
  (``permute_qk``). Qwen and Gemma use the halves in both and are stored as they are.
- Gemma's RMSNorm scales by ``1 + w`` and Hugging Face keeps ``w``; llama.cpp stores ``1 + w``
  (``norm_offset``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class GGUFError(ValueError):
    """A file or model this GGUF code does not support; the message says what is supported."""


# llama.cpp's per-layer tensor names -> the module under model.layers.N in mlx-lm / Hugging Face.
LLAMA_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 3 norms around both sub-blocks: llama.cpp's ffn_norm is the norm *before* the MLP.
GEMMA3_LAYER = {
    **LLAMA_LAYER,
    **QK_NORMS,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class Family:
    model_type: str  # mlx-lm / Hugging Face config.json
    hf_class: str
    arch: str  # llama.cpp's general.architecture
    layer: dict = field(default_factory=lambda: LLAMA_LAYER)
    permute_qk: bool = False
    norm_offset: float = 0.0


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", "llama", permute_qk=True),
        # llama.cpp runs Mistral's dense models as its llama architecture (its own converter writes them so).
        Family("mistral", "MistralForCausalLM", "llama", permute_qk=True),
        Family("qwen2", "Qwen2ForCausalLM", "qwen2"),
        Family("qwen3", "Qwen3ForCausalLM", "qwen3", layer={**LLAMA_LAYER, **QK_NORMS}),
        Family("gemma3_text", "Gemma3ForCausalLM", "gemma3", layer=GEMMA3_LAYER, norm_offset=1.0),
    )
}
# Import: a file's architecture -> the family its config.json gets (llama covers Mistral's files).
BY_ARCH = {"llama": FAMILIES["llama"], "qwen2": FAMILIES["qwen2"], "qwen3": FAMILIES["qwen3"],
           "gemma3": FAMILIES["gemma3_text"]}


def family_for_arch(arch: str) -> Family:
    if arch not in BY_ARCH:
        raise GGUFError(f"architecture {arch!r} is not supported; supported: {', '.join(BY_ARCH)}")
    return BY_ARCH[arch]


def family_for_model(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise GGUFError(f"architecture {model_type!r} cannot be exported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def is_norm(gguf_name: str) -> bool:
    """A norm weight (what Gemma's ``norm_offset`` applies to)."""
    return gguf_name.split(".")[-2].endswith("norm")
