"""compute/decode.py: the CPU kernel's products against float64 NumPy, the layers it stands in for
given back, and the fallbacks (many rows, no compiler)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from mlx_dpo.compute import decode
from mlx_dpo.compute.decode import MAX_ROWS, PackedEmbedding, PackedLinear, decode_weights, load_kernel
from tests.support import adapted_model


class Net(nn.Module):
    """Odd sizes (29 outputs: not a whole tile; 37 inputs), a bias, LoRA and DoRA, a tied head."""

    def __init__(self):
        super().__init__()
        mx.random.seed(1)
        self.embed_tokens = nn.Embedding(50, 37)
        self.plain = nn.Linear(37, 29, bias=True)
        self.lora = LoRALinear.from_base(nn.Linear(37, 29, bias=True), r=4, scale=3.0)
        self.dora = DoRALinear.from_base(nn.Linear(37, 29, bias=False), r=4, scale=3.0)
        for layer in (self.lora, self.dora):
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
        self.dora.m = self.dora.m * 1.5  # rows rescaled away from the base's own norms


def numpy_layer(layer: nn.Module, x: np.ndarray) -> np.ndarray:
    """float64 NumPy of what the layer computes: x W^T (+ LoRA) (+ bias); DoRA's rows renormalised."""
    base = layer["linear"] if "lora_a" in layer else layer
    w = np.array(base.weight, np.float64)
    if "lora_a" in layer:
        w = w + float(layer.scale) * (np.array(layer.lora_a, np.float64) @ np.array(layer.lora_b, np.float64)).T
    if "m" in layer:
        w = w * (np.array(layer.m, np.float64) / np.linalg.norm(w, axis=1))[:, None]
    y = x @ w.T
    return y + np.array(base.bias, np.float64) if "bias" in base else y


def test_packed_layers_compute_the_layers_in_float64_and_fall_back_past_max_rows(kernel):
    net = Net()
    net.eval()
    originals = dict(net.named_modules())
    rng = np.random.default_rng(0)
    with decode_weights(net, True, 2) as decoding, decoding([], 1):
        inside = dict(net.named_modules())
        assert {n: type(inside[n]) for n in ("plain", "lora", "dora", "embed_tokens")} == {
            "plain": PackedLinear, "lora": PackedLinear, "dora": PackedLinear, "embed_tokens": PackedEmbedding}
        for rows in (1, 3, 8, 13, MAX_ROWS):
            x = rng.normal(size=(rows, 1, 37)).astype(np.float32)
            for name in ("plain", "lora", "dora"):
                got = np.array(inside[name](mx.array(x)), np.float64)
                want = numpy_layer(originals[name], x.astype(np.float64))
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
                own = np.array(originals[name](mx.array(x)), np.float64)  # the formula is the layer's own
                np.testing.assert_allclose(own, want, rtol=1e-4, atol=1e-4, err_msg=name)
            head = np.array(inside["embed_tokens"].as_linear(mx.array(x)), np.float64)
            np.testing.assert_allclose(head, x.astype(np.float64) @ np.array(originals["embed_tokens"].weight, np.float64).T, rtol=1e-5, atol=1e-5)
        ids = mx.array([[3, 7, 49]])
        assert np.array_equal(np.array(inside["embed_tokens"](ids)), np.array(originals["embed_tokens"](ids)))
        many = mx.array(rng.normal(size=(MAX_ROWS + 1, 37)).astype(np.float32))
        assert np.array_equal(np.array(inside["lora"](many)), np.array(originals["lora"](many)))  # the layer itself
    assert all(dict(net.named_modules())[n] is m for n, m in originals.items())


def test_the_thread_count_does_not_change_a_bit(kernel):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(1000, 300)).astype(np.float32)
    x = rng.normal(size=(8, 300)).astype(np.float32)
    packed = np.empty(kernel.packed_shape(w.shape), np.float32)
    kernel.pack(w, None, packed, 2)
    one, two = kernel.matmul(x, packed, 1000, 1), kernel.matmul(x, packed, 1000, 2)
    assert np.array_equal(one, two)
    np.testing.assert_allclose(one, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="rows of 299 values for a weight of 300 inputs"):
        kernel.matmul(np.ascontiguousarray(x[:, :299]), packed, 1000, 1)


def test_a_model_decodes_through_the_kernel_and_gets_its_layers_back(kernel, tiny_model_path):
    model = adapted_model(tiny_model_path)
    model.eval()
    before = {n: m for n, m in model.named_modules()}
    params = [k for k, _ in tree_flatten(model.trainable_parameters())]
    with decode_weights(model, True) as decoding:
        with decoding([], 1):
            kinds = {type(m) for _, m in model.named_modules()}
            assert PackedLinear in kinds and LoRALinear not in kinds
        assert LoRALinear in {type(m) for _, m in model.named_modules()}  # prefill: the model's own layers
    assert all(dict(model.named_modules())[n] is m for n, m in before.items())
    assert [k for k, _ in tree_flatten(model.trainable_parameters())] == params


def test_without_a_compiler_the_adapters_are_merged_in_mlx(tiny_model_path, monkeypatch):
    model = adapted_model(tiny_model_path)
    monkeypatch.setenv("MLX_DPO_CC", "off")
    decode.load_kernel.cache_clear()
    try:
        assert load_kernel()[0] is None and "no C compiler" in load_kernel()[1]
        with decode_weights(model, True) as decoding, decoding([], 1):
            kinds = {type(m) for _, m in model.named_modules()}
            assert nn.Linear in kinds and LoRALinear not in kinds and PackedLinear not in kinds
    finally:
        decode.load_kernel.cache_clear()
    assert LoRALinear in {type(m) for _, m in model.named_modules()}


def test_off_leaves_the_model_alone(tiny_model_path):
    model = adapted_model(tiny_model_path)
    with decode_weights(model, False) as decoding, decoding([], 1):
        assert LoRALinear in {type(m) for _, m in model.named_modules()}
