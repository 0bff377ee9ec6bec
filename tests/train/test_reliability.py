"""Nothing lost: exact resume, signals that save, the non-finite guard, clean errors."""

import os
import re
import signal
import subprocess
import sys
import time

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlx_dpo.compute.batching import pad_batch
from mlx_dpo.compute.reference import make_reference
from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.data import load_datasets
from mlx_dpo.lora import run
from mlx_dpo.train.checkpoint import STATE, load_training_state
from mlx_dpo.train.trainer import NonFiniteError, TrainingArgs, train
from tests.support import make_loss

COMMON = [
    "--train", "--batch-size", "4", "--max-seq-length", "128", "--num-layers", "-1", "--steps-per-report", "2",
    "--val-batches", "0", "--optimizer", "adamw",
]


def write_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "lora_parameters: {rank: 4, scale: 10.0, dropout: 0.1}\n"  # dropout: the RNG must resume too
        "lr_schedule: {name: cosine_decay, warmup: 2, arguments: [3e-3, 14, 1e-4]}\n"
        "grad_accumulation_steps: 2\nsave_every: 4\n"
    )
    return str(cfg)


def weights(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_resume_after_a_stop_ends_with_the_uninterrupted_weights(tiny_model_path, tiny_data_path, tmp_path):
    base = ["--config", write_config(tmp_path), "--model", str(tiny_model_path), "--data", str(tiny_data_path), *COMMON]
    run(load_config(base + ["--iters", "14", "--adapter-path", str(tmp_path / "full")]))
    # Stopped at step 8 (a run told to do 8 steps), then resumed to 14.
    run(load_config(base + ["--iters", "8", "--adapter-path", str(tmp_path / "split")]))
    _, step = load_training_state(tmp_path / "split" / STATE)
    assert step == 8
    run(load_config(base + ["--iters", "14", "--adapter-path", str(tmp_path / "split"), "--resume"]))
    # Or from a numbered checkpoint, with resume_adapter_file.
    run(load_config(base + ["--iters", "14", "--adapter-path", str(tmp_path / "numbered"),
                            "--resume-adapter-file", str(tmp_path / "split" / "0000004_adapters.safetensors")]))

    full = weights(tmp_path / "full" / "adapters.safetensors")
    assert max(np.abs(v).max() for k, v in full.items() if "lora_b" in k) > 1e-3
    for other in ("split", "numbered"):
        resumed = weights(tmp_path / other / "adapters.safetensors")
        for k in full:
            np.testing.assert_allclose(resumed[k], full[k], rtol=1e-5, atol=1e-6)
    # Weights alone, without the training state, do not reproduce the run (so the comparison above can fail).
    (tmp_path / "weights_only").mkdir()
    os.link(tmp_path / "split" / "0000008_adapters.safetensors", tmp_path / "weights_only" / "w.safetensors")
    run(load_config(base + ["--iters", "6", "--adapter-path", str(tmp_path / "fresh"),
                            "--resume-adapter-file", str(tmp_path / "weights_only" / "w.safetensors")]))
    fresh = weights(tmp_path / "fresh" / "adapters.safetensors")
    assert max(np.abs(fresh[k] - full[k]).max() for k in full) > 1e-4


def test_resume_refuses_a_mismatched_pair_and_a_missing_checkpoint(tiny_model_path, tiny_data_path, tmp_path):
    base = ["--config", write_config(tmp_path), "--model", str(tiny_model_path), "--data", str(tiny_data_path), *COMMON]
    with pytest.raises(ConfigError, match="nothing to resume"):
        run(load_config(base + ["--iters", "4", "--adapter-path", str(tmp_path / "a"), "--resume"]))
    run(load_config(base + ["--iters", "8", "--adapter-path", str(tmp_path / "a")]))
    # Simulate a kill between writing the training state and the adapters of step 8.
    os.replace(tmp_path / "a" / "0000004_adapters.safetensors", tmp_path / "a" / "adapters.safetensors")
    with pytest.raises(ConfigError, match="different steps"):
        run(load_config(base + ["--iters", "12", "--adapter-path", str(tmp_path / "a"), "--resume"]))


def start_training(model, data, out, *extra):
    cmd = [sys.executable, "-m", "mlx_dpo.lora", "--model", str(model), "--data", str(data), "--adapter-path", str(out),
           *COMMON, "--iters", "100000", "--steps-per-report", "1", "--save-every", "1000", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("Iter 3:"):
            return proc, lines
    proc.kill()
    raise AssertionError("training did not start:\n" + "".join(lines))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_prints_the_resume_command(tiny_model_path, tiny_data_path, tmp_path, signum, code):
    out = tmp_path / "ad"
    proc, lines = start_training(tiny_model_path, tiny_data_path, out)
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == code, text
    assert "Traceback" not in text
    m = re.search(r"after step (\d+)", text)
    step = int(m.group(1))
    assert step >= 3
    assert "--resume" in text.split("Resume with:")[1]
    _, saved = load_training_state(out / STATE)
    assert saved == step
    model, _ = load(str(tiny_model_path), adapter_path=str(out))  # mlx-lm loads what was saved
    # The printed command resumes from that step (cut short here with --iters).
    resume = text.split("Resume with:")[1].strip().splitlines()[0]
    again = subprocess.run(resume + f" --iters {step + 1}", shell=True, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"Resuming from step {step}" in again.stdout


def indexed_batches(tok, data_path, n=16, size=4):
    """The first ``n`` pairs in fixed batches of ``size``, each carrying its example indices."""
    pairs = load_datasets(str(data_path), tok, "pairs", 128, splits=("train",))["train"][:n]
    batches = []
    for i in range(0, n, size):
        b = pad_batch(pairs[i : i + size])
        b["index"] = mx.array(np.arange(i, i + size, dtype=np.int32))
        batches.append(b)
    return batches


def nan_at(loss_fn, bad_example):
    """A loss that is NaN for batches containing ``bad_example``."""

    def fn(model, batch):
        loss, metrics = loss_fn(model, batch)
        poisoned = (batch["index"] == bad_example).any()
        return mx.where(poisoned, mx.array(float("nan")), loss), metrics

    return fn


@pytest.mark.parametrize("skip", [False, True])
def test_non_finite_loss_stops_keeping_the_last_good_adapters_or_is_skipped(tiny_model_path, tiny_data_path, tmp_path, skip):
    mx.random.seed(0)
    model, tok = load(str(tiny_model_path))
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    batches = indexed_batches(tok, tiny_data_path)

    def replay(*_, **__):
        while True:
            yield from batches

    loss_fn = nan_at(make_loss("dpo", make_reference(model)), bad_example=13)  # in the 4th batch
    adapter = tmp_path / "adapters.safetensors"
    args = TrainingArgs(batch_size=4, iters=6, steps_per_report=1, steps_per_eval=100, val_batches=0, steps_per_save=2,
                        adapter_file=str(adapter), skip_nonfinite=skip)
    if not skip:
        with pytest.raises(NonFiniteError, match=r"step 4, batch of examples \[12, 13, 14, 15\]"):
            train(model, optim.Adam(learning_rate=1e-2), loss_fn, [None], None, replay, args)
        saved = weights(adapter)
        assert all(np.isfinite(v).all() for v in saved.values())
        step2 = weights(tmp_path / "0000002_adapters.safetensors")  # the last checkpoint before the NaN
        for k in saved:
            np.testing.assert_array_equal(saved[k], step2[k])
        assert all(np.isfinite(np.array(v)).all() for _, v in __import__("mlx.utils").utils.tree_flatten(model.trainable_parameters()))
    else:
        skipped = train(model, optim.Adam(learning_rate=1e-2), loss_fn, [None], None, replay, args)
        assert skipped == 1
        final = weights(adapter)
        assert all(np.isfinite(v).all() for v in final.values())
        assert max(np.abs(v).max() for k, v in final.items() if "lora_b" in k) > 1e-4


def test_cli_reports_non_finite_in_one_line(tiny_model_path, tiny_data_path, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mlx_dpo.lora", "--model", str(tiny_model_path), "--data", str(tiny_data_path),
         "--adapter-path", str(tmp_path / "ad"), *COMMON, "--iters", "30", "--learning-rate", "1e30", "--optimizer", "sgd"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 3, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "non-finite loss or gradient at step" in out.stderr


@pytest.mark.parametrize("model", ["/nonexistent/model/folder", "no-such-org/no-such-model"])
def test_missing_model_is_one_line(tiny_data_path, tmp_path, model):
    out = subprocess.run([sys.executable, "-m", "mlx_dpo.lora", "--model", model, "--data", str(tiny_data_path), "--train"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [ln for ln in out.stderr.splitlines() if ln.strip()] == [ln for ln in out.stderr.splitlines() if "cannot load model" in ln]


def test_a_skipped_micro_batch_leaves_the_mean_of_the_others(tiny_model_path, tiny_data_path, tmp_path):
    _, tok = load(str(tiny_model_path))
    batches = indexed_batches(tok, tiny_data_path)

    def trained(order, tag):
        mx.random.seed(0)
        model, _ = load(str(tiny_model_path))
        model.freeze()
        linear_to_lora_layers(model, -1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
        loss_fn = nan_at(make_loss("dpo", make_reference(model)), bad_example=5)
        args = TrainingArgs(batch_size=4, iters=4, steps_per_report=1, steps_per_eval=100, val_batches=0, steps_per_save=100,
                            grad_accumulation_steps=2, adapter_file=str(tmp_path / f"{tag}.safetensors"), skip_nonfinite=True)
        skipped = train(model, optim.SGD(learning_rate=0.05), loss_fn, [None], None, lambda *_, **__: iter(order), args)
        return skipped, weights(tmp_path / f"{tag}.safetensors")

    # Batch 1 (examples 4-7) is NaN: the first update must be batch 0's gradient alone,
    # exactly what accumulating batch 0 twice gives.
    skipped, a = trained([batches[0], batches[1], batches[2], batches[3]], "a")
    _, b = trained([batches[0], batches[0], batches[2], batches[3]], "b")
    assert skipped == 1
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)


STUCK = '''
import time

def forever(completions, **kwargs):
    while True:  # a judge that never answers: the first batch is never made
        time.sleep(0.05)
'''


@pytest.mark.parametrize("signals, code", [((signal.SIGINT, signal.SIGINT), 130), ((signal.SIGTERM,), 143)])
def test_a_process_stuck_before_its_first_step_stops_on_a_second_ctrl_c_or_one_sigterm(tiny_model_path, tmp_path, signals, code):
    from mlx_dpo.toy import write_jsonl

    write_jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": f"Write a review of item {i}."} for i in range(4)])
    (tmp_path / "judge.py").write_text(STUCK)
    (tmp_path / "run.yaml").write_text("online: true\nreward_funcs: [judge.forever]\nmax_completion_length: 4\n")
    cmd = [sys.executable, "-m", "mlx_dpo.lora", "--config", str(tmp_path / "run.yaml"), "--model", str(tiny_model_path),
           "--data", str(tmp_path / "data"), "--adapter-path", str(tmp_path / "ad"), "--train", "--iters", "4",
           "--batch-size", "2", "--num-layers", "-1", "--val-batches", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while not proc.stdout.readline().startswith("Training ("):  # the loop has started; the judge now spins
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(1.0)
        for k, signum in enumerate(signals):
            proc.send_signal(signum)
            if k < len(signals) - 1:
                time.sleep(1.5)
                assert proc.poll() is None  # the first Ctrl-C waits for a step boundary
        start = time.time()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code and time.time() - start < 10
    assert len(err.strip().splitlines()) == 1 and "stopped" in err and "Traceback" not in err
