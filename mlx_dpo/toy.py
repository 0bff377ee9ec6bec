"""Small offline stand-ins for a hub model and a preference dataset.

Nothing can be downloaded on an offline machine, yet the trainer, the tests
and the quickstart need a real Hugging Face layout that ``mlx_lm.load`` reads:
``config.json`` + ``model.safetensors`` + a trained ``tokenizers`` BPE with a
chat template. This module writes one, with random weights, in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Optional

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

_ITEMS = [
    "the film", "this book", "the hotel", "our dinner", "the concert", "the phone",
    "this game", "the museum", "the train ride", "the coffee", "the laptop", "the park",
]
_GOOD = ["wonderful", "great", "delightful", "excellent", "lovely", "superb", "charming"]
_BAD = ["terrible", "awful", "boring", "dreadful", "poor", "dull", "disappointing"]
_FILL = [
    "I think", "honestly", "overall", "to be fair", "in short", "all in all",
    "my friend said", "as expected", "surprisingly",
]


def _review(rng: random.Random, item: str, words: list[str]) -> str:
    w1, w2 = rng.sample(words, 2)
    return f"{rng.choice(_FILL)} {item} was {w1} and {w2}."


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` records ``{prompt, chosen, rejected}``: chosen praises, rejected complains."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        item = rng.choice(_ITEMS)
        out.append(
            {
                "prompt": f"Write a review of {item}.",
                "chosen": _review(rng, item, _GOOD),
                "rejected": _review(rng, item, _BAD),
            }
        )
    return out


def _corpus() -> list[str]:
    rng = random.Random(1234)
    lines = []
    for rec in preference_records(400, seed=99):
        lines += [rec["prompt"], rec["chosen"], rec["rejected"]]
    words = _ITEMS + _GOOD + _BAD + _FILL
    lines += [" ".join(rng.choices(words, k=8)) for _ in range(200)]
    lines += ["Human: hello there. Assistant: hi, how can I help you today?"] * 5
    return lines


def make_tokenizer(path: Path, vocab_size: int = 512, corpus: Optional[Iterable[str]] = None) -> int:
    """Train a byte-level BPE with BOS/EOS and a chat template on ``corpus``; return its size."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else _corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama: the tokenizer's own encoding prepends BOS.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return tok.get_vocab_size()


def make_model(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    seed: int = 0,
    tokenizer_vocab: int | None = None,
    corpus: Optional[Iterable[str]] = None,
) -> Path:
    """Write a random-weight Llama in Hugging Face layout that ``mlx_lm.load`` reads.

    ``vocab_size`` is the embedding size; the tokenizer gets ``tokenizer_vocab``
    entries (default: the same), so a large-vocabulary model can still use a
    small trained tokenizer. ``corpus`` is the tokenizer's training text
    (default: the toy review lines).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n_tok = make_tokenizer(path, tokenizer_vocab or vocab_size, corpus)
    if n_tok > vocab_size:
        raise ValueError(f"tokenizer has {n_tok} tokens but the model only {vocab_size}")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Larger-than-default init so a random model has varied, non-flat logits.
    params = {
        k: (mx.random.normal(v.shape) * 0.08 if v.ndim == 2 else v)
        for k, v in tree_flatten(model.parameters())
    }
    mx.save_safetensors(str(path / "model.safetensors"), params, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def make_preference_data(path: str | Path, n_train: int = 64, n_valid: int = 16, n_test: int = 16) -> Path:
    """Write ``train/valid/test.jsonl`` preference files of the toy review task."""
    path = Path(path)
    for name, n, seed in (("train", n_train, 0), ("valid", n_valid, 1), ("test", n_test, 2)):
        write_jsonl(path / f"{name}.jsonl", preference_records(n, seed))
    return path

