"""A shortened run of the shipped sentiment experiment: DPO must make reviews positive."""

import sys
from pathlib import Path

from mlx_dpo.config import load_config
from mlx_dpo.lora import run

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"
sys.path.insert(0, str(DEMO))

from evaluate import classifier_accuracy, evaluate  # noqa: E402
from reviews import is_positive, split_items  # noqa: E402


def test_classifier_reads_the_corpus_correctly():
    _, held_out = split_items()
    assert classifier_accuracy(held_out) > 0.95
    assert is_positive("The food was lovely. I would recommend it.")
    assert not is_positive("The food was bland. I would not recommend it.")


def test_shipped_model_loads_and_held_out_items_are_unseen():
    train_items, held_out = split_items()
    assert not set(train_items) & set(held_out)
    train_text = (DEMO / "data" / "train.jsonl").read_text()
    assert not any(item in train_text for item in held_out[:50])
    assert any(item in (DEMO / "data" / "test.jsonl").read_text() for item in held_out)


def test_short_dpo_run_makes_reviews_positive(tmp_path):
    args = load_config(["--config", str(Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"),
                        "--iters", "40", "--adapter-path", str(tmp_path / "ad"), "--val-batches", "1", "--steps-per-eval", "1000"])
    args.test = False
    run(args)
    base, tuned = evaluate(str(DEMO / "model"), str(tmp_path / "ad"), n=48, seed=1)
    assert 0.2 < base["positive"] < 0.8  # the base model has no preference
    assert tuned["positive"] > base["positive"] + 0.25
    assert tuned["kl_per_token"] > 0
