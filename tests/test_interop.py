"""Across machines and across tools: mlx.launch data parallelism, mlx-lm adapters and configs."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load

from mlx_dpo.config import load_config
from mlx_dpo.lora import run
from mlx_dpo.toy import preference_records, write_jsonl
from tests.test_config import MLX_LM_STYLE

BIN = Path(sys.executable).parent


def train_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--adapter-path", str(out), "--train", "--iters", "6",
            "--batch-size", "4", "--num-layers", "-1", "--max-seq-length", "128", "--steps-per-report", "3",
            "--val-batches", "2", "--steps-per-eval", "3", *extra]


def test_two_processes_match_one_with_the_same_global_batch(tiny_model_path, tiny_data_path, tmp_path):
    # SGD: with Adam, rounding-level differences of near-zero gradients are normalised to
    # full-size steps, so the comparison would test Adam's eps, not the data parallelism.
    extra = ("--optimizer", "sgd", "--learning-rate", "0.05")
    one = tmp_path / "one"
    run(load_config(train_args(tiny_model_path, tiny_data_path, one, *extra)))
    two = tmp_path / "two"
    cmd = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", "2", "--python", sys.executable, "-m", "mlx_dpo.lora",
           *train_args(tiny_model_path, tiny_data_path, two, *extra)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    a, b = mx.load(str(one / "adapters.safetensors")), mx.load(str(two / "adapters.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(mx.abs(v).max()) for k, v in a.items() if "lora_b" in k) > 1e-3  # it trained
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora", "full"])
def test_adapters_of_every_type_work_in_mlx_lm_generate_and_fuse(tiny_model_path, tiny_data_path, tmp_path, fine_tune_type):
    ad = tmp_path / "ad"
    run(load_config(train_args(tiny_model_path, tiny_data_path, ad, "--fine-tune-type", fine_tune_type, "--learning-rate", "1e-3")))
    gen = subprocess.run([str(BIN / "mlx_lm.generate"), "--model", str(tiny_model_path), "--adapter-path", str(ad),
                          "--prompt", "Write a review of the film.", "--max-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert "Generation:" in gen.stdout
    fused = tmp_path / "fused"
    fuse = subprocess.run([str(BIN / "mlx_lm.fuse"), "--model", str(tiny_model_path), "--adapter-path", str(ad),
                           "--save-path", str(fused)], capture_output=True, text=True, timeout=300)
    assert fuse.returncode == 0, fuse.stderr
    tokens = mx.array([[1, 40, 41, 42, 43, 44, 45]])
    with_adapter, _ = load(str(tiny_model_path), adapter_path=str(ad))
    base, _ = load(str(tiny_model_path))
    merged, _ = load(str(fused))
    np.testing.assert_allclose(np.array(merged(tokens)), np.array(with_adapter(tokens)), atol=1e-4, rtol=1e-4)
    assert not np.allclose(np.array(base(tokens)), np.array(with_adapter(tokens)), atol=1e-4)


def test_an_mlx_lm_lora_config_runs_unchanged_with_sft(tiny_model_path, tmp_path):
    data = tmp_path / "data"
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_records(24, 4)]
    for split in ("train", "valid", "test"):
        write_jsonl(data / f"{split}.jsonl", rows)
    text = MLX_LM_STYLE.replace("model: some/model", f"model: {tiny_model_path}").replace("data: data_dir", f"data: {data}")
    text = text.replace("iters: 100", "iters: 4").replace("num_layers: 8", "num_layers: 2")
    text = text.replace("adapter_path: adapters", f"adapter_path: {tmp_path / 'ad'}").replace("test: false", "test: true")
    (tmp_path / "lora_config.yaml").write_text(text + "loss_type: sft\n")
    out = subprocess.run([sys.executable, "-m", "mlx_dpo.lora", "--config", str(tmp_path / "lora_config.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Test: loss" in out.stdout and "ppl" in out.stdout
    model, _ = load(str(tiny_model_path), adapter_path=str(tmp_path / "ad"))  # and mlx-lm loads its adapters
