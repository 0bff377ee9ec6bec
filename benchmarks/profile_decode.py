"""Where a rollout decode step goes, against the time to read the weights once.

    python benchmarks/profile_decode.py [--model DIR] [--batch 8] [--context 40] [--steps 20]

One decode step of ``online.rollout``: a ``(B, 1)`` forward pass over a batch cache, then the
sampler. The model defaults to SmolLM2-135M-Instruct in float32 (as ``examples/real/run.py``
converts it) with LoRA rank 8 on every linear layer, as GRPO samples it. Measured, each the median
of ``--steps`` steps after a warm-up, one process, this machine:

- the memory-bandwidth bound: one streaming read of every weight (NumPy sums over the arrays'
  own memory, on 1 thread and on all cores: the faster);
- the whole decode step (forward + sampling, evaluated), with the BLAS at 1 thread and at the
  run's budget (all cores): GRPO's default CPU plan trains with 2 streams of 1 thread each, and
  sampling inherited that;
- the same without LoRA layers (what a fused model decodes);
- the step as ``fast_decode`` runs it: the linear layers and the tied head through
  ``compute/decode_kernel.c`` on weights packed once per rollout (adapters merged), for this
  model the rest of the step too (``compute/host_decode.py``), sampling on the host
  (``rollout.host_sample``); its parts each timed alone on the same data (the decoder layers'
  one C call, their packed matmuls by themselves, the head, sampling); and the time to pack;
- parts of the step, each run alone on the same shapes: the linear layers' matmuls (GEMV-like,
  B rows), the LoRA side paths, attention over the cache, norms and element-wise ops, the
  vocabulary head, sampling, and the cache update.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx_dpo  # noqa: E402,F401  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

from mlx_dpo.compute import decode  # noqa: E402
from mlx_dpo.compute.kernel import Slots  # noqa: E402
from mlx_dpo.compute.streams import blas_budget, blas_threads  # noqa: E402
from mlx_dpo.online.rollout import SamplingParams, _prefill, make_sampler  # noqa: E402


def median_ms(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def weight_read_ms(model: nn.Module, steps: int, threads: int) -> tuple[float, float]:
    """(ms to read every parameter once, MB read): NumPy sums over the weights' own memory (no
    copy), the arrays shared out over ``threads`` threads (NumPy lets go of the GIL while it sums)."""
    views = [np.asarray(memoryview(p)) for _, p in tree_flatten(model.parameters())]
    mb = sum(v.nbytes for v in views) / 1e6
    shares = [views[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        return median_ms(lambda: list(pool.map(lambda share: [v.sum() for v in share], shares)), steps), mb


def decode_step(model, cache, batch: int, sampler):
    """A function running one decode step (forward + sampling, evaluated); the cache grows a token each call."""
    tokens = mx.array([[5]] * batch)

    def run():
        mx.eval(sampler(model(tokens, cache=cache)[:, -1, :]))

    return run


def parts(model, batch: int, context: int, steps: int) -> list[tuple[str, float]]:
    """Each kind of op of one decode step, timed alone on the step's shapes."""
    args = model.args
    h, heads, kv = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
    d = h // heads
    x = mx.random.normal((batch, 1, h))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    loras = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_a")]
    inputs = {n: mx.random.normal((batch, 1, m.weight.shape[1])) for n, m in linears}
    out = [("linear layers' matmuls (base weights)", median_ms(lambda: mx.eval([m(inputs[n]) for n, m in linears]), steps))]
    if loras:
        xs = {n: mx.random.normal((batch, 1, m.lora_a.shape[0])) for n, m in loras}
        out.append(("LoRA side paths (x A B scale)", median_ms(lambda: mx.eval([(xs[n] @ m.lora_a) @ m.lora_b * m.scale for n, m in loras]), steps)))
    q = mx.random.normal((batch, heads, 1, d))
    k = mx.random.normal((batch, kv, context, d))
    layers = len(model.layers)
    out.append(("attention over the cache (all layers)", median_ms(
        lambda: mx.eval([mx.fast.scaled_dot_product_attention(q, k, k, scale=d**-0.5) for _ in range(layers)]), steps)))
    w = mx.ones((h,))
    out.append(("norms, rotary, residuals, SiLU (all layers)", median_ms(lambda: mx.eval([
        mx.fast.rms_norm(x, w, 1e-5) + nn.silu(x) * x + mx.fast.rope(x.reshape(batch, 1, heads, d).transpose(0, 2, 1, 3), d, traditional=False, base=1e4, scale=1.0, offset=context).transpose(0, 2, 1, 3).reshape(batch, 1, h)
        for _ in range(2 * layers)]), steps)))
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear
    logits = head(x)[:, -1, :]
    out.append(("vocabulary head", median_ms(lambda: mx.eval(head(x)), steps)))
    sampler = make_sampler(SamplingParams(temperature=1.0))
    out.append(("sampling (temperature 1)", median_ms(lambda: mx.eval(sampler(logits)), steps)))
    kk = mx.random.normal((batch, kv, 1, d))
    out.append(("cache update (concatenate, all layers)", median_ms(
        lambda: mx.eval([mx.concatenate([k, kk], axis=2) for _ in range(2 * layers)]), steps)))
    return out


