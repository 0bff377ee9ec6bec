"""GRPO cost: rollout throughput vs mlx-lm, and where a real GRPO step's time and memory go.

For each model (the shipped demo model, and unless ``--skip-random`` a bigger
random Llama written by ``mlx_dpo.toy.make_model``):

1. *Rollout alone.* ``sample_groups`` vs mlx-lm's ``batch_generate`` on the
   same ``--prompts`` prompts (the model's own train prompts, tokenized as the
   trainer does), G completions each, temperature 1, no EOS, so both produce
   exactly ``--max-tokens`` ids per completion (``bench_rollout.py``'s
   routine: one untimed warm-up, then the median of ``--rounds``). Also the
   peak memory of one ``sample_groups`` call (``mx.reset_peak_memory`` around
   it), in total and above the weights.
2. *Training.* A short GRPO run (loss ``dapo``, LoRA rank 8 on every layer,
   ``--prompts`` prompts x G completions per step, completions of up to
   ``--max-tokens``) through ``mlx_dpo.lora.run``, one report per step. From
   its ``metrics.jsonl``: the median over steps 2.. (step 1 compiles) of the
   step time split into rollout and the rest (scoring, log-probs, backward,
   update), the rollout share, the rollout tokens/s inside training, and the
   run's peak memory (model load included, the rollout bench's model freed).
   Each is its own median, so rollout + rest need not add up to the step.

The demo model samples with its real EOS during training (completions end
early); the random model rarely draws EOS, so its completions run to
``--max-tokens``, and its reward (1 + 0.01 * length) is constant within a group.

    python benchmarks/bench_grpo.py                          # demo + random model
    python benchmarks/bench_grpo.py --skip-random --iters 4  # demo only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_dpo  # noqa: E402,F401  (loads the fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

from bench_rollout import engines, time_rounds  # noqa: E402
from mlx_dpo.config import load_config  # noqa: E402
from mlx_dpo.data import load_prompt_splits  # noqa: E402
from mlx_dpo.train.metrics_log import read_metrics  # noqa: E402
from mlx_dpo.online.rollout import SamplingParams, sample_groups  # noqa: E402

DEMO_MODEL = ROOT / "examples" / "demo" / "model"
DEMO_PROMPTS = ROOT / "examples" / "demo" / "prompts"
DEMO_REWARD = ROOT / "examples" / "demo" / "rewards.py"

RANDOM_REWARD = '''"""Written by benchmarks/bench_grpo.py: a reward that needs no sensible text."""


def constant_plus_length(completion_ids, **kwargs):
    return [1.0 + 0.01 * len(ids) for ids in completion_ids]
'''


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL), help="Model for the first table (default: the demo model); "
                   "it is trained on --data with --reward.")
    p.add_argument("--data", default=str(DEMO_PROMPTS), help="Prompt folder for --model (train.jsonl is used).")
    p.add_argument("--reward", default=f"{DEMO_REWARD}:positive", help="PATH.py:function, the reward for --model.")
    p.add_argument("--skip-random", action="store_true", help="Only --model, not the random model.")
    p.add_argument("--random-hidden", type=int, default=512)
    p.add_argument("--random-layers", type=int, default=8)
    p.add_argument("--random-heads", type=int, default=8)
    p.add_argument("--random-vocab", type=int, default=8192, help="Embedding rows (the tokenizer has 1024).")
    p.add_argument("--prompts", type=int, default=4, help="Prompts per rollout and per training step (batch_size).")
    p.add_argument("--G", type=int, default=8, help="Completions per prompt (num_generations).")
    p.add_argument("--max-tokens", type=int, default=32, help="Completion length (max_completion_length).")
    p.add_argument("--rounds", type=int, default=3, help="Timed rollout rounds per engine (after one warm-up).")
    p.add_argument("--iters", type=int, default=6, help="GRPO steps (the first is not timed).")
    p.add_argument("--json", help="Also write the results here.")
    return p.parse_args()


def _cpu_dtype(model) -> None:
    """As the trainer's dtype 'auto' does on a CPU: float32."""
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)


