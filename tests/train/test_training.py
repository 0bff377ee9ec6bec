"""End-to-end: references, the DPO objective on a real (tiny) model, the CLI, mlx-lm interop."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlx_dpo.compute.batching import iterate_batches
from mlx_dpo.compute.reference import adapters_disabled, make_reference
from mlx_dpo.config import load_config
from mlx_dpo.data import load_datasets
from mlx_dpo.lora import run
from tests.support import Recorder, cli_args, make_loss

LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}


def first_batch(model_path, data_path, batch_size=4):
    _, tok = load(str(model_path))
    sets = load_datasets(str(data_path), tok, "pairs", 128, splits=("train",))
    return next(iterate_batches(sets["train"], batch_size, pad_id=tok.eos_token_id, shuffle=False)), sets["train"]


def randomise_adapters(model, seed=0):
    """Give lora_b (and DoRA's m) non-zero values so the policy differs from the base."""
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if "lora_b" in m:
            m.lora_b = mx.array(rng.normal(size=m.lora_b.shape).astype(np.float32) * 0.05)
        if "m" in m and isinstance(m["m"], mx.array):
            m.m = m.m * mx.array(rng.uniform(0.8, 1.2, size=m.m.shape).astype(np.float32))


@pytest.mark.parametrize("dora", [False, True])
def test_fresh_adapters_give_log2_and_zero_rewards(tiny_model_path, tiny_data_path, dora):
    batch, _ = first_batch(tiny_model_path, tiny_data_path)
    model, _ = load(str(tiny_model_path))
    model.freeze()
    linear_to_lora_layers(model, -1, LORA, use_dora=dora)
    loss_fn = make_loss("dpo", make_reference(model), beta=0.1)
    loss, m = loss_fn(model, batch)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert m["rewards/chosen"].item() == 0.0 and m["rewards/rejected"].item() == 0.0
    assert m["rewards/margins"].item() == 0.0


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_bypass_reference_reproduces_base_model_exactly(tiny_model_path, tiny_data_path, dora, compiled):
    batch, _ = first_batch(tiny_model_path, tiny_data_path)
    base, _ = load(str(tiny_model_path))
    base_logits = base(batch["tokens"])
    model, _ = load(str(tiny_model_path))
    model.freeze()
    linear_to_lora_layers(model, -1, LORA, use_dora=dora)
    randomise_adapters(model)
    assert not np.allclose(np.array(model(batch["tokens"])), np.array(base_logits), atol=1e-3)

    def ref_logits(tokens):
        with adapters_disabled(model):
            return model(tokens)

    fn = mx.compile(ref_logits) if compiled else ref_logits
    np.testing.assert_array_equal(np.array(fn(batch["tokens"])), np.array(base_logits))
    # The adapters are back afterwards.
    assert not np.allclose(np.array(model(batch["tokens"])), np.array(base_logits), atol=1e-3)


def np_logps(logits, tokens, mask):
    logits = logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    return ((picked - lse) * mask).sum(-1)


def test_separate_reference_model_loss_matches_numpy(tiny_model_path, other_model_path, tiny_data_path):
    batch, _ = first_batch(tiny_model_path, tiny_data_path)
    policy, _ = load(str(tiny_model_path))
    policy.freeze()
    linear_to_lora_layers(policy, -1, LORA)
    randomise_adapters(policy)
    ref, _ = load(str(other_model_path))
    beta, eps = 0.2, 0.1
    loss, m = make_loss("dpo", make_reference(policy, ref), beta=beta, label_smoothing=eps)(policy, batch)

    tokens, mask = np.array(batch["tokens"]), np.array(batch["mask"])
    pol = np_logps(np.array(policy(batch["tokens"][:, :-1])), tokens, mask)
    rf = np_logps(np.array(ref(batch["tokens"][:, :-1])), tokens, mask)
    b = len(pol) // 2
    h = beta * ((pol[:b] - rf[:b]) - (pol[b:] - rf[b:]))
    want = np.mean(-(1 - eps) * -np.logaddexp(0, -h) - eps * -np.logaddexp(0, h))
    assert abs(want - math.log(2)) > 1e-2  # the two models really differ
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)
    np.testing.assert_allclose(m["rewards/chosen"].item(), np.mean(beta * (pol[:b] - rf[:b])), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora", "full"])
def test_short_dpo_run_learns_and_writes_mlx_lm_adapters(tiny_model_path, tiny_data_path, tmp_path, fine_tune_type):
    rec = Recorder()
    lr = "1e-3" if fine_tune_type == "full" else "3e-3"
    args = load_config(cli_args(tiny_model_path, tiny_data_path, tmp_path / "ad", "--fine-tune-type", fine_tune_type, "--learning-rate", lr, "--test"))
    metrics = run(args, training_callback=rec)

    first, last = rec.train[0], rec.train[-1]
    assert last["train_loss"] < first["train_loss"] - 0.05
    assert last["rewards/accuracies"] > first["rewards/accuracies"]
    assert rec.val[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy == reference
    if fine_tune_type == "full":  # a separate reference model computes as the policy does (loading.cast), to the bit
        assert rec.val[0]["val_rewards/chosen"] == 0.0 and rec.val[0]["val_rewards/rejected"] == 0.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "learning_rate", "tokens_per_second", "peak_memory"):
        assert key in last

    saved = json.loads((tmp_path / "ad" / "test_metrics.json").read_text())
    assert saved["num_pairs"] == 16 and saved["loss"] == pytest.approx(metrics["loss"])
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in saved

    # mlx-lm loads the adapters, and they change the model.
    tokens = mx.array([[1, 50, 60, 70, 80, 90]])
    with_adapter, _ = load(str(tiny_model_path), adapter_path=str(tmp_path / "ad"))
    base, _ = load(str(tiny_model_path))
    assert not np.allclose(np.array(with_adapter(tokens)), np.array(base(tokens)), atol=1e-4)

    # A fused model (ours and mlx-lm's fuse) gives the logits of model + adapter.
    from mlx_lm.fuse import main as mlx_lm_fuse_main

    from mlx_dpo.fuse import main as fuse_main

    fuse_main(["--model", str(tiny_model_path), "--adapter-path", str(tmp_path / "ad"), "--save-path", str(tmp_path / "fused")])
    fused, _ = load(str(tmp_path / "fused"))
    np.testing.assert_allclose(np.array(fused(tokens)), np.array(with_adapter(tokens)), atol=1e-4, rtol=1e-4)
    import sys

    argv = sys.argv
    sys.argv = ["mlx_lm.fuse", "--model", str(tiny_model_path), "--adapter-path", str(tmp_path / "ad"), "--save-path", str(tmp_path / "fused2")]
    try:
        mlx_lm_fuse_main()
    finally:
        sys.argv = argv
    fused2, _ = load(str(tmp_path / "fused2"))
    np.testing.assert_allclose(np.array(fused2(tokens)), np.array(with_adapter(tokens)), atol=1e-4, rtol=1e-4)


def test_adapters_reloaded_through_mlx_lm_give_the_trained_models_metrics(tiny_model_path, tiny_data_path, tmp_path):
    ad = tmp_path / "ad"
    # The first run evaluates the in-memory trained model; the second loads the
    # saved adapters with mlx-lm's load_adapters: same weights, same log-probs.
    trained = run(load_config(cli_args(tiny_model_path, tiny_data_path, ad, "--iters", "10", "--test")))
    retested = run(load_config(["--model", str(tiny_model_path), "--data", str(tiny_data_path), "--adapter-path", str(ad), "--test", "--max-seq-length", "128", "--batch-size", "4"]))
    for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert retested[k] == pytest.approx(trained[k], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("layout", ["text", "completions", "chat"])
def test_sft_runs_compiled_on_every_mlx_lm_format(tiny_model_path, tmp_path, layout):
    from mlx_dpo.toy import preference_records, write_jsonl

    recs = preference_records(24, seed=5)
    rows = {
        "text": [{"text": r["prompt"] + " " + r["chosen"]} for r in recs],
        "completions": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in recs],
        "chat": [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]} for r in recs],
    }[layout]
    for split in ("train", "valid", "test"):
        write_jsonl(tmp_path / "d" / f"{split}.jsonl", rows)
    rec = Recorder()
    metrics = run(load_config(cli_args(tiny_model_path, tmp_path / "d", tmp_path / "ad", "--loss-type", "sft", "--test", "--batch-size", "5")), rec)
    assert rec.val[-1]["val_loss"] < rec.val[0]["val_loss"] - 0.5
    assert metrics["num_examples"] == 24  # the last, partial batch of 4 counts too
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]))


