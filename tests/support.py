"""What several test modules share: the repository root, a callback that records reports, the
short CLI run most training tests start from, and an offline objective's loss by name."""

from pathlib import Path

from mlx_lm.tuner.callbacks import TrainingCallback

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
