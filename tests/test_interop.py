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


def test_sft_trains_with_the_losses_of_mlx_lms_own_trainer_step_by_step(tiny_model_path, tmp_path):
    """An mlx-lm config with ``loss_type: sft`` against mlx-lm's own ``train()`` (its batching, Adam,
    compiled step and reports; one batch holds the whole split, so both see the same rows each
    step; full fine-tuning of the last layer, so no random adapter initialisation differs).
    mlx-lm 0.32's ``default_loss`` also counts the target after each sequence's last token (the
    padding after EOS); ours does not, so mlx-lm's loss runs with that one target left out."""
    import types

    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import lora as mlx_lm_lora
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.trainer import TrainingArgs, default_loss, iterate_batches, train

    from tests.support import Recorder

    texts = [f"Review {i}: " + " ".join(r["chosen"] for r in preference_records(2, seed=i)) for i in range(8)]
    for split in ("train", "valid", "test"):
        write_jsonl(tmp_path / "data" / f"{split}.jsonl", [{"text": t} for t in texts])
    keys = {"model": str(tiny_model_path), "data": str(tmp_path / "data"), "train": True, "fine_tune_type": "full",
            "batch_size": 8, "iters": 6, "learning_rate": 1e-3, "steps_per_report": 1, "steps_per_eval": 1000,
            "val_batches": 1, "num_layers": 1, "max_seq_length": 128, "seed": 3, "optimizer": "adam"}

    def without_the_target_past_the_end(model, batch, lengths):
        steps = mx.arange(1, batch.shape[1])
        mask = (steps >= lengths[:, 0:1]) & (steps < lengths[:, 1:])
        ce, ntoks = nn.losses.cross_entropy(model(batch[:, :-1]), batch[:, 1:]) * mask, mask.sum()
        return ce.astype(mx.float32).sum() / ntoks, ntoks  # one sum: MLX 0.32 fails on two in a compiled step

    args = types.SimpleNamespace(**{**mlx_lm_lora.CONFIG_DEFAULTS, **keys})
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = (CacheDataset(s) for s in mlx_lm_lora.load_dataset(args, tokenizer))
    batch, lengths = next(iterate_batches(train_set, 8, 128))
    assert abs(default_loss(model, batch, lengths)[0].item() - without_the_target_past_the_end(model, batch, lengths)[0].item()) > 1e-3
    model.freeze()  # as mlx-lm's train_model for fine_tune_type: full
    model.layers[-1].unfreeze()
    theirs = Recorder()
    targs = TrainingArgs(batch_size=8, iters=6, val_batches=1, steps_per_report=1, steps_per_eval=1000, steps_per_save=1000,
                         adapter_file=str(tmp_path / "mlx_lm.safetensors"), max_seq_length=128)
    train(model, optim.Adam(learning_rate=args.learning_rate), train_set, valid_set, args=targs,
          loss=without_the_target_past_the_end, training_callback=theirs)

    ours = Recorder()
    run(load_config([], overrides={**keys, "loss_type": "sft", "adapter_path": str(tmp_path / "ours")}), ours)
    a, b = [r["train_loss"] for r in theirs.train], [r["train_loss"] for r in ours.train]
    assert len(a) == len(b) == 6 and a[-1] < a[0] - 0.05  # it trained
    np.testing.assert_allclose(b, a, rtol=2e-4)