def test_test_alone_reuses_the_trained_objective_and_reference(tiny_model_path, other_model_path, tiny_data_path, tmp_path):
    ad = tmp_path / "ad"
    extra = ("--iters", "5", "--test", "--reference-model", str(other_model_path), "--beta", "0.3", "--label-smoothing", "0.1", "--batch-size", "5")
    trained = run(load_config(cli_args(tiny_model_path, tiny_data_path, ad, *extra)))
    assert trained["num_pairs"] == 16  # 3 full batches of 5 and a last one of 1
    again = run(load_config(["--model", str(tiny_model_path), "--data", str(tiny_data_path), "--adapter-path", str(ad), "--test", "--max-seq-length", "128"]))
    for k in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies"):
        assert again[k] == pytest.approx(trained[k], rel=1e-5, abs=1e-6)


def test_full_fine_tune_adapters_test_alone(tiny_model_path, tiny_data_path, tmp_path):
    ad = tmp_path / "ad"
    trained = run(load_config(cli_args(tiny_model_path, tiny_data_path, ad, "--iters", "4", "--fine-tune-type", "full", "--learning-rate", "1e-3", "--test")))
    again = run(load_config(["--model", str(tiny_model_path), "--data", str(tiny_data_path), "--adapter-path", str(ad), "--test", "--max-seq-length", "128", "--batch-size", "4"]))
    assert again["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    assert abs(again["loss"] - math.log(2)) > 1e-4


def test_base_model_sft_test_with_empty_adapter_path(tiny_model_path, tmp_path):
    from mlx_dpo.toy import preference_records, write_jsonl

    write_jsonl(tmp_path / "d" / "test.jsonl", [{"text": r["prompt"] + " " + r["chosen"]} for r in preference_records(6)])
    metrics = run(load_config(["--model", str(tiny_model_path), "--data", str(tmp_path / "d"), "--adapter-path", "", "--test", "--loss-type", "sft"]))
    assert metrics["num_examples"] == 6 and metrics["loss"] > 1.0  # a random model: high loss
    assert not (tmp_path / "test_metrics.json").exists()
