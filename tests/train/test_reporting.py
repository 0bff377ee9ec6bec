"""Progress output and the metrics log."""

import io
import json
import re
from contextlib import redirect_stdout

import pytest

from mlx_dpo._platform.progress import Progress
from mlx_dpo.config import load_config
from mlx_dpo.lora import run
from mlx_dpo.train.metrics_log import read_metrics
from tests.support import cli_args


def test_plain_progress_lines_when_not_a_terminal():
    out = io.StringIO()
    with redirect_stdout(out):
        with Progress(10, "Training", tty=False, interval=0.0) as bar:
            for _ in range(10):
                bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # one per update (interval 0) and a final one
    assert re.fullmatch(r"Training: 10/10 it \(100%\), [\d.]+ it/s, \d+s elapsed, 0s left", lines[-1])
    assert "\r" not in out.getvalue()


def test_progress_is_silent_when_disabled_and_throttled_by_interval():
    out = io.StringIO()
    with redirect_stdout(out):
        with Progress(100, "x", tty=False, enabled=False) as bar:
            bar.update(100)
            bar.write("hidden")
        with Progress(100, "y", tty=False, interval=3600) as bar:
            bar.update(50)
    assert out.getvalue().splitlines() == [ln for ln in out.getvalue().splitlines() if ln.startswith("y: 50/100")]


def test_metrics_log_has_trl_names_and_a_resume_rewrites_the_tail(tiny_model_path, tiny_data_path, tmp_path):
    ad = tmp_path / "ad"
    base = cli_args(tiny_model_path, tiny_data_path, ad, "--steps-per-report", "2", "--steps-per-eval", "4", "--save-every", "4")
    run(load_config(base[:base.index("--iters")] + ["--iters", "10"] + base[base.index("--iters") + 2:]))
    records = read_metrics(ad)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10]
    assert [r["step"] for r in evals] == [0, 3, 7, 9]  # evaluated before steps 1, 4, 8, 10 (as mlx-lm)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "learning_rate"):
        assert all(key in r for r in train), key
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"):
        assert all(key in r for r in evals), key
    assert evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    # Resume from step 8: records after step 8 are rewritten, not duplicated.
    run(load_config(base[:base.index("--iters")] + ["--iters", "12"] + base[base.index("--iters") + 2:]
                    + ["--resume-adapter-file", str(ad / "0000008_adapters.safetensors")]))
    steps = [(r["split"], r["step"]) for r in read_metrics(ad)]
    assert steps.count(("train", 10)) == 1 and ("train", 12) in steps
    assert all(json.dumps(r) for r in read_metrics(ad))
