"""Wall time and size of each way a tuned model leaves, on one adapter (the README's "Take your model home").

    python benchmarks/bench_export.py --model examples/real/work/smollm2-135m-instruct [--adapter-path A]

Without ``--adapter-path``, a LoRA adapter is trained first (DPO, 4 steps of the demo's pairs),
so that every export has something to carry. Each command runs in its own process, as a user
types it; the times are the whole command (interpreter start and model load included).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> float:
    tic = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return time.perf_counter() - tic


def size(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter-path")
    args = p.parse_args()
    py = [sys.executable, "-m"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        adapter = Path(args.adapter_path) if args.adapter_path else out / "adapter"
        if not args.adapter_path:
            timed(py + ["mlx_dpo.lora", "--model", args.model, "--data", "examples/demo/data", "--train", "--iters", "4",
                        "--batch-size", "2", "--val-batches", "0", "--adapter-path", str(adapter), "--num-layers", "-1"])
        fuse = py + ["mlx_dpo.fuse", "--model", args.model, "--adapter-path", str(adapter)]
        rows = [("PEFT adapter (`--export-peft`)", timed(fuse + ["--export-peft", str(out / "peft")]), size(out / "peft"))]
        rows.append(("fused MLX / transformers folder", timed(fuse + ["--save-path", str(out / "fused")]), size(out / "fused")))
        for kind in ("f16", "q8_0", "q4_0"):
            target = out / f"model-{kind}.gguf"
            seconds = timed(fuse + ["--save-path", str(out / f"fused-{kind}"), "--export-gguf", str(target), "--gguf-type", kind,
                                    "--ollama"])
            rows.append((f"GGUF `{kind}` + Modelfile (fused folder + file)", seconds, size(target)))
    print(f"model: {args.model}\n\n| what | command wall time | size |\n|---|---|---|")
    for what, seconds, mb in rows:
        print(f"| {what} | {seconds:.1f} s | {mb:.1f} MB |")


if __name__ == "__main__":
    main()
