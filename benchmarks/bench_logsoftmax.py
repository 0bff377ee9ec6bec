"""The vocabulary's log-softmax and the MLP's SiLU on MLX's CPU backend, and what makes them cheaper.

    python benchmarks/bench_logsoftmax.py [--rows 120] [--vocab 49152] [--repeats 9]

Part 1 times, on (rows, vocab) float32 logits (a DPO step on SmolLM2 projects about 120-400
response positions onto 49,152 tokens): MLX's ``exp``, ``mlx_dpo.compute.fastops.exp_shifted`` (a
vectorised one, an MLX operation built from ``compute/fastops.cpp``) and MLX's ``logsumexp``; the
summed target log-probs with their gradient through MLX's ``logsumexp`` and through
``mlx_dpo.compute.logps.logsumexp_parts`` (one pass of ``exp`` for both, ``exp_shifted``'s where the
extension builds); and an ``exp`` built from
multiplies and adds (range reduction and a polynomial), compiled, once on plain arrays and once
inside ``mx.value_and_grad``, where MLX runs a compiled function's graph uncompiled (its inputs
are tracers).

Part 2 measures MLX's peak memory for the gradient (LoRA on every linear layer) of the summed
log-probs of 4 random sequences of 160 tokens through ``--model`` (SmolLM2-135M-Instruct as
``examples/real/run.py`` converts it), evaluated once at the end (as a training step is) and with
an ``mx.eval`` of the logits inside the traced function, which a host computation of the
log-softmax in the middle of the graph needs.

Part 3 times SmolLM2's SwiGLU, ``silu(gate) * x`` on (``--rows`` x 4, 1536) float32, forward and
with its gradient: MLX's ops (``mlx_lm.models.activations.swiglu``) against ``fastops.swiglu``.

Medians of ``--repeats`` runs; one process, nothing else should be running.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import mlx_dpo  # noqa: F401  (the BLAS and evaluation order before MLX)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlx_lm.models.activations import swiglu as mlx_swiglu

from mlx_dpo.compute import fastops
from mlx_dpo.compute.logps import logsumexp_parts, split_head, token_logps

LOG2E, LN2_HI, LN2_LO, ROUND = 1.4426950408889634, 0.693359375, -2.12194440e-4, 12582912.0
Q = (1.9826496e-4, 1.3946021e-3, 8.3334297e-3, 4.1666269e-2, 1.6666666e-1, 0.5)


def _poly_parts(z: mx.array) -> tuple[mx.array, mx.array]:
    """exp(z) for z <= 0 as 2^n exp(r): the polynomial exp(r) and the rounding that holds n."""
    z = mx.where(z < -87.3, -87.3, z)
    m = z * LOG2E + ROUND
    n = m - ROUND
    r = (z - n * LN2_HI) - n * LN2_LO
    q = mx.array(Q[0])
    for c in Q[1:]:
        q = q * r + c
    return (q * r) * r + r + 1.0, m


_compiled_parts = mx.compile(_poly_parts)


def poly_exp(z: mx.array) -> mx.array:
    p, m = _compiled_parts(z)
    return p * ((m.view(mx.int32) - (0x4B400000 - 127)) << 23).view(mx.float32)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def part1(rows: int, vocab: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    logits = mx.array((rng.normal(size=(rows, vocab)) * 4).astype(np.float32))
    shifted = logits - logits.max(axis=-1, keepdims=True)
    targets = mx.array(rng.integers(0, vocab, rows).astype(np.int32))
    weights = mx.array(rng.normal(size=rows).astype(np.float32))
    mx.eval(logits, shifted, targets, weights)

    def summed(lse):
        def f(z):
            picked = mx.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
            return ((picked - lse(z)) * weights).sum()
        return f

    own, parts = summed(lambda z: mx.logsumexp(z, axis=-1)), summed(lambda z: logsumexp_parts(z)[0])
    inside = mx.value_and_grad(lambda z: mx.stop_gradient(poly_exp(z)).sum() + (z * weights[:, None]).sum())
    exact = np.exp(np.array(shifted, np.float64))
    error = float(np.max(np.abs(np.array(poly_exp(shifted), np.float64) - exact) / np.maximum(exact, 1e-30)))
    cases = [
        ("MLX exp", lambda: mx.exp(shifted)),
        ("fastops.exp_shifted", lambda: fastops.exp_shifted(logits, logits.max(axis=-1))),
        ("MLX logsumexp (forward)", lambda: mx.logsumexp(logits, axis=-1)),
        ("log-probs + gradient, MLX logsumexp", lambda: mx.value_and_grad(own)(logits)),
        ("log-probs + gradient, logsumexp_parts", lambda: mx.value_and_grad(parts)(logits)),
        (f"compiled polynomial exp (max rel. error {error:.1e})", lambda: poly_exp(shifted)),
        ("the same inside value_and_grad (+ a multiply-sum)", lambda: inside(shifted)),
        ("a multiply-sum alone inside value_and_grad", lambda: mx.value_and_grad(lambda z: (z * weights[:, None]).sum())(shifted)),
    ]
    print(f"\n| on ({rows}, {vocab}) float32 logits | ms (median of {repeats}) |\n|---|---|")
    for name, fn in cases:
        print(f"| {name} | {median_ms(fn, repeats):.1f} |")


def part2(model_path: str, rows: int, length: int) -> None:
    model, _ = load(model_path)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 8, "scale": 2.0, "dropout": 0.0})
    body, head = split_head(model)
    vocab = model.args.vocab_size
    tokens = mx.array(np.random.default_rng(1).integers(0, vocab, (rows, length + 1)).astype(np.int32))

    def summed(m, eval_inside: bool) -> mx.array:
        logits = head(body(tokens[:, :-1]))
        if eval_inside:
            mx.eval(logits)
        return token_logps(logits, tokens[:, 1:]).sum()

    print(f"\n| gradient of the summed log-probs of {rows} x {length} tokens, LoRA rank 8 | MLX peak memory (GB) |\n|---|---|")
    for name, inside in (("evaluated once, after the trace", False), ("with an mx.eval of the logits inside the trace", True)):
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(nn.value_and_grad(model, lambda m: summed(m, inside))(model))
        print(f"| {name} | {mx.get_peak_memory() / 1e9:.3f} |")


def part3(rows: int, repeats: int) -> None:
    rng = np.random.default_rng(2)
    gate, x, d = (mx.array(rng.normal(size=(rows, 1536)).astype(np.float32) * 3) for _ in range(3))
    mx.eval(gate, x, d)
    cases = [(name, f, mx.grad(lambda g, u, f=f: (f(g, u) * d).sum(), argnums=(0, 1)))
             for name, f in (("MLX ops", mlx_swiglu), ("fastops.swiglu", fastops.swiglu))]
    print(f"\n| SwiGLU on ({rows}, 1536) float32 | forward ms | forward + gradient ms |\n|---|---|---|")
    for name, f, grad in cases:
        print(f"| {name} | {median_ms(lambda: f(gate, x), repeats):.2f} | {median_ms(lambda: grad(gate, x), repeats):.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=120)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "examples" / "real" / "work" / "smollm2-135m-instruct"))
    args = p.parse_args()
    mx.set_default_device(mx.cpu)
    print(f"fastops: {fastops.extension()[1]}")
    part1(args.rows, args.vocab, args.repeats)
    part3(4 * args.rows, args.repeats)
    part2(args.model, rows=4, length=160)


if __name__ == "__main__":
    main()
