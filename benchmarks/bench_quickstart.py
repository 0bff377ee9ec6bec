"""The README's first command, timed with each BLAS route: wall time and test loss of the quickstart.

    python benchmarks/bench_quickstart.py [--routes wheel,system,mkl,off] [--coretype Haswell]

Each route runs ``python -m mlx_dpo.lora --config examples/quickstart.yaml`` in its own process
with ``MLX_DPO_BLAS`` set to it (adapters in a temporary folder), one after the other. The wall
time is the whole command, interpreter start and model load included, as a user waits for it.
``--coretype`` sets ``OPENBLAS_CORETYPE`` for the runs (an OpenBLAS built for every CPU then uses
that CPU's kernels: ``Haswell`` or ``Zen`` are the AVX2 ones), to stand in for an AVX2-only machine.
A route that is not available here says why.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_route(route: str, coretype: str | None) -> dict:
    env = {**os.environ, "MLX_DPO_BLAS": route}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    probe = "import mlx_dpo; s = mlx_dpo._platform.blas.status; print(s[0]); print(s[1])"
    status, detail = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.splitlines()[:2]
    if status not in ("loaded", "off"):  # nothing to time: it would run on the reference BLAS
        return {"route": route, "error": detail}
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "mlx_dpo.lora", "--config", "examples/quickstart.yaml", "--adapter-path", out]
        tic = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - tic
    first = done.stdout.splitlines()[0] if done.stdout else ""
    loss = re.search(r"Test: loss ([0-9.e-]+)", done.stdout)
    if done.returncode or not loss:
        return {"route": route, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    loaded = re.search(r"Fast BLAS[^:]*: (.*)$", first)
    return {"route": route, "library": loaded.group(1) if loaded else first, "seconds": seconds, "loss": float(loss.group(1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--routes", default="wheel,system,mkl,off")
    p.add_argument("--coretype", default=None, help="OPENBLAS_CORETYPE for the runs (e.g. Haswell: AVX2 kernels)")
    args = p.parse_args()
    rows = [run_route(r, args.coretype) for r in args.routes.split(",")]
    print(f"quickstart wall time per BLAS route; OPENBLAS_CORETYPE={args.coretype or '(unset)'}, {os.cpu_count()} cores")
    print("\n| route (MLX_DPO_BLAS) | library | wall time | test loss |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['route']} | not available: {r['error']} | | |")
        else:
            print(f"| {r['route']} | {r['library']} | {r['seconds']:.1f} s | {r['loss']:.5f} |")


if __name__ == "__main__":
    main()
