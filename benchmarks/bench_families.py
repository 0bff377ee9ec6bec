"""Hybrid and MoE training memory: a DPO step's peak memory and time against sequence length.

Three random models of one width (hidden 1024, 2 layers, 8k vocabulary, float32, LoRA rank 8 on
every linear layer) are each trained one DPO step (one pair, reference log-probs precomputed,
Adam) at each sequence length, every (family, length) in its own process so that peak memory is
that configuration's alone:

  llama        2 attention layers (16 heads of 64, 4 KV heads), a 2816-wide MLP: the baseline
  qwen3_moe    the same attention, each MLP 16 experts of 512 with 4 routed per token
  qwen3_next   1 gated-delta layer (8 value heads, 4 key heads, heads of 128, conv 4) and 1 gated
               attention layer, each MLP 16 experts of 512 (4 routed) plus a 512-wide shared expert

The pair's sequences are ``length`` tokens each (a prompt of length/4, responses of 3/4). The table
gives peak memory, its growth per token of the pair (both sequences), and the median step time;
a length whose predicted peak (from the two lengths below it) exceeds ``--max-gb`` is not run.

    python benchmarks/bench_families.py                         # lengths 256..4096, 2 timed steps
    python benchmarks/bench_families.py --families qwen3_next --lengths 256,512 --steps 1
    python benchmarks/bench_families.py --families qwen3_next --layers 4 --lengths 256,512 [--grad-checkpoint]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = {"hidden_size": 1024, "num_hidden_layers": 2, "intermediate_size": 2816, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 8192, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False}
MOE = {"num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 512, "decoder_sparse_step": 1,
       "mlp_only_layers": [], "norm_topk_prob": True}
FAMILIES = {
    "llama": {},
    "qwen3_moe": MOE,
    "qwen3_next": {**MOE, "linear_num_value_heads": 8, "linear_num_key_heads": 4, "linear_key_head_dim": 128,
                   "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "shared_expert_intermediate_size": 512,
                   "partial_rotary_factor": 0.25, "full_attention_interval": 2},
}


def build(family: str, layers: int = 2):
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import _get_classes

    config = {**BASE, **FAMILIES[family], "model_type": family, "num_hidden_layers": layers}
    if family == "qwen3_next":  # one attention layer, the rest gated delta
        config["full_attention_interval"] = layers
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.float32)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    return model


def worker(family: str, length: int, steps: int, layers: int = 2, checkpoint: bool = False) -> dict:
    import mlx_dpo  # noqa: F401  (BLAS preload)
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    from mlx_dpo.compute.batching import pad_batch
    from mlx_dpo.compute.forward import PLAIN
    from mlx_dpo.objectives.loss import Objective, pair_loss_fn

    model = build(family, layers)
    if checkpoint:  # mlx-lm's: each layer's activations recomputed in the backward pass
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    rng = np.random.default_rng(0)
    prompt = length // 4
    pair = tuple((rng.integers(1, BASE["vocab_size"], length).tolist(), prompt) for _ in range(2))
    batch = pad_batch([pair])
    batch["reference_logps"] = mx.zeros((2,))
    loss_fn = pair_loss_fn(Objective(("dpo",)), None, PLAIN)
    optimizer = optim.Adam(learning_rate=1e-5)
    value_and_grad = nn.value_and_grad(model, lambda m, b: loss_fn(m, b)[0])
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    times = []
    for _ in range(steps + 1):  # the first step is a warm-up
        start = time.perf_counter()
        loss, grads = value_and_grad(model, batch)
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        times.append(time.perf_counter() - start)
    return {"family": family, "length": length, "peak_gb": mx.get_peak_memory() / 1e9,
            "step_s": statistics.median(times[1:]), "loss": float(loss)}


def run(family: str, length: int, steps: int, layers: int, checkpoint: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{family}:{length}", "--steps", str(steps), "--layers", str(layers)]
    cmd += ["--grad-checkpoint"] if checkpoint else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"family": family, "length": length, "error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def predicted(rows: list[dict], length: int) -> float:
    """Peak memory at ``length``, extrapolated linearly from the last two measured lengths."""
    (a, b) = rows[-2:]
    slope = (b["peak_gb"] - a["peak_gb"]) / (b["length"] - a["length"])
    return b["peak_gb"] + slope * (length - b["length"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--lengths", default="256,512,1024,2048,4096")
    p.add_argument("--steps", type=int, default=2, help="Timed steps per configuration (after one warm-up).")
    p.add_argument("--layers", type=int, default=2, help="Layers of each model (qwen3_next: the last is attention).")
    p.add_argument("--grad-checkpoint", action="store_true", help="Recompute each layer in the backward pass (mlx-lm's).")
    p.add_argument("--max-gb", type=float, default=18.0, help="Skip a length predicted to need more.")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        family, length = args.worker.split(":")
        print(json.dumps(worker(family, int(length), args.steps, args.layers, args.grad_checkpoint)))
        return
    lengths = [int(n) for n in args.lengths.split(",")]
    print("| family | tokens per sequence | peak memory (GB) | growth (MB per token of the pair) | step (s) |")
    print("|---|---|---|---|---|")
    for family in args.families.split(","):
        rows: list[dict] = []
        for length in lengths:
            if len(rows) >= 2 and (need := predicted(rows, length)) > args.max_gb:
                print(f"| {family} | {length} | not run: predicted {need:.1f} GB > {args.max_gb:g} | | |", flush=True)
                continue
            row = run(family, length, args.steps, args.layers, args.grad_checkpoint)
            if "error" in row:
                print(f"| {family} | {length} | failed: {row['error']} | | |", flush=True)
                continue
            growth = ""
            if rows:
                growth = f"{(row['peak_gb'] - rows[-1]['peak_gb']) * 1e3 / (2 * (length - rows[-1]['length'])):.2f}"
            rows.append(row)
            print(f"| {family} | {length} | {row['peak_gb']:.2f} | {growth} | {row['step_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
