"""``metrics.jsonl``: every report and evaluation, one JSON object a line, under TRL's names.

Training lines carry ``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
``learning_rate`` and the throughput figures; evaluation lines carry the same
with TRL's ``eval_`` prefix (``eval_loss``, ``eval_rewards/accuracies``, ...).
Both have ``step`` and ``split`` (``train`` or ``eval``).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_lm.tuner.callbacks import TrainingCallback

FILE = "metrics.jsonl"


def _clean(info: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}


class MetricsLogger(TrainingCallback):
    """Appends train and eval reports to ``adapter_path/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, adapter_path: str | Path, start_step: int = 0):
        self.path = Path(adapter_path) / FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            self.path.write_text("")
        elif self.path.is_file():  # a resumed run rewrites what came after its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_loss_report(self, train_info: dict) -> None:
        info = _clean(train_info)
        record = {"step": info.pop("iteration"), "split": "train", "loss": info.pop("train_loss"), **info}
        self._append(record)

    def on_val_loss_report(self, val_info: dict) -> None:
        info = _clean(val_info)
        record = {"step": info.pop("iteration"), "split": "eval", "eval_loss": info.pop("val_loss")}
        record["eval_runtime"] = info.pop("val_time")
        for k, v in info.items():
            if k.startswith("val_") and k not in ("val_loss", "val_weight", "val_ntoks", "val_count"):
                record["eval_" + k[4:]] = v
        self._append(record)


def read_metrics(adapter_path: str | Path) -> list[dict]:
    """The records of ``adapter_path/metrics.jsonl`` (or of that file itself)."""
    path = Path(adapter_path)
    path = path / FILE if path.is_dir() else path
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
