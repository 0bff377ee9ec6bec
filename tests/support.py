"""What several test modules share: the repository root, a callback that records reports, the
short CLI run most training tests start from, and an offline objective's loss by name."""

from pathlib import Path

from mlx_lm.tuner.callbacks import TrainingCallback

from mlx_dpo.compute.forward import PLAIN
from mlx_dpo.methods import loss_list, method_name
from mlx_dpo.objectives.loss import Objective, kto_loss_fn, pair_loss_fn, sft_loss_fn

ROOT = Path(__file__).resolve().parents[1]


class Recorder(TrainingCallback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_loss_report(self, info):
        self.train.append(info)

    def on_val_loss_report(self, info):
        self.val.append(info)


class NoBosTokenizer:
    """The toy tokenizer, except that its own encoding never adds BOS."""

    def __init__(self, tok):
        self._tok = tok

    def encode(self, text, add_special_tokens=True):
        return self._tok.encode(text, add_special_tokens=False)

    def __getattr__(self, name):
        return getattr(self._tok, name)


class NoTemplateTokenizer(NoBosTokenizer):
    has_chat_template = False
    chat_template = None


def cli_args(tiny_model_path, tiny_data_path, adapter_path, *extra):
    return [
        "--model", str(tiny_model_path), "--data", str(tiny_data_path), "--adapter-path", str(adapter_path),
        "--train", "--iters", "30", "--batch-size", "4", "--learning-rate", "3e-3", "--steps-per-report", "10",
        "--steps-per-eval", "100", "--val-batches", "2", "--num-layers", "-1", "--max-seq-length", "128", *extra,
    ]


def make_loss(loss_type, reference=None, *, how=PLAIN, loss_weights=None, beta=0.1, label_smoothing=0.0,
              loss_terms=(), token_reference=None, sampled=False, **hparams):
    """The loss ``methods.build`` gives an offline ``loss_type`` (the same builders, chosen by the
    same ``methods.method_name``), for tests that call a loss directly."""
    types = tuple(loss_list(loss_type))
    objective = Objective(types, tuple(loss_weights) if loss_weights else None, beta, label_smoothing, hparams)
    name = method_name(types)
    if name in ("sft", "coh"):
        return sft_loss_fn(how, objective.weighted()[0][1])
    if name == "kto":
        return kto_loss_fn(objective, reference, how)
    return pair_loss_fn(objective, reference, how, loss_terms, token_reference, sampled)
