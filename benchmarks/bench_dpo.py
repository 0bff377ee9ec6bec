"""DPO at the cost of SFT? Step time, tokens/s and peak memory, measured in one run.

Configurations, each in its own process (so peak memory and the BLAS choice
are per configuration), on the same sequences:

  sft          mlx-lm's own ``train()`` with its default loss: the floor
  dpo          mlx_dpo DPO, reference computed on the fly (adapter bypass)
  dpo-precomp  mlx_dpo DPO with precomputed reference log-probs
  sft-noblas   mlx-lm SFT again with MLX_DPO_BLAS=off (the wheel's own BLAS)
  dpo-shared, dpo-precomp-shared   the same with prefix sharing (each prompt run once per pair)

Data shapes (``--shapes``): ``default`` (prompt 1/4-1/2 of the longest sequence, responses
filling the rest), ``prompt-heavy`` (hh-rlhf-like: the prompt about twice a response),
``balanced`` (prompt about one response) and ``response-heavy`` (a 16-32 token prompt).

Tokens/s counts every real token of the pairs: prompt and response, chosen and
rejected (SFT trains on the same 2B sequences), shared or not, so the figures
compare. The benchmark also measures this machine's float32 GEMM peak (the BLAS
in use, square matmuls) and reports each configuration's executed model FLOP/s
as a share of it: 4 x matmul parameters x tokens run for the policy's forward
and backward (LoRA: no weight gradients of the base), 2 x for a reference
forward; tokens run are what the model actually processes (a shared prompt once),
and the vocabulary projection counts on response tokens only (a lower bound). The model defaults to a random
~58M-parameter Llama (8 layers, hidden 512, 32k vocabulary) in float32, with
LoRA rank 8 on every linear layer.

    python benchmarks/bench_dpo.py                    # the table and the ratios (mlx_dpo's default CPU path)
    python benchmarks/bench_dpo.py --path compiled    # mlx_dpo's compiled one-stream step instead
    python benchmarks/bench_dpo.py --model PATH       # any mlx-lm model
    python benchmarks/bench_dpo.py --shapes prompt-heavy,balanced,response-heavy \
        --configs dpo,dpo-shared,dpo-precomp,dpo-precomp-shared   # prefix sharing
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
    p.add_argument("--path", default="default", choices=("default", "compiled"),
                   help="mlx_dpo's step: default (as `python -m mlx_dpo.lora` runs it here: compile and cpu_streams "
                        "auto) or compiled (one stream, a compiled step, every position projected)")
    p.add_argument("--shapes", default="default", help="Comma-separated data shapes: " + ", ".join(SHAPES))
    p.add_argument("--shape", default="default", help=argparse.SUPPRESS)
    p.add_argument("--json", help="Also write the results here.")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args()


# Shape: (prompt length range, response length range), as fractions of the longest sequence;
# the response range's upper end is capped by what the prompt leaves.
SHAPES = {
    "default": ((1 / 4, 1 / 2), (1 / 8, 1.0)),
    "prompt-heavy": ((0.55, 0.7), (0.2, 0.35)),  # hh-rlhf: median prompt about twice a response
    "balanced": ((0.4, 0.5), (0.35, 0.5)),
    "response-heavy": ((16, 32), (0.6, 0.9)),  # absolute prompt lengths: a short instruction
}


def make_pairs(n_pairs: int, max_len: int, vocab: int, seed: int = 0, shape: str = "default"):
    """Random (prompt, chosen, rejected) token pairs of varied lengths, in the given shape."""
    import numpy as np

    def tokens(bound: float) -> int:
        return int(bound) if bound >= 1 and isinstance(bound, int) else int(bound * max_len)

    (p_lo, p_hi), (r_lo, r_hi) = SHAPES[shape]
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_pairs):
        n_prompt = int(rng.integers(tokens(p_lo), tokens(p_hi)))
        room = max_len - n_prompt
        n_c, n_r = (int(rng.integers(min(tokens(r_lo), room - 1), min(tokens(r_hi), room) + 1)) for _ in range(2))
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

    from mlx_dpo._platform import blas as _blas
    from mlx_dpo.compute.batching import pad_batch
    from mlx_dpo.compute.reference import compute_reference_logps, make_reference
    from mlx_dpo.lora import compiled, cpu_plan
    from mlx_dpo.objectives.loss import Objective, pair_loss_fn

    cfg = args.worker
    mx.random.seed(0)
    model, _ = load(args.model_dir)
    model.set_dtype(mx.float32)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    vocab = model.args.vocab_size if hasattr(model, "args") else args.vocab
    n_batches = args.distinct_batches
    pairs = make_pairs(args.batch_size * n_batches, args.max_len, vocab, shape=args.shape)
    groups = [pairs[i * args.batch_size : (i + 1) * args.batch_size] for i in range(n_batches)]
    tokens_per_batch = [sum(len(s[0]) for ex in g for s in ex) for g in groups]
    share = cfg.endswith("-shared")
    # Tokens the model actually runs: a shared prompt once (its last token starts each response).
    run_per_batch = [sum(ex[0][1] - 1 for ex in g) + sum(len(t) - st for ex in g for t, st in ex) if share else n
                     for g, n in zip(groups, tokens_per_batch)]

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
        from mlx_dpo.train.trainer import TrainingArgs, train

        import types

        batches = [pad_batch(g, share_prefix=share) for g in groups]
        assert all(("prefix_tokens" in b) == share for b in batches)
        default = args.path == "default"
        plan = types.SimpleNamespace(compile="auto" if default else True, cpu_streams="auto" if default else 1, logits_chunk_size=None)
        step_compiled, update_compiled = compiled(plan)
        with cpu_plan(plan, vocab) as how:  # the CPU plan `python -m mlx_dpo.lora` would use
            reference = make_reference(model, None, how)
            if cfg.startswith("dpo-precomp"):
                for g, b in zip(groups, batches):
                    ref = compute_reference_logps(reference, g, args.batch_size, share_prefix=share)
                    b["reference_logps"] = mx.array(ref.T.reshape(-1))
                reference = None

            def dpo_batches(*_, **__):
                while True:
                    yield from batches

            targs = TrainingArgs(batch_size=args.batch_size, iters=iters, steps_per_report=1, steps_per_eval=10**9,
                                 steps_per_save=10**9, val_batches=0, adapter_file=os.path.join(tmp, "a.safetensors"),
                                 compile=step_compiled, compile_update=update_compiled)
            train(model, optim.Adam(learning_rate=1e-5), pair_loss_fn(Objective(("dpo",)), reference, how), [None], None,
                  dpo_batches, targs, training_callback=Timer())

    timed = times[n_batches:]  # the first pass over the batches compiles each shape
    step = statistics.median(timed)
    from mlx.utils import tree_flatten

    # Matmul parameters of the body (every linear layer but the head; LoRA's own are negligible)
    # and of the vocabulary projection, which runs on response positions only (the prompt's
    # logits are skipped, and SFT's loss ignores them too), so the count is a lower bound.
    linears = {n: m for n, m in model.named_modules() if type(m).__name__ in ("Linear", "QuantizedLinear")}
    head_params = linears.pop("lm_head").weight.size if "lm_head" in linears else model.model.embed_tokens.weight.size
    body_params = sum(m.weight.size for m in linears.values())
    responses = statistics.mean(sum(len(t) - st for ex in g for t, st in ex) for g in groups)
    passes = 4 + (2 if cfg in ("dpo", "dpo-shared") else 0)  # policy forward + backward, reference forward
    return {
        "config": cfg if cfg.startswith("sft") else f"{cfg} ({args.path})",
        "shape": args.shape,
        "mean_prompt": statistics.mean(ex[0][1] for g in groups for ex in g),
        "mean_response": statistics.mean(len(t) - st for g in groups for ex in g for t, st in ex),
        "model_gflops": passes * (body_params * statistics.mean(run_per_batch) + head_params * responses) / step / 1e9,
        "blas": _blas.status[0],
        "step_s": step,
        "tokens_per_s": statistics.mean(tokens_per_batch) / step,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "steps_timed": len(timed),
        "params_m": sum(v.size for _, v in tree_flatten(model.parameters())) / 1e6,
    }


def gemm_peak() -> dict:
    """This machine's float32 GEMM rate with the BLAS in use: the best median over square sizes."""
    import mlx_dpo  # noqa: F401
    import mlx.core as mx

    from mlx_dpo._platform import blas as _blas

    best = 0.0
    for n in (512, 1024, 2048):
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a, b, a @ b)
        runs = []
        for _ in range(5):
            tic = time.perf_counter()
            mx.eval(a @ b)
            runs.append(time.perf_counter() - tic)
        best = max(best, 2 * n**3 / statistics.median(runs) / 1e9)
    return {"config": "gemm", "gflops": best, "blas": _blas.status[0]}