def kernel_rows(model, prompts, batch: int, steps: int, threads: int, read_ms: float) -> list[tuple]:
    """The decode step as ``fast_decode`` runs it (packed kernel, host sampling), its parts each
    timed alone on the same data (the decoder layers' one C call, the packed matmuls by
    themselves, the head, sampling), and packing."""
    sampler = make_sampler(SamplingParams(temperature=1.0, fast_decode=True))
    kernel = decode.load_kernel()[0]
    if kernel is None:
        return [("decode step, fast_decode kernel", float("nan"), decode.load_kernel()[1])]

    def pack(keep: dict) -> None:
        with decode.decode_weights(model, True, threads, keep):
            pass

    def bound(ms: float) -> str:
        return f"{ms / read_ms:.1f}x the bound"

    keep: dict = {}
    with blas_threads(threads):
        pack_first, pack_ms = median_ms(lambda: pack({}), 3), median_ms(lambda: pack(keep), 3)
        with decode.decode_weights(model, True, threads, keep) as decoding:
            with decoding(_prefill(model, prompts), 2 * steps + 4) as step:
                ids = mx.array([5] * batch)
                ms = median_ms(lambda: mx.eval(sampler(step(ids))), steps)
                if not isinstance(step, decode.HostStep):
                    return [(f"decode step, fast_decode kernel (linear layers only), {threads} thread(s)", ms, bound(ms))]
                hm, cache = step.hm, step.cache
                slots = [Slots(k, v, cache.length, cache.start, cache.position, cache.cos, cache.sin, hm.stack.dims.traditional)
                         for k, v in zip(cache.keys, cache.values)]
                x = hm.embed[np.full(batch, 5)]
                layers_ms = median_ms(lambda: kernel.decode_layers(hm.stack, x, slots), steps)
                weights = [w for ws in hm.stack.weights for w in ws]
                inputs = [np.ones((batch, w.matrix.shape[1]), np.float32) for w in weights]
                matmuls_ms = median_ms(lambda: [kernel.matmul(i, w.matrix, w.n_out, threads) for i, w in zip(inputs, weights)], steps)
                head_ms = median_ms(lambda: kernel.apply(hm.head, x, threads), steps)
                logits = mx.array(kernel.apply(hm.head, x, threads))
                sample_ms = median_ms(lambda: mx.eval(sampler(logits)), steps)
    rest = ms - layers_ms - head_ms - sample_ms
    return [(f"decode step, fast_decode kernel (whole step on the host), {threads} thread(s)", ms, bound(ms)),
            ("  the decoder layers (one C call)", layers_ms, bound(layers_ms)),
            ("    their packed matmuls alone", matmuls_ms, bound(matmuls_ms)),
            ("    the rest of the layers (norms, rotary, attention, SwiGLU): the difference", layers_ms - matmuls_ms, ""),
            ("  the vocabulary head (packed)", head_ms, ""),
            ("  sampling on the host", sample_ms, ""),
            ("  the rest (embedding, final norm, copies, Python): the difference", rest, ""),
            ("packing the weights (first rollout, fresh memory)", pack_first, ""),
            ("packing the weights (later rollouts, memory kept)", pack_ms, "")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "examples" / "real" / "work" / "smollm2-135m-instruct"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=40, help="Tokens already in the cache.")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    model, _ = load(args.model)
    model.set_dtype(mx.float32)
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, -1, {"rank": 8, "scale": 2.0, "dropout": 0.0})
    model.eval()
    budget = blas_budget(1)
    read_ms, mb = min(weight_read_ms(model, args.steps, t) for t in sorted({1, budget}))
    prompts = [[1 + (i * 7 + j) % 1000 for j in range(args.context + 1)] for i in range(args.batch)]
    sampler = make_sampler(SamplingParams(temperature=1.0))
    rows = [("read every weight once (bandwidth bound)", read_ms, f"{mb:.0f} MB: {mb / read_ms:.1f} GB/s")]
    for threads in sorted({1, budget}):
        with blas_threads(threads):
            ms = median_ms(decode_step(model, _prefill(model, prompts), args.batch, sampler), args.steps)
        rows.append((f"decode step, LoRA, BLAS {threads} thread(s)", ms, f"{ms / read_ms:.1f}x the bound"))
    merged, _ = load(args.model)
    merged.set_dtype(mx.float32)
    for threads in sorted({1, budget}):
        with blas_threads(threads):
            ms = median_ms(decode_step(merged, _prefill(merged, prompts), args.batch, sampler), args.steps)
        rows.append((f"decode step, no LoRA (merged), BLAS {threads} thread(s)", ms, f"{ms / read_ms:.1f}x the bound"))
    rows += kernel_rows(model, prompts, args.batch, args.steps, budget, read_ms)
    with blas_threads(budget):
        rows += [(name, ms, "") for name, ms in parts(model, args.batch, args.context, args.steps)]
    print(f"\n| batch {args.batch}, {args.context} cached tokens | ms | note |\n|---|---|---|")
    for name, ms, note in rows:
        print(f"| {name} | {ms:.1f} | {note} |")


if __name__ == "__main__":
    main()
