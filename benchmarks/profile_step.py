"""Where a DPO step's time goes: each op class of one step re-run alone at the step's shapes.

MLX evaluates a step as one lazy graph, so its time cannot be split by timing lines of Python.
Instead this script times (1) the whole compiled DPO step (LoRA, reference on the fly, plain or
with prefix sharing), then (2) every op class of that step on its own, with the same shapes:
the linear layers' matmuls (forward, and the backward's activation gradients), attention,
the norms and element-wise ops, and the vocabulary projection with its log-softmax, each
forward and backward as the step runs them. The remainder is what the parts do not explain
(scheduling, the optimizer, LoRA's small matmuls, copies, compile overhead).

    python benchmarks/profile_step.py                       # the default bench_dpo model and shape
    python benchmarks/profile_step.py --shape prompt-heavy --shared
    python benchmarks/profile_step.py --model examples/real/work/smollm2-135m-instruct --batch-size 2 --shared

A second table gives the rates of the log-softmax's element-wise ops on the step's logits, and
how many cores each keeps busy (CPU seconds per wall second).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import mlx_dpo  # noqa: E402,F401  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

from bench_dpo import SHAPES, make_pairs  # noqa: E402
from mlx_dpo.compute.batching import pad_batch  # noqa: E402
from mlx_dpo.objectives.loss import Objective, pair_loss_fn  # noqa: E402
from mlx_dpo.compute.reference import make_reference  # noqa: E402
from mlx_dpo.toy import make_model  # noqa: E402


def median_time(fn, repeats: int) -> float:
    mx.eval(fn())
    runs = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn())
        runs.append(time.perf_counter() - tic)
    return statistics.median(runs)


def cores_busy(fn, repeats: int) -> tuple[float, float]:
    """(median seconds, CPU seconds per wall second) of ``fn``: 1.0 means one core did the work."""
    mx.eval(fn())
    r0, tic = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    wall, r1 = time.perf_counter() - tic, resource.getrusage(resource.RUSAGE_SELF)
    return wall / repeats, ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="default", choices=list(SHAPES))
    p.add_argument("--shared", action="store_true", help="Prefix sharing on.")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default=None, help="An mlx-lm model folder (default: bench_dpo's random Llama).")
    args = p.parse_args()

    if args.model:
        model, _ = load(args.model)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_model(Path(tmp) / "m", hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408,
                              vocab_size=32000, tokenizer_vocab=512)
            model, _ = load(str(path))
    model.set_dtype(mx.float32)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    cfg = model.args
    pairs = make_pairs(args.batch_size, args.max_len, cfg.vocab_size, shape=args.shape)
    batch = pad_batch(pairs, share_prefix=args.shared)
    loss_fn = pair_loss_fn(Objective(("dpo",)), make_reference(model))
    opt = optim.Adam(learning_rate=1e-5)
    grad_fn = nn.value_and_grad(model, lambda m, b: loss_fn(m, b)[0])
    state = [model.state, opt.state]

    @mx.compile
    def step_inner(b):
        loss, grad = grad_fn(model, b)
        opt.update(model, grad)
        return loss

    step = mx.compile(step_inner, inputs=state, outputs=state)
    total = median_time(lambda: step(batch), args.repeats)

    # The step's shapes: (rows, positions) of each pass the step makes.
    if args.shared:
        passes = [batch["prefix_tokens"].shape, batch["suffix_tokens"].shape]
        head_rows = batch["suffix_tokens"].shape
    else:
        passes = [batch["tokens"][:, :-1].shape]
        head_rows = (batch["tokens"].shape[0], batch["tokens"].shape[1] - 1 - batch["logits_from"])
    d, inter, n_heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", n_heads)
    head_dim = d // n_heads
    layers = cfg.num_hidden_layers
    linear_shapes = [(d, d), (d, kv_heads * head_dim), (d, kv_heads * head_dim), (d, d), (d, inter), (d, inter), (inter, d)]

    # Every op class, at the step's shapes, for every layer: the policy's forward and backward
    # (activation gradients) and the reference's forward. Inputs are made (and evaluated) first,
    # so only the ops themselves are timed.
    def prepared(arrays):
        mx.eval(arrays)
        return arrays

    def gemms():
        work = []
        for rows, pos in passes:
            m = rows * pos
            for k, n in linear_shapes:
                work.append(prepared([mx.random.normal((m, k)), mx.random.normal((n, k)), mx.random.normal((m, n))]))
        return lambda: [op for _ in range(layers) for x, w, g in work for op in (x @ w.T, g @ w, x @ w.T)]

    def attention():
        work, keys = [], 0
        for rows, pos in passes:
            keys += pos
            q = mx.random.normal((rows, n_heads, pos, head_dim))
            k = mx.random.normal((rows, kv_heads, keys, head_dim))
            work.append((prepared([q, k]), "causal" if keys == pos else None))

        def run():
            outs = []
            for _ in range(layers):
                for (q, k), mask in work:
                    f = lambda q, k, mask=mask: mx.fast.scaled_dot_product_attention(q, k, k, scale=head_dim**-0.5, mask=mask)  # noqa: E731
                    out, vjp = mx.vjp(f, [q, k], [mx.ones(q.shape)])
                    outs += out + vjp + [f(q, k)]
            return outs

        return run

    def norms_elementwise():
        norm = nn.RMSNorm(d)
        work = [prepared([mx.random.normal((rows, pos, d)), mx.random.normal((rows, pos, inter)),
                          mx.random.normal((rows, pos, inter))]) for rows, pos in passes]

        def block(x, a, b):
            h = norm(x) + x  # two norms and two residual adds per layer, and SwiGLU's product
            return norm(h) + h, nn.silu(a) * b

        def run():
            outs = []
            for _ in range(layers):
                for x, a, b in work:
                    out, vjp = mx.vjp(block, [x, a, b], [mx.ones_like(x), mx.ones_like(a)])
                    outs += out + vjp + list(block(x, a, b))
            return outs

        return run

    def head():
        rows, pos = head_rows
        h, w = prepared([mx.random.normal((rows, pos, d)), mx.random.normal((cfg.vocab_size, d))])
        t = mx.zeros((rows, pos), dtype=mx.int32)

        def f(h):
            logits = h @ w.T
            return (mx.take_along_axis(logits, t[..., None], axis=-1).squeeze(-1) - mx.logsumexp(logits, axis=-1)).sum()

        def run():
            out, vjp = mx.vjp(f, [h], [mx.array(1.0)])
            return out + vjp + [f(h)]

        return run

    parts = {name: median_time(make(), args.repeats) for name, make in
             (("linear-layer GEMMs", gemms), ("attention", attention), ("norms + element-wise", norms_elementwise),
              ("vocabulary projection + log-softmax", head))}
    name = args.model or "default bench_dpo model"
    print(f"\nDPO step, {name} ({layers} layers, hidden {d}, vocab {cfg.vocab_size}, float32, LoRA r8 all linears), "
          f"{args.batch_size} pairs, shape {args.shape}, prefix sharing {'on' if args.shared else 'off'}, "
          f"reference on the fly; passes (rows x positions): {passes}; median of {args.repeats}\n")
    print("| part | seconds | share of the step |")
    print("|---|---|---|")
    for name, t in parts.items():
        print(f"| {name} | {t:.3f} | {t / total:.0%} |")
    rest = total - sum(parts.values())
    print(f"| rest (optimizer, LoRA matmuls, copies, scheduling) | {rest:.3f} | {rest / total:.0%} |")
    print(f"| **whole compiled step** | {total:.3f} | 100% |")

    # The log-softmax's element-wise work, on logits of the step's vocabulary-projection shape.
    rows, pos = head_rows
    x = mx.random.normal((rows * pos, cfg.vocab_size))
    a, b = mx.random.normal((2048, 2048)), mx.random.normal((2048, 2048))
    mx.eval(x, a, b)
    print(f"\nOp rates on ({rows * pos}, {cfg.vocab_size}) float32 logits (cores busy: CPU seconds per wall second)\n")
    print("| op | ms | elements/s | cores busy |")
    print("|---|---|---|---|")
    for name, fn, size in (("exp", lambda: mx.exp(x), x.size), ("logsumexp (last axis)", lambda: mx.logsumexp(x, axis=-1), x.size),
                           ("softmax (last axis)", lambda: mx.softmax(x, axis=-1), x.size), ("sum (last axis)", lambda: x.sum(-1), x.size),
                           ("matmul 2048^3 (for comparison)", lambda: a @ b, a.size)):
        t, busy = cores_busy(fn, args.repeats)
        print(f"| {name} | {t * 1e3:.1f} | {size / t / 1e6:.0f} M | {busy:.2f} |")


if __name__ == "__main__":
    main()
