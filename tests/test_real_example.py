"""The real-model example's data step: sentiment pairs built from rated sentences (no model needed)."""

import importlib.util
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("real_run", ROOT / "examples" / "real" / "run.py")
real_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real_run)


def ratings_text(n=400, seed=0):
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        score = rng.uniform(-4, 4)
        words = " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randint(3, 45)))
        lines.append(f"{i + 1}\t{score:.6f}\t{words} {i}.")  # every sentence distinct
    return "\r\n".join(lines) + "\r\n", {line.split("\t")[2].strip(): float(line.split("\t")[1]) for line in lines}


def test_sentiment_pairs_follow_the_ratings():
    text, score_of = ratings_text()
    pairs = real_run.sentiment_pairs(text, 60)
    assert len(pairs) == 60
    seen = set()
    for i, pair in enumerate(pairs):
        want = "positive" if i % 2 == 0 else "negative"
        assert pair["conversations"] == [{"from": "human", "value": f"Write one sentence from a {want} movie review."}]
        chosen, rejected = pair["chosen"]["value"], pair["rejected"]["value"]
        sign = 1 if want == "positive" else -1
        assert sign * score_of[chosen] >= 1.5 and -sign * score_of[rejected] >= 1.5
        assert len(chosen.split()) <= 40 and len(rejected.split()) <= 40
        assert chosen not in seen and rejected not in seen  # each sentence in one pair only
        seen.update((chosen, rejected))
    assert real_run.sentiment_pairs(text, 60) == pairs  # seeded


def test_too_few_rated_sentences_is_one_line():
    text, _ = ratings_text(40)
    with pytest.raises(SystemExit, match="positive and .* negative sentences; asked for 500 pairs"):
        real_run.sentiment_pairs(text, 500)
