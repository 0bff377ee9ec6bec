"""DPO at the cost of SFT? Step time, tokens/s and peak memory, measured in one run.

Configurations, each in its own process (so peak memory and the BLAS choice
are per configuration), on the same sequences:

  sft          mlx-lm's own ``train()`` with its default loss: the floor
  dpo          mlx_dpo DPO, reference computed on the fly (adapter bypass)
  dpo-precomp  mlx_dpo DPO with precomputed reference log-probs
  sft-noblas   mlx-lm SFT again with MLX_DPO_BLAS=off (the wheel's own BLAS)

Tokens/s counts every real token forwarded: prompt and response, chosen and
rejected (SFT trains on the same 2B sequences). The model defaults to a random
~58M-parameter Llama (8 layers, hidden 512, 32k vocabulary) in float32, with
LoRA rank 8 on every linear layer.

    python benchmarks/bench_dpo.py                    # the table and the ratios
    python benchmarks/bench_dpo.py --model PATH       # any mlx-lm model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="An mlx-lm model folder or hub id (default: a generated random Llama).")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=4, help="Pairs per step (2x sequences).")
    p.add_argument("--max-len", type=int, default=256, help="Longest sequence (prompt + response).")
    p.add_argument("--distinct-batches", type=int, default=3, help="Batches (shapes) cycled through.")
    p.add_argument("--steps", type=int, default=6, help="Timed steps per configuration (after one warm-up pass over the batches).")
    p.add_argument("--noblas-steps", type=int, default=2, help="Timed steps for the slow-BLAS run.")
    p.add_argument("--configs", default="sft,dpo,dpo-precomp,sft-noblas")
    p.add_argument("--json", help="Also write the results here.")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args()


def make_pairs(n_pairs: int, max_len: int, vocab: int, seed: int = 0):
    """Random (prompt, chosen, rejected) token pairs of varied lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_pairs):
        n_prompt = int(rng.integers(max_len // 4, max_len // 2))
        n_c, n_r = (int(rng.integers(max_len // 8, max_len - n_prompt)) for _ in range(2))
        prompt = rng.integers(3, vocab, n_prompt).tolist()
        pairs.append(((prompt + rng.integers(3, vocab, n_c).tolist(), n_prompt), (prompt + rng.integers(3, vocab, n_r).tolist(), n_prompt)))
    return pairs


def worker(args: argparse.Namespace) -> dict:
    import mlx_dpo  # noqa: F401  (BLAS preload, unless MLX_DPO_BLAS=off)
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from mlx_dpo import _blas
    from mlx_dpo.batching import pad_batch
    from mlx_dpo.objectives import make_loss
    from mlx_dpo.reference import compute_reference_logps, make_reference

    cfg = args.worker
    mx.random.seed(0)
    model, _ = load(args.model_dir)
    model.set_dtype(mx.float32)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    vocab = model.args.vocab_size if hasattr(model, "args") else args.vocab
    n_batches = args.distinct_batches
    pairs = make_pairs(args.batch_size * n_batches, args.max_len, vocab)
    groups = [pairs[i * args.batch_size : (i + 1) * args.batch_size] for i in range(n_batches)]
    tokens_per_batch = [sum(len(s[0]) for ex in g for s in ex) for g in groups]

    times: list[float] = []

    class Timer(TrainingCallback):
        def on_train_loss_report(self, info):
            times.append(1.0 / info["iterations_per_second"])

    steps = args.noblas_steps if cfg.endswith("noblas") else args.steps
    iters = n_batches + steps
    tmp = tempfile.mkdtemp()
    mx.reset_peak_memory()
    if cfg.startswith("sft"):
        from mlx_lm.tuner.trainer import TrainingArgs, train

        def sft_batches(**_):
            while True:
                for g in groups:
                    seqs = [s for k in range(2) for s in (ex[k] for ex in g)]
                    width = max(len(t) for t, _ in seqs)
                    arr = np.zeros((len(seqs), width), np.int32)
                    for r, (t, _) in enumerate(seqs):
                        arr[r, : len(t)] = t
                    lengths = [(start, len(t)) for t, start in seqs]
                    yield mx.array(arr), mx.array(lengths)

        targs = TrainingArgs(batch_size=2 * args.batch_size, iters=iters, steps_per_report=1, steps_per_eval=10**9,
                             steps_per_save=10**9, max_seq_length=10**6, adapter_file=os.path.join(tmp, "a.safetensors"))
        train(model, optim.Adam(learning_rate=1e-5), train_dataset=[None], args=targs, iterate_batches=sft_batches, training_callback=Timer())
    else:
        from mlx_dpo.trainer import TrainingArgs, train

        batches = [pad_batch(g) for g in groups]
        reference = make_reference(model)
        if cfg == "dpo-precomp":
            for g, b in zip(groups, batches):
                ref = compute_reference_logps(reference, g, args.batch_size)
                b["reference_logps"] = mx.array(ref.T.reshape(-1))
            reference = None

        def dpo_batches(*_, **__):
            while True:
                yield from batches

        targs = TrainingArgs(batch_size=args.batch_size, iters=iters, steps_per_report=1, steps_per_eval=10**9,
                             steps_per_save=10**9, val_batches=0, adapter_file=os.path.join(tmp, "a.safetensors"))
        train(model, optim.Adam(learning_rate=1e-5), make_loss("dpo", reference), [None], None, dpo_batches, targs, Timer())

    timed = times[n_batches:]  # the first pass over the batches compiles each shape
    step = statistics.median(timed)
    return {
        "config": cfg,
        "blas": _blas.status[0],
        "step_s": step,
        "tokens_per_s": statistics.mean(tokens_per_batch) / step,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "steps_timed": len(timed),
        "params_m": sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters())) / 1e6,
    }


def main() -> None:
    args = parse()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            import mlx_dpo  # noqa: F401
            from mlx_dpo.toy import make_model

            model_dir = str(make_model(Path(tmp) / "model", hidden_size=args.hidden, num_layers=args.layers,
                                       num_heads=8, intermediate_size=args.intermediate, vocab_size=args.vocab,
                                       tokenizer_vocab=512))
        results = {}
        for cfg in args.configs.split(","):
            env = dict(os.environ)
            if cfg.endswith("noblas"):
                env["MLX_DPO_BLAS"] = "off"
            passed = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "model_dir", "configs", "model") and v is not None}
            cmd = [sys.executable, __file__, "--worker", cfg, "--model-dir", model_dir]
            cmd += [x for k, v in passed.items() for x in (f"--{k.replace('_', '-')}", str(v))]
            tic = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"{cfg} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            results[cfg] = json.loads(line[0][7:])
            print(f"  {cfg}: done in {time.perf_counter() - tic:.0f}s", file=sys.stderr, flush=True)

    r0 = next(iter(results.values()))
    print(f"\nmodel: {args.model or 'random Llama'} ({r0['params_m']:.1f}M parameters), float32, LoRA r=8 on all linears, "
          f"{args.batch_size} pairs/step, sequences up to {args.max_len} tokens, median of timed steps\n")
    print(f"| config | BLAS | step (s) | tokens/s | peak memory (GB) | steps timed |")
    print(f"|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['config']} | {r['blas']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_gb']:.3f} | {r['steps_timed']} |")
    print()
    ratios = []
    if "sft" in results:
        sft = results["sft"]
        for cfg, target in (("dpo-precomp", 0.90), ("dpo", 0.70)):
            if cfg in results:
                ratios.append((f"{cfg} tokens/s vs SFT", results[cfg]["tokens_per_s"] / sft["tokens_per_s"], f">= {target:.2f}", results[cfg]["tokens_per_s"] / sft["tokens_per_s"] >= target))
        for cfg in ("dpo", "dpo-precomp"):
            if cfg in results:
                ratio = results[cfg]["peak_gb"] / sft["peak_gb"]
                ratios.append((f"{cfg} peak memory vs SFT", ratio, "<= 1.15", ratio <= 1.15))
        if "sft-noblas" in results:
            ratio = results["sft-noblas"]["step_s"] / sft["step_s"]
            ratios.append(("BLAS preload speed-up per step", ratio, ">= 8", ratio >= 8))
    print("| ratio | value | target | met |")
    print("|---|---|---|---|")
    for name, value, target, ok in ratios:
        print(f"| {name} | {value:.2f} | {target} | {'yes' if ok else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ratios": [r[:2] for r in ratios]}, indent=2))


if __name__ == "__main__":
    main()