def rollout_bench(model_path: str, data: str, args: argparse.Namespace) -> dict:
    """Section 1: sample_groups vs batch_generate tokens/s, and sample_groups' peak memory."""
    model, tokenizer = load(model_path)
    _cpu_dtype(model)
    model.eval()
    with contextlib.redirect_stdout(sys.stderr):
        train = load_prompt_splits(data, tokenizer, splits=("train",))["train"]
    if len(train) < args.prompts:
        sys.exit(f"{data} has only {len(train)} train prompts (--prompts {args.prompts})")
    prompts = [p.ids for p in train[: args.prompts]]
    G, T = args.G, args.max_tokens
    params = SamplingParams(temperature=1.0, max_tokens=T)
    batch = len(prompts) * G  # every row decoded together, by both engines
    ours, theirs = engines(model, tokenizer, prompts, G, T, batch)

    result = {"prompt_tokens": [len(p) for p in prompts], "rows": batch}
    for key, fn in (("ours", ours), ("mlx_lm", theirs)):
        seconds, tokens = time_rounds(fn, args.rounds)
        result[key] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}

    # Peak memory of one rollout (same work, no EOS: every row runs to the end).
    mx.eval(model.parameters())
    gc.collect()
    mx.clear_cache()
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.random.seed(0)
    sample_groups(model, prompts, G, params, [], max_batch=batch)
    result["rollout_peak_gb"] = mx.get_peak_memory() / 1e9
    result["weights_gb"] = weights / 1e9
    result["params_m"] = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters())) / 1e6
    return result


