"""float32 GEMM through MLX with each BLAS route mlx_dpo can load (Linux).

    python benchmarks/bench_blas.py [--size 1024] [--repeats 9] [--rounds 3]

Each route runs in its own process (the BLAS must be loaded before MLX is), with
``MLX_DPO_BLAS`` set to ``off`` (MLX's bundled reference BLAS), ``system``,
``wheel`` or ``mkl``. A route that is not available here says why. Every
product is checked against a float64 NumPy product of the same inputs. Prints
the median GFLOP/s of each route and its ratio to the reference BLAS. The
routes take turns over several rounds, so a burst of other load on the machine
falls on all of them; each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import mlx_dpo
import mlx.core as mx
import numpy as np
n, repeats = int(sys.argv[1]), int(sys.argv[2])
status = mlx_dpo._platform.blas.status
if status[0] not in ("loaded", "off"):
    print(json.dumps({"status": status}))
    sys.exit()
rng = np.random.default_rng(0)
a, b = (rng.normal(size=(n, n)).astype(np.float32) for _ in range(2))
x, y = mx.array(a), mx.array(b)
got = np.array(x @ y)
error = float(np.abs(got - a.astype(np.float64) @ b.astype(np.float64)).max())
times = []
for _ in range(repeats):
    t = time.perf_counter()
    mx.eval(x @ y)
    times.append(time.perf_counter() - t)
median = sorted(times)[len(times) // 2]
print(json.dumps({"status": status, "gflops": 2 * n**3 / median / 1e9, "error": error}))
"""

ROUTES = ("off", "system", "wheel", "mkl")


def run_route(route: str, size: int, repeats: int) -> dict:
    env = {**os.environ, "MLX_DPO_BLAS": route}
    out = subprocess.run([sys.executable, "-c", CHILD, str(size), str(repeats)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"status": ["failed", out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"float32 {args.size}x{args.size} GEMM through MLX, median of {args.repeats}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')}, {os.cpu_count()} cores, "
          f"median of {args.rounds} rounds")
    rounds = [{route: run_route(route, args.size, args.repeats) for route in ROUTES} for _ in range(args.rounds)]
    results = {}
    for route in ROUTES:
        runs = [r[route] for r in rounds]
        timed = sorted((r for r in runs if "gflops" in r), key=lambda r: r["gflops"])
        results[route] = timed[len(timed) // 2] if timed else runs[0]
    base = results["off"].get("gflops")
    print("\n| route (MLX_DPO_BLAS) | library | GFLOP/s | vs reference | max error vs float64 |")
    print("|---|---|---|---|---|")
    for route, r in results.items():
        kind, detail = r["status"]
        if "gflops" not in r:
            print(f"| {route} | not available: {detail} | | | |")
            continue
        library = "MLX's bundled reference BLAS" if kind == "off" else detail
        ratio = f"{r['gflops'] / base:.1f}x" if base else ""
        print(f"| {route} | {library} | {r['gflops']:.1f} | {ratio} | {r['error']:.1e} |")


if __name__ == "__main__":
    main()
