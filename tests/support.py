"""What several test modules share: the repository root, a callback that records reports, the
short CLI run most training tests start from, and an offline objective's loss by name."""

from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlx_dpo.compute.forward import PLAIN
from mlx_dpo.methods import loss_list, method_name
from mlx_dpo.objectives.loss import Objective, kto_loss_fn, pair_loss_fn, sft_loss_fn

ROOT = Path(__file__).resolve().parents[1]


class Recorder(TrainingCallback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_loss_report(self, info):
        self.train.append(info)

    def on_val_loss_report(self, info):
        self.val.append(info)


class NoBosTokenizer:
    """The toy tokenizer, except that its own encoding never adds BOS."""

    def __init__(self, tok):
        self._tok = tok

    def encode(self, text, add_special_tokens=True):
        return self._tok.encode(text, add_special_tokens=False)

    def __getattr__(self, name):
        return getattr(self._tok, name)


class NoTemplateTokenizer(NoBosTokenizer):
    has_chat_template = False
    chat_template = None


def cli_args(tiny_model_path, tiny_data_path, adapter_path, *extra):
    return [
        "--model", str(tiny_model_path), "--data", str(tiny_data_path), "--adapter-path", str(adapter_path),
        "--train", "--iters", "30", "--batch-size", "4", "--learning-rate", "3e-3", "--steps-per-report", "10",
        "--steps-per-eval", "100", "--val-batches", "2", "--num-layers", "-1", "--max-seq-length", "128", *extra,
    ]


REVIEW_ITEMS = ("the film", "this book", "the hotel", "our dinner", "the concert", "the phone", "this game", "the park")


def review_prompts(items=REVIEW_ITEMS) -> list[dict]:
    """Prompt records ("Write a review of the film.", ...) for the tests that sample."""
    return [{"prompt": f"Write a review of {it}."} for it in items]


def adapted_model(path, kind: str = "lora", seed: int = 0):
    """The tiny Llama (or any model folder) with random non-zero LoRA/DoRA updates, so that the
    policy differs from its base, or fully trainable (``kind="full"``)."""
    mx.random.seed(seed)
    model, _ = load(str(path))
    if kind == "full":
        return model
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "scale": 10.0, "dropout": 0.0}, use_dora=kind == "dora")
    for _, m in model.named_modules():
        if "lora_b" in m:
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    return model


def random_pairs(n: int, seed: int = 0):
    """``n`` pairs of token ids from the tiny vocabulary: prompts of 3-9 tokens (longer than the
    test architectures' sliding windows of 4), answers of 1-7."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(3, 500, rng.integers(3, 10)).tolist()
        out.append(tuple((prompt + rng.integers(3, 500, rng.integers(1, 8)).tolist(), len(prompt)) for _ in range(2)))
    return out


def numpy_pair_logps(model, examples):
    """Per-row summed response log-probs in float64 (chosen rows, then rejected): log-softmax of
    the whole sequence's logits."""
    out = []
    for toks, start in [ex[k] for k in range(2) for ex in examples]:
        logits = np.array(model(mx.array([toks[:-1]]))[0], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        out.append(sum(logp[j - 1, toks[j]] for j in range(start, len(toks))))
    return np.array(out)


def make_loss(loss_type, reference=None, *, how=PLAIN, loss_weights=None, beta=0.1, label_smoothing=0.0,
              loss_terms=(), token_reference=None, sampled=False, **hparams):
    """The loss ``methods.build`` gives an offline ``loss_type`` (the same builders, chosen by the
    same ``methods.method_name``), for tests that call a loss directly."""
    types = tuple(loss_list(loss_type))
    objective = Objective(types, tuple(loss_weights) if loss_weights else None, beta, label_smoothing, hparams)
    name = method_name(types)
    if name in ("sft", "coh"):
        return sft_loss_fn(how, objective.weighted()[0][1])
    if name == "kto":
        return kto_loss_fn(objective, reference, how)
    return pair_loss_fn(objective, reference, how, loss_terms, token_reference, sampled)


# Tiny random instances of the families a GGUF carries: every structural feature (biases, QK norms,
# Gemma's four norms, tied head, sliding windows shorter than the test's text), small widths.
FAMILY_CONFIGS = {
    "llama": {},
    "mistral": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 128},  # transformers' GGUF loader leaves Qwen3's head_dim at its default, 128
    # transformers' GGUF loader keeps Gemma 3's defaults for what llama.cpp derives (head_dim 256 and
    # the query scale, a global layer every 6th): the instance has those, and a window of 4 tokens.
    "gemma3_text": {"num_hidden_layers": 6, "head_dim": 256, "num_key_value_heads": 1, "sliding_window": 4,
                    "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "rope_local_base_freq": 10000.0,
                    "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"},
}