def train_bench(model_path: str, data: str, reward: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Section 2: a short GRPO run through mlx_dpo.lora.run; medians from its metrics.jsonl."""
    from mlx_dpo.lora import run

    reward_file, _, func = reward.rpartition(":")
    reward_file = Path(reward_file).resolve()
    if not reward_file.is_file() or not func:
        sys.exit(f"--reward must be PATH.py:function, got {reward!r}")
    adapter_path = workdir / "adapters"
    overrides = {
        "model": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
        "data": str(Path(data).resolve()),
        "train": True,
        "test": False,
        "loss_type": "dapo",
        "reward_funcs": [f"{reward_file.stem}.{func}"],  # resolved in the working directory (see below)
        "num_generations": args.G,
        "max_completion_length": args.max_tokens,
        "temperature": 1.0,
        "beta": 0.0,
        "fine_tune_type": "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
        "optimizer": "adam",
        "learning_rate": 5e-5,
        "batch_size": args.prompts,
        "iters": args.iters,
        "steps_per_report": 1,
        "steps_per_eval": 10**9,
        "val_batches": 0,
        "save_every": 10**9,
        "adapter_path": str(adapter_path),
        "seed": 0,
    }
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    cwd = os.getcwd()
    tic = time.perf_counter()
    try:
        # Reward files are looked up beside the config file, else in the working directory:
        # with no config file, run from the reward's folder (every other path is absolute).
        os.chdir(reward_file.parent)
        with contextlib.redirect_stdout(sys.stderr):
            run(load_config([], overrides=overrides))
    finally:
        os.chdir(cwd)
    wall = time.perf_counter() - tic
    records = sorted((r for r in read_metrics(adapter_path) if r.get("split") == "train"), key=lambda r: r["step"])
    timed = records[1:] or records  # step 1 includes compiling the step
    med = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    return {
        "steps_timed": len(timed),
        "step_s": statistics.median(r["rollout_seconds"] + r["train_seconds"] for r in timed),
        "rollout_s": med("rollout_seconds"),
        "train_s": med("train_seconds"),
        "rollout_share": med("rollout_share"),
        "rollout_tokens_per_s": med("rollout_tokens_per_second"),
        "first_step_s": records[0]["rollout_seconds"] + records[0]["train_seconds"],
        "peak_gb": max(r["peak_memory"] for r in records),
        "mean_length": med("completions/mean_length") if "completions/mean_length" in timed[0] else float("nan"),
        "wall_s": wall,
    }


def make_random(workdir: Path, args: argparse.Namespace) -> tuple[str, str, str]:
    """A random Llama, a prompt folder and a reward file, all under ``workdir``."""
    from mlx_dpo.toy import make_model, preference_records

    model = make_model(workdir / "model", hidden_size=args.random_hidden, num_layers=args.random_layers,
                       num_heads=args.random_heads, vocab_size=args.random_vocab, tokenizer_vocab=1024)
    data = workdir / "prompts"
    data.mkdir()
    n = max(4 * args.prompts, 32)
    with open(data / "train.jsonl", "w") as f:
        for rec in preference_records(n, seed=0):
            f.write(json.dumps({"prompt": rec["prompt"]}) + "\n")
    reward = workdir / "bench_rewards.py"
    reward.write_text(RANDOM_REWARD)
    return str(model), str(data), f"{reward}:constant_plus_length"


def table(name: str, r: dict, t: dict, args: argparse.Namespace) -> None:
    ours, theirs = r["ours"], r["mlx_lm"]
    lens = r["prompt_tokens"]
    print(f"\n### {name} ({r['params_m']:.1f}M parameters, float32 weights {r['weights_gb']:.3f} GB)\n")
    print(f"Rollout alone: {args.prompts} prompts ({min(lens)}-{max(lens)} tokens) x G={args.G}, "
          f"{args.max_tokens} tokens each, no EOS, all {r['rows']} rows in one batch, median of {args.rounds} rounds. "
          f"Training: {t['steps_timed']} timed steps (median; step 1, {t['first_step_s']:.2f} s, compiles), "
          f"mean completion length {t['mean_length']:.1f}.\n")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| sample_groups tokens/s | {ours['tokens_per_s']:,.0f} ({ours['seconds']:.3f} s for {ours['tokens']} tokens) |")
    print(f"| mlx_lm batch_generate tokens/s | {theirs['tokens_per_s']:,.0f} ({theirs['seconds']:.3f} s for {theirs['tokens']} tokens) |")
    print(f"| sample_groups vs batch_generate | {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x |")
    print(f"| rollout peak memory (GB, above weights) | {r['rollout_peak_gb']:.3f} ({r['rollout_peak_gb'] - r['weights_gb']:+.3f}) |")
    print(f"| GRPO step (s) | {t['step_s']:.3f} |")
    print(f"| - rollout (s) | {t['rollout_s']:.3f} |")
    print(f"| - training: scoring, log-probs, backward, update (s) | {t['train_s']:.3f} |")
    print(f"| rollout share of the step | {t['rollout_share']:.1%} |")
    print(f"| rollout tokens/s in training | {t['rollout_tokens_per_s']:,.0f} |")
    print(f"| training peak memory (GB) | {t['peak_gb']:.3f} |")
    print(f"| run wall time (s, load included) | {t['wall_s']:.1f} |")


def main() -> None:
    args = parse()
    print("$ " + " ".join(shlex.quote(a) for a in ["python", *sys.argv]))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jobs = [("demo model" if Path(args.model).resolve() == DEMO_MODEL.resolve() else args.model,
                 args.model, args.data, args.reward, tmp / "main")]
        if not args.skip_random:
            rnd = tmp / "random"
            rnd.mkdir()
            print("writing the random model ...", file=sys.stderr, flush=True)
            path, data, reward = make_random(rnd, args)
            name = (f"random Llama (hidden {args.random_hidden}, {args.random_layers} layers, "
                    f"{args.random_heads} heads, vocab {args.random_vocab})")
            jobs.append((name, path, data, reward, rnd))
        for name, path, data, reward, work in jobs:
            work.mkdir(exist_ok=True)
            tic = time.perf_counter()
            r = rollout_bench(path, data, args)
            print(f"  {name}: rollout bench done in {time.perf_counter() - tic:.0f}s", file=sys.stderr, flush=True)
            gc.collect()
            tic = time.perf_counter()
            t = train_bench(path, data, reward, args, work)
            print(f"  {name}: GRPO run done in {time.perf_counter() - tic:.0f}s", file=sys.stderr, flush=True)
            results[name] = {"rollout": r, "train": t}
            table(name, r, t, args)

    print("\n### Summary\n")
    print("| model | params (M) | sample_groups tok/s | batch_generate tok/s | speed-up | step (s) | rollout (s) "
          "| train (s) | rollout share | rollout tok/s in training | rollout peak (GB) | training peak (GB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, res in results.items():
        r, t = res["rollout"], res["train"]
        print(f"| {name} | {r['params_m']:.1f} | {r['ours']['tokens_per_s']:,.0f} | {r['mlx_lm']['tokens_per_s']:,.0f} "
              f"| {r['ours']['tokens_per_s'] / r['mlx_lm']['tokens_per_s']:.2f}x | {t['step_s']:.3f} | {t['rollout_s']:.3f} "
              f"| {t['train_s']:.3f} | {t['rollout_share']:.1%} | {t['rollout_tokens_per_s']:,.0f} "
              f"| {r['rollout_peak_gb']:.3f} | {t['peak_gb']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
