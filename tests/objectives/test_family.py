"""The objective family end to end: short runs that learn, reference passes only where needed."""

import math

import numpy as np
import pytest
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlx_dpo.compute.batching import iterate_batches
from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.data import load_datasets
from mlx_dpo.lora import run
from mlx_dpo.toy import preference_records, write_jsonl
from tests.support import Recorder, cli_args, make_loss


@pytest.fixture(scope="module")
def kto_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("kto")
    for split, n, seed in (("train", 48, 0), ("valid", 8, 1), ("test", 8, 2)):
        rows = []
        for i, r in enumerate(preference_records(n, seed)):
            good = i % 2 == 0
            rows.append({"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good})
        write_jsonl(path / f"{split}.jsonl", rows)
    return path


@pytest.mark.parametrize("loss_type, extra", [("orpo", ()), ("simpo", ("--beta", "2.0")), ("ipo", ()), ("cpo", ())])
def test_short_run_lowers_the_loss(tiny_model_path, tiny_data_path, tmp_path, loss_type, extra):
    rec = Recorder()
    run(load_config(cli_args(tiny_model_path, tiny_data_path, tmp_path / "ad", "--loss-type", loss_type, *extra)), rec)
    assert rec.train[-1]["train_loss"] < rec.train[0]["train_loss"] - 0.05
    assert rec.val[-1]["val_loss"] < rec.val[0]["val_loss"]


def test_short_kto_run_lowers_the_loss_and_logs_kl(tiny_model_path, kto_data, tmp_path):
    rec = Recorder()
    metrics = run(load_config(cli_args(tiny_model_path, kto_data, tmp_path / "ad", "--loss-type", "kto", "--test")), rec)
    assert rec.train[-1]["train_loss"] < rec.train[0]["train_loss"]
    assert rec.val[0]["val_loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference: 1 - σ(0)
    assert rec.val[-1]["val_loss"] < rec.val[0]["val_loss"] - 0.01
    assert "kl" in rec.train[-1] and rec.train[-1]["rewards/chosen"] > rec.train[-1]["rewards/rejected"]
    assert metrics["num_examples"] == 8
    assert metrics["count/desirable"] == 4 and metrics["count/undesirable"] == 4


@pytest.mark.parametrize("loss_type", ["simpo", "orpo", "cpo"])
def test_reference_free_objectives_never_run_a_reference(tiny_model_path, tiny_data_path, tmp_path, loss_type):
    # A reference model that cannot be loaded proves none is loaded...
    run(load_config(cli_args(tiny_model_path, tiny_data_path, tmp_path / "ad", "--loss-type", loss_type,
                             "--iters", "2", "--reference-model", str(tmp_path / "missing"))))
    # ...and a reference function that fails proves no reference pass runs.
    model, tok = load(str(tiny_model_path))
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    batch = next(iterate_batches(load_datasets(str(tiny_data_path), tok, "pairs", 128, splits=("train",))["train"], 4))

    def no_reference(batch):
        raise AssertionError("reference pass")

    loss, _ = make_loss(loss_type, no_reference)(model, batch)
    assert math.isfinite(loss.item())


def test_rpo_combination_is_the_weighted_sum(tiny_model_path, tiny_data_path):
    from mlx_dpo.compute.reference import make_reference

    model, tok = load(str(tiny_model_path))
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    batch = next(iterate_batches(load_datasets(str(tiny_data_path), tok, "pairs", 128, splits=("train",))["train"], 4))
    ref = make_reference(model)
    dpo, _ = make_loss("dpo", ref)(model, batch)
    nll, _ = make_loss("sft", ref)(model, {**batch, "mask": batch["mask"][:4], "tokens": batch["tokens"][:4], "lengths": batch["lengths"][:4]})
    combo, m = make_loss(["dpo", "sft"], ref, loss_weights=[1.0, 0.3])(model, batch)
    np.testing.assert_allclose(combo.item(), dpo.item() + 0.3 * nll.item(), rtol=1e-5)
    np.testing.assert_allclose(m["loss/sft"].item(), nll.item(), rtol=1e-5)


def test_confidence_acts_as_per_pair_label_smoothing_and_needs_a_smoothing_loss(tiny_model_path, tmp_path):
    rows = preference_records(24, 3)
    for split in ("train", "valid", "test"):
        write_jsonl(tmp_path / "soft" / f"{split}.jsonl", [dict(r, confidence=0.7) for r in rows])
        write_jsonl(tmp_path / "hard" / f"{split}.jsonl", rows)
    base = ["--iters", "3", "--test", "--val-batches", "0"]
    soft = run(load_config(cli_args(tiny_model_path, tmp_path / "soft", tmp_path / "a", *base)))
    smoothed = run(load_config(cli_args(tiny_model_path, tmp_path / "hard", tmp_path / "b", *base, "--label-smoothing", "0.3")))
    plain = run(load_config(cli_args(tiny_model_path, tmp_path / "hard", tmp_path / "c", *base)))
    assert soft["loss"] == pytest.approx(smoothed["loss"], rel=1e-5)
    assert abs(soft["loss"] - plain["loss"]) > 1e-3
    with pytest.raises(ConfigError, match="confidence"):
        run(load_config(cli_args(tiny_model_path, tmp_path / "soft", tmp_path / "d", "--loss-type", "hinge", *base)))


def test_list_loss_type_from_yaml_and_its_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("loss_type: [dpo, sft]\nloss_weights: [1.0, 0.5]\n")
    args = load_config(["--config", str(p)])
    assert args.loss_type == ["dpo", "sft"] and args.loss_weights == [1.0, 0.5]
    p.write_text("loss_type: [dpo, sft]\nloss_weights: [1.0]\n")
    with pytest.raises(ConfigError, match="loss_weights"):
        load_config(["--config", str(p)])
    p.write_text("loss_type: [kto, sft]\n")
    with pytest.raises(ConfigError, match="kto"):
        load_config(["--config", str(p)])
    p.write_text("loss_type: simpoo\n")
    with pytest.raises(ConfigError, match="loss_type"):
        load_config(["--config", str(p)])
