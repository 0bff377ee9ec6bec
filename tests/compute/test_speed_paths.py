"""The speed and memory paths must give the same numbers as the plain ones."""

import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlx_dpo.compute.batching import iterate_batches, length_groups, padding_fraction
from mlx_dpo.compute.logps import get_batched_logps
from mlx_dpo.compute.reference import make_reference
from mlx_dpo.config import load_config
from mlx_dpo.data import load_datasets
from mlx_dpo.loading import resolve_dtype
from mlx_dpo.lora import run
from mlx_dpo.objectives.reference_cache import cached_reference, weights_fingerprint
from tests.support import make_loss

LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}

def test_dtype_auto_is_float32_on_cpu():
    args = types.SimpleNamespace(dtype="auto")
    if mx.default_device() == mx.cpu:
        assert resolve_dtype(args) == mx.float32
    assert resolve_dtype(types.SimpleNamespace(dtype="bfloat16")) == mx.bfloat16


@pytest.fixture(scope="module")
def pairs(tiny_model_path, tiny_data_path):
    _, tok = load(str(tiny_model_path))
    return load_datasets(str(tiny_data_path), tok, "pairs", 128, splits=("train",))["train"]


def lora_model(path, seed=0):
    mx.random.seed(seed)
    model, _ = load(str(path))
    model.freeze()
    linear_to_lora_layers(model, -1, LORA)
    for _, m in model.named_modules():
        if "lora_b" in m:
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    return model


def test_padding_fraction_matches_a_direct_count(pairs):
    frac = padding_fraction(pairs, 4)
    real = padded = 0
    for g in length_groups(pairs, 4):
        lens = [len(pairs[i][k][0]) for k in range(2) for i in g]
        real, padded = real + sum(lens), padded + max(lens) * len(lens)
    assert frac == pytest.approx(1 - real / padded)
    shuffled_frac = padding_fraction(list(reversed(pairs)), 4)
    assert 0 <= frac < 0.5 and shuffled_frac == pytest.approx(frac)
    assert padding_fraction(pairs, 4, pad_multiple=32) > frac


def test_precomputed_reference_equals_on_the_fly_loss_rewards_and_gradients(tiny_model_path, pairs, tmp_path):
    model = lora_model(tiny_model_path)
    reference = make_reference(model)
    fp = weights_fingerprint(model)
    cached = cached_reference(reference, pairs, tmp_path, "train", fp, batch_size=3, show_progress=False)
    on_the_fly = make_loss("dpo", reference, beta=0.2, label_smoothing=0.1)
    precomputed = make_loss("dpo", None, beta=0.2, label_smoothing=0.1)  # must not need a reference
    for plain_batch, ref_batch in zip(iterate_batches(pairs, 4, shuffle=False), iterate_batches(cached, 4, shuffle=False)):
        assert "reference_logps" in ref_batch and "reference_logps" not in plain_batch
        (l1, m1), g1 = nn.value_and_grad(model, on_the_fly)(model, plain_batch)
        (l2, m2), g2 = nn.value_and_grad(model, precomputed)(model, ref_batch)
        assert abs(l1.item() - np.log(2)) > 1e-3  # policy differs from reference
        np.testing.assert_allclose(l2.item(), l1.item(), rtol=1e-5, atol=1e-6)
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            np.testing.assert_allclose(m2[k].item(), m1[k].item(), rtol=1e-4, atol=1e-5)
        for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
            a, b = np.array(a), np.array(b)
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_reference_cache_is_reused_and_keyed_by_weights_and_data(tiny_model_path, other_model_path, pairs, tmp_path):
    model = lora_model(tiny_model_path)
    reference = make_reference(model)
    fp = weights_fingerprint(model)
    first = cached_reference(reference, pairs, tmp_path, "train", fp, 4, show_progress=False)
    files = sorted(tmp_path.glob("train-*.safetensors"))
    assert len(files) == 1

    def must_not_run(tokens, mask):
        raise AssertionError("the cache should have been used")

    again = cached_reference(must_not_run, pairs, tmp_path, "train", fp, 4, show_progress=False)
    np.testing.assert_array_equal(again.fields["reference_logps"], first.fields["reference_logps"])
    # Changing the adapters does not change the reference weights' fingerprint...
    for _, m in model.named_modules():
        if "lora_b" in m:
            m.lora_b = m.lora_b + 1.0
    assert weights_fingerprint(model) == fp
    # ...but other reference weights or other data make a new entry.
    other = lora_model(other_model_path)
    assert weights_fingerprint(other) != fp
    cached_reference(reference, pairs[:-1], tmp_path, "train", fp, 4, show_progress=False)
    assert len(sorted(tmp_path.glob("train-*.safetensors"))) == 2


def test_chunked_and_prompt_skipping_logps_equal_full_logps_and_gradients(tiny_model_path, pairs):
    model = lora_model(tiny_model_path)
    batch = next(iterate_batches(pairs, 4, shuffle=False))

    first = int(np.argmax(np.array(batch["mask"]).any(axis=0)))  # first target any row needs
    assert first > 2

    def total(m, chunk, start=0):
        return get_batched_logps(m, batch["tokens"], batch["mask"], chunk, start)[0].sum()

    v0, g0 = nn.value_and_grad(model, lambda m: total(m, 0))(model)
    for chunk, start in ((5, 0), (16, 0), (0, first), (4, first), (0, first - 2)):
        v, g = nn.value_and_grad(model, lambda m: total(m, chunk, start))(model)
        np.testing.assert_allclose(v.item(), v0.item(), rtol=1e-6)
        for (_, a), (_, b) in zip(tree_flatten(g0), tree_flatten(g)):
            a, b = np.array(a), np.array(b)
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_cli_precompute_reference_trains_like_on_the_fly(tiny_model_path, tiny_data_path, tmp_path):
    common = ["--model", str(tiny_model_path), "--data", str(tiny_data_path), "--train", "--test", "--iters", "8",
              "--batch-size", "4", "--learning-rate", "1e-2", "--optimizer", "sgd", "--num-layers", "-1",
              "--max-seq-length", "128", "--steps-per-eval", "4", "--val-batches", "2"]
    a = run(load_config(common + ["--adapter-path", str(tmp_path / "a")]))
    b = run(load_config(common + ["--adapter-path", str(tmp_path / "b"), "--precompute-reference"]))
    assert len(list((tmp_path / "b" / "reference_cache").glob("*.safetensors"))) == 3  # train, valid, test
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5)
    wa = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    wb = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    for k in wa:
        np.testing.assert_allclose(np.array(wb[k]), np.array(wa[k]), atol=1e-5)