def make_family(path: Path, family: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random ``family`` model (mlx-lm's own class) in Hugging Face layout, with the tokenizer of ``tokenizer_dir``."""
    import json
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = {"model_type": family, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 512,
              "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, **FAMILY_CONFIGS[family]}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(seed)
    weights = {}
    for name, w in tree_flatten(model.parameters()):
        noise = mx.random.normal(w.shape) * (0.3 if w.ndim == 2 else 0.1)
        weights[name] = noise if w.ndim == 2 or family == "gemma3_text" else 1.0 + noise  # Gemma's norms scale by 1 + w
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


# The architecture matrix: tiny random instances of the families people fine-tune, each with its
# structural features (MoE routing, sliding windows, soft-capping, logit scaling, tied heads,
# recurrent layers, QK norms, attention sinks, latent attention), in mlx-lm 0.32's own classes.
ARCH_BASE = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "max_position_embeddings": 256, "tie_word_embeddings": False}
ARCHITECTURES = {
    "llama": {},
    "ministral3": {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "llama_4_scaling_beta": 0.1,
                                       "original_max_position_embeddings": 256}, "tie_word_embeddings": True},
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "norm_topk_prob": True},
    "qwen3_next": {"linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                   "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
                   "decoder_sparse_step": 1, "shared_expert_intermediate_size": 32, "mlp_only_layers": [],
                   "moe_intermediate_size": 32, "partial_rotary_factor": 0.5, "full_attention_interval": 2},
    "gemma2": {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16},
    "gemma3_text": {"sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16},
    "gemma4_text": {"sliding_window": 4, "sliding_window_pattern": 2, "global_head_dim": 32, "num_kv_shared_layers": 0,
                    "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 512,
                    "layer_types": ["sliding_attention", "full_attention"], "final_logit_softcapping": 30.0,
                    "tie_word_embeddings": True},
    "phi3": {},
    "olmo2": {},
    "olmo3": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "granite": {"logits_scaling": 4.0, "attention_multiplier": 0.25, "embedding_multiplier": 12.0,
                "residual_multiplier": 0.22, "attention_bias": False, "mlp_bias": False},
    "smollm3": {},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"]},
    "lfm2": {"norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "block_dim": 64, "block_multiple_of": 16,
             "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": False, "block_ff_dim": 96,
             "full_attn_idxs": [1], "tie_word_embeddings": True},
    "nemotron_h": {"attention_bias": False, "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_proj_bias": False,
                   "ssm_state_size": 16, "conv_kernel": 4, "n_groups": 1, "mlp_bias": False, "layer_norm_epsilon": 1e-5,
                   "use_bias": False, "use_conv_bias": True, "hybrid_override_pattern": ["M", "*", "-"],
                   "num_hidden_layers": 3},
    "deepseek_v3": {"moe_intermediate_size": 32, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
                    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 16,
                    "first_k_dense_replace": 1, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1},
}


def architecture_config(family: str) -> dict:
    return {"model_type": family, **ARCH_BASE, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, **ARCHITECTURES[family]}


def tiny_architecture(family: str, seed: int = 0, overrides: Optional[dict] = None):
    """A float32 random instance of ``family`` (mlx-lm's class), every parameter nudged off its
    init; ``overrides``: config keys changed from the family's test config."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes

    config = {**architecture_config(family), **(overrides or {})}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    params = [(k, v + 0.05 * mx.random.normal(v.shape)) if mx.issubdtype(v.dtype, mx.floating) else (k, v)
              for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def save_architecture(family: str, path: Path, tokenizer_dir: Path, quantize: bool = False) -> Path:
    """``tiny_architecture(family)`` as a model folder ``mlx_lm.load`` reads (4-bit where ``quantize``)."""
    import json
    import shutil

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model, config = tiny_architecture(family), architecture_config(family)
    if quantize:
        nn.quantize(model, group_size=32, bits=4,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
        config["quantization"] = {"group_size": 32, "bits": 4}
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    return path
