"""compute/reference.py's adapter swaps: the merged weights against float64 NumPy, and the model
given back as it was."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dpo.compute.reference import adapters_merged
from tests.support import adapted_model


def numpy_merged(m) -> np.ndarray:
    """float64 NumPy: LoRA's W + s (A B)^T; DoRA's that, each output row rescaled to norm m."""
    w = np.array(m.linear.weight, np.float64)
    delta = float(m.scale) * (np.array(m.lora_a, np.float64) @ np.array(m.lora_b, np.float64)).T
    merged = w + delta
    if "m" in m:
        merged *= (np.array(m.m, np.float64) / np.linalg.norm(merged, axis=1))[:, None]
    return merged


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_weights_match_numpy_and_the_adapters_come_back(tiny_model_path, kind):
    model = adapted_model(tiny_model_path, kind)
    model.eval()
    adapters = {n: m for n, m in model.named_modules() if "lora_a" in m}
    expected = {n: numpy_merged(m) for n, m in adapters.items()}
    tokens = mx.array([[1, 5, 9, 33, 7, 2]])
    before = np.array(model(tokens), np.float64)
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    with adapters_merged(model):
        inside = dict(model.named_modules())
        for name, want in expected.items():
            assert type(inside[name]) is nn.Linear
            np.testing.assert_allclose(np.array(inside[name].weight, np.float64), want, rtol=1e-5, atol=1e-6)
        merged = np.array(model(tokens), np.float64)
    # The same function up to float32 rounding, and the very adapter layers afterwards.
    np.testing.assert_allclose(merged, before, atol=1e-4 * np.abs(before).max())
    assert all(dict(model.named_modules())[n] is m for n, m in adapters.items())
    assert [k for k, _ in tree_flatten(model.trainable_parameters())] == trainable


def test_quantized_layers_keep_their_adapters(tiny_model_path):
    model = adapted_model(tiny_model_path)
    quantized = "model.layers.0.self_attn.q_proj"
    layer = dict(model.named_modules())[quantized]
    layer.linear = nn.QuantizedLinear.from_linear(layer.linear, group_size=32, bits=8)
    with adapters_merged(model):
        inside = dict(model.named_modules())
        assert inside[quantized] is layer
        assert type(inside["model.layers.0.self_attn.k_proj"]) is nn.Linear
