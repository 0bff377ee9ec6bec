"""Build the shipped demo: review corpus, tokenizer, a small pre-trained Llama, DPO pairs, GRPO prompts.

    python examples/demo/build.py                 # rewrites examples/demo/model, data and prompts
    python examples/demo/build.py --prompts-only  # rewrites examples/demo/prompts only

Deterministic (fixed seeds). The model is pre-trained from random weights with
this project's own SFT objective (``loss_type: sft``: ``objectives.loss.sft_loss_fn`` and
``mlx_dpo.train.trainer.train``) on chat-formatted "Write a review of <item>." →
review, half positive, half negative, so it starts out with no preference.
Every parameter is trained (mlx-lm's ``full`` only unfreezes the transformer
layers, not embeddings and head, which pre-training from scratch needs).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import mlx_dpo  # noqa: E402,F401  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx_lm.utils import load, save_model  # noqa: E402

from mlx_dpo.compute.batching import iterate_batches  # noqa: E402
from mlx_dpo.data import build_pairs, build_sft  # noqa: E402
from mlx_dpo.objectives.loss import sft_loss_fn  # noqa: E402
from mlx_dpo.toy import make_model, make_tokenizer, write_jsonl  # noqa: E402
from mlx_dpo.train.trainer import TrainingArgs, train  # noqa: E402
from reviews import prompt_for, review, split_items  # noqa: E402

MODEL_CONFIG = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384)


def chat(item: str, text: str) -> list[dict]:
    return [{"role": "user", "content": prompt_for(item)}, {"role": "assistant", "content": text}]


def sft_records(items: list[str], n: int, rng: random.Random) -> list[dict]:
    """Reviews of random items, exactly half of them positive."""
    return [{"messages": chat(item, review(item, i % 2 == 0, rng))} for i, item in enumerate(rng.choices(items, k=n))]


def pair_records(items: list[str], n: int, rng: random.Random) -> list[dict]:
    """Conversational preference pairs: chosen = a positive review, rejected = a negative one."""
    out = []
    for item in rng.choices(items, k=n):
        out.append({
            "prompt": [{"role": "user", "content": prompt_for(item)}],
            "chosen": [{"role": "assistant", "content": review(item, True, rng)}],
            "rejected": [{"role": "assistant", "content": review(item, False, rng)}],
        })
    return out


def prompt_records(items: list[str], n: int, rng: random.Random) -> list[dict]:
    """Conversational prompts for online training (GRPO); ``item`` is a column the reward may read."""
    return [{"prompt": [{"role": "user", "content": prompt_for(item)}], "item": item} for item in rng.choices(items, k=n)]


def write_prompts(out: Path, seed: int) -> None:
    """``prompts/``: train/valid on training items, test on held-out items, as for the pairs."""
    train_items, held_out = split_items(seed=seed)
    rng = random.Random(seed + 1)
    write_jsonl(out / "prompts" / "train.jsonl", prompt_records(train_items, 1000, rng))
    write_jsonl(out / "prompts" / "valid.jsonl", prompt_records(train_items, 32, rng))
    write_jsonl(out / "prompts" / "test.jsonl", prompt_records(held_out, 200, rng))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE), help="Folder to write model/ and data/ into.")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts-only", action="store_true", help="Only (re)write prompts/ (GRPO's data); leave the model.")
    args = p.parse_args()
    out = Path(args.out)
    tic = time.perf_counter()
    write_prompts(out, args.seed)
    if args.prompts_only:
        return

    train_items, held_out = split_items(seed=args.seed)
    rng = random.Random(args.seed)
    corpus = sft_records(train_items, 24000, rng)
    corpus_valid = sft_records(train_items, 500, rng)
    print(f"{len(train_items)} training items, {len(held_out)} held-out items; {len(corpus)} pre-training reviews")

    # Preference data: train/valid on training items, test on held-out items only.
    data = out / "data"
    write_jsonl(data / "train.jsonl", pair_records(train_items, 1000, rng))
    write_jsonl(data / "valid.jsonl", pair_records(train_items, 100, rng))
    write_jsonl(data / "test.jsonl", pair_records(held_out, 200, rng))

    # Tokenizer on the pre-training text, then a random Llama around it.
    model_dir = out / "model"
    texts = [m["content"] for r in corpus for m in r["messages"]]
    n_vocab = make_tokenizer(model_dir, vocab_size=1024, corpus=texts)  # to learn its size
    make_model(model_dir, vocab_size=n_vocab, seed=args.seed, corpus=texts, **MODEL_CONFIG)
    model, tokenizer = load(str(model_dir))
    train_set, stats = build_sft(corpus, tokenizer, 128, mask_prompt=True)
    valid_set, _ = build_sft(corpus_valid, tokenizer, 128, mask_prompt=True)
    print(f"pre-training set: {stats}")

    mx.random.seed(args.seed)
    model.unfreeze()
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-5, args.learning_rate, 100), optim.cosine_decay(args.learning_rate, args.iters, 1e-5)], [100]
    )
    targs = TrainingArgs(batch_size=args.batch_size, iters=args.iters, steps_per_report=250, steps_per_eval=1000,
                         val_batches=10, steps_per_save=10**9, adapter_file=str(out / ".pretrain.safetensors"), seed=args.seed)
    train(model, optim.AdamW(learning_rate=schedule, weight_decay=0.01), sft_loss_fn(), train_set, valid_set,
          iterate_batches, targs)
    (out / ".pretrain.safetensors").unlink(missing_ok=True)

    save_model(model_dir, model, donate_model=False)
    print(f"Wrote {model_dir} and {data} in {time.perf_counter() - tic:.0f}s")

    # The DPO data must tokenize cleanly with this tokenizer.
    _, pair_stats = build_pairs(pair_records(held_out, 5, random.Random(1)), tokenizer, 128)
    assert pair_stats["pairs"] == 5, pair_stats


if __name__ == "__main__":
    main()