def main() -> None:
    args = parse()
    if args.worker:
        print("RESULT " + json.dumps(gemm_peak() if args.worker == "gemm" else worker(args)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            import mlx_dpo  # noqa: F401
            from mlx_dpo.toy import make_model

            model_dir = str(make_model(Path(tmp) / "model", hidden_size=args.hidden, num_layers=args.layers,
                                       num_heads=8, intermediate_size=args.intermediate, vocab_size=args.vocab,
                                       tokenizer_vocab=512))
        shapes = args.shapes.split(",")
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown:
            sys.exit(f"unknown shape(s) {unknown}: choose from {', '.join(SHAPES)}")
        runs = {}
        for shape, cfg in [(None, "gemm")] + [(s, c) for s in shapes for c in args.configs.split(",")]:
            env = dict(os.environ)
            if cfg.endswith("noblas"):
                env["MLX_DPO_BLAS"] = "off"
            skip = ("json", "worker", "model_dir", "configs", "model", "shapes", "shape")
            passed = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
            cmd = [sys.executable, __file__, "--worker", cfg, "--model-dir", model_dir, "--shape", shape or "default"]
            cmd += [x for k, v in passed.items() for x in (f"--{k.replace('_', '-')}", str(v))]
            tic = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"{cfg} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            runs[(shape, cfg)] = json.loads(line[0][7:])
            print(f"  {shape or ''} {cfg}: done in {time.perf_counter() - tic:.0f}s", file=sys.stderr, flush=True)

    peak = runs.pop((None, "gemm"))
    r0 = next(iter(runs.values()))
    print(f"\nmodel: {args.model or 'random Llama'} ({r0['params_m']:.1f}M parameters), float32, LoRA r=8 on all linears, "
          f"{args.batch_size} pairs/step, sequences up to {args.max_len} tokens, median of timed steps")
    print(f"float32 GEMM peak on this machine ({peak['blas']}): {peak['gflops']:.1f} GFLOP/s\n")
    print("| shape | prompt / response (mean tokens) | config | BLAS | step (s) | tokens/s | peak memory (GB) | model GFLOP/s | share of GEMM peak | steps timed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (shape, _), r in runs.items():
        print(f"| {shape} | {r['mean_prompt']:.0f} / {r['mean_response']:.0f} | {r['config']} | {r['blas']} | {r['step_s']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_gb']:.3f} | {r['model_gflops']:.1f} | {r['model_gflops'] / peak['gflops']:.0%} | {r['steps_timed']} |")
    print()
    ratios = []
    for shape in shapes:
        for plain in ("dpo", "dpo-precomp"):
            a, b = runs.get((shape, plain)), runs.get((shape, plain + "-shared"))
            if a and b:
                target = {"prompt-heavy": 1.4, "response-heavy": 0.95}.get(shape)
                value = b["tokens_per_s"] / a["tokens_per_s"]
                ratios.append((f"{shape}: {plain}-shared tokens/s vs {plain}", value, f">= {target:.2f}" if target else "-",
                               value >= target if target else None))
                mem = b["peak_gb"] / a["peak_gb"]
                ratios.append((f"{shape}: {plain}-shared peak memory vs {plain}", mem, "-", None))
    for (shape, cfg), r in runs.items():
        if cfg.startswith("dpo") and shape in ("default", "balanced"):
            share = r["model_gflops"] / peak["gflops"]
            ratios.append((f"{shape}: {cfg} share of the GEMM peak", share, ">= 0.50", share >= 0.5))
    results = {f"{s}/{c}": r for (s, c), r in runs.items()}
    if ("default", "sft") in runs:
        results = {c: r for (s, c), r in runs.items() if s == "default"}
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
        print(f"| {name} | {value:.2f} | {target} | {'-' if ok is None else 'yes' if ok else 'NO'} |")
    if args.json:
        out = {"gemm_peak": peak, "results": results, "ratios": [r[:2] for r in ratios]}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
