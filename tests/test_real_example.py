"""The real-model examples' data steps (no model needed): sentiment pairs built from rated sentences,
the frontier's review prefixes and its VADER reward."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from mlx_dpo.data import build_pairs, load_records

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


def _load(name):
    import sys

    path, modules = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(ROOT / "examples" / "real"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "real" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:  # the examples' bare module names (run, vader) stay out of other tests
        sys.path[:] = path
        for added in set(sys.modules) - modules:
            if added in ("run", "vader", "prefixes"):
                del sys.modules[added]


class WordTokenizer:
    """One token per word, so a prefix names its sentence (each starts with a word of its own)."""

    def __init__(self):
        self.vocab: list[str] = []

    def encode(self, text, add_special_tokens=False):
        for w in text.split(" "):
            if w not in self.vocab:
                self.vocab.append(w)
        return [self.vocab.index(w) for w in text.split(" ")]

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids)


def test_review_prefixes_are_2_to_8_tokens_of_their_own_split(tiny_tokenizer):
    """Each prefix is the first k tokens (2 <= k <= 8, fewer than the sentence has) of one sentence;
    test, valid and train come from disjoint sentences; the cut is seeded; a real BPE tokenizer's
    prefixes stay within the bounds too."""
    prefixes = _load("prefixes")
    rng = random.Random(1)
    sentences = [" ".join([f"s{i}"] + [f"w{rng.randrange(300)}" for _ in range(rng.randint(0, 12))]) for i in range(500)]
    words = WordTokenizer()
    splits = prefixes.prefix_splits(sentences, words)
    assert prefixes.prefix_splits(sentences, words) == splits
    source = {s.split(" ")[0]: s.split(" ") for s in sentences}
    owners = {}
    for name, rows in splits.items():
        for row in rows:
            cut = row.split(" ")
            whole = source[cut[0]]
            assert whole[: len(cut)] == cut and 2 <= len(cut) <= 8 and len(cut) < len(whole), row
            owners.setdefault(name, []).append(cut[0])
    assert len(owners["test"]) <= prefixes.SPLITS["test"] and len(owners["valid"]) <= prefixes.SPLITS["valid"]
    test, valid, train = (set(owners[k]) for k in ("test", "valid", "train"))
    assert len(test) == len(owners["test"]) and not test & train and not valid & train and not test & valid
    assert len(test | valid | train) == sum(len(source[k]) > 2 for k in source)  # every sentence long enough is used once
    lengths = {len(row.split(" ")) for row in splits["train"]}
    assert lengths == set(range(2, 9))  # drawn over the whole range
    real = prefixes.prefix_splits(sentences, tiny_tokenizer)["train"]
    assert len(real) > 100
    for row in real:
        assert 1 <= len(tiny_tokenizer.encode(row, add_special_tokens=False)) <= 9  # a decoded cut may re-encode differently


def test_the_vader_reward_is_the_compound_score():
    pytest.importorskip("vaderSentiment", reason="pip install --no-deps vadersentiment==3.3.2 (CI installs it)")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = _load("vader")
    texts = [" a wonderful, moving film", " dull and painfully bad", " it opened on a Tuesday", ""]
    want = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in texts]
    got = vader.compound(texts)
    assert got == want and want[0] > 0.5 and want[1] < -0.5 and want[2] == 0.0
    assert vader.compound([[{"role": "assistant", "content": texts[0]}]]) == want[:1]  # conversational completions


def test_a_base_model_gets_the_same_split_as_plain_text_pairs(tmp_path, tiny_tokenizer):
    """--model gemma3 (no chat template): the same pairs in the same split, as text the data layer reads."""
    text, _ = ratings_text()
    pairs_file = tmp_path / "pairs.json"
    pairs_file.write_text(json.dumps(real_run.sentiment_pairs(text, 40)))
    chat = real_run.split(pairs_file, tmp_path / "chat", 10, 4)
    plain = real_run.split(pairs_file, tmp_path / "text", 10, 4, chat=False)
    for name in ("train", "valid", "test"):
        assert [r["chosen"]["value"] for r in chat[name]] == [r["chosen"] for r in plain[name]]
        assert all(r["prompt"].endswith(" movie review.\n") for r in plain[name])
    examples, _ = build_pairs(load_records(tmp_path / "text" / "test.jsonl"), tiny_tokenizer, 256)
    assert len(examples) == 10
    assert real_run.as_messages(plain["test"][0]) == plain["test"][0]["prompt"]  # answered as plain text
