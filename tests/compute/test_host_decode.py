"""compute/host_decode.py and the kernel's norm, SwiGLU and attention (compute/kernel.py): each
against float64 NumPy, and the whole host decode step against the model's own forward pass over
mlx-lm's batch cache, step by step, with rows dropped on the way."""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.rope_utils import Llama3RoPE
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_dpo.compute import decode, host_decode
from mlx_dpo.compute.decode import HostStep, ModelStep, PackedLinear, decode_weights, whole_step_on_host
from mlx_dpo.compute.kernel import Slots
from mlx_dpo.online.rollout import _prefill
from tests.support import tiny_architecture


def adapted(family: str, dora: bool = False, overrides: dict | None = None):
    model = tiny_architecture(family, overrides=overrides)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 10.0, "dropout": 0.0}, use_dora=dora)
    for _, layer in model.named_modules():
        if "lora_b" in layer:
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    model.eval()
    return model


def rotate64(x, cos, sin, traditional):
    """x (..., dim) rotated pairwise, float64; cos/sin broadcast to (..., dim / 2)."""
    a, b = (x[..., 0::2], x[..., 1::2]) if traditional else np.split(x, 2, axis=-1)
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return np.stack([ra, rb], axis=-1).reshape(x.shape) if traditional else np.concatenate([ra, rb], axis=-1)


def test_rms_norm_and_silu_mul_are_float64_numpy(kernel):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(5, 3, 37)).astype(np.float32), rng.normal(size=37).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(kernel.rms_norm(x, w, 1e-5), want, rtol=2e-6, atol=2e-6)
    g, u = (rng.normal(size=(4, 101)) * 30).astype(np.float32), rng.normal(size=(4, 101)).astype(np.float32)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(kernel.silu_mul(g, u), g64 / (1 + np.exp(-g64)) * u, rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="rows of 36 values for a norm of 37"):
        kernel.rms_norm(x[..., :36], w, 1e-5)


@pytest.mark.parametrize("traditional", [False, True])
def test_attention_rotates_fills_the_cache_slot_and_skips_each_rows_padding(kernel, traditional):
    rng = np.random.default_rng(1)
    rows, heads, kv, dim, capacity, slot = 3, 6, 2, 20, 9, 5  # dim 20: a partial vector of 8 in the dot products
    q, k, v = (rng.normal(size=(rows, h, dim)).astype(np.float32) for h in (heads, kv, kv))
    keys, values = (rng.normal(size=(rows, kv, capacity, dim)).astype(np.float32) for _ in range(2))
    before_k, before_v = keys.copy(), values.copy()
    start, position = np.array([0, 2, 5]), np.array([5, 3, 0])  # the last row: nothing before its token
    angles = np.arange(12)[:, None] * 0.3 ** np.arange(dim // 2)[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    out = kernel.attend(q, k, v, Slots(keys, values, slot, start, position, cos, sin, traditional), 0.25, 2)
    c, s = cos[position][:, None].astype(np.float64), sin[position][:, None].astype(np.float64)
    k_rot, q_rot = rotate64(k.astype(np.float64), c, s, traditional), rotate64(q.astype(np.float64), c, s, traditional)
    np.testing.assert_allclose(keys[:, :, slot], k_rot, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(values[:, :, slot], v)
    others = [j for j in range(capacity) if j != slot]
    assert np.array_equal(keys[:, :, others], before_k[:, :, others]) and np.array_equal(values[:, :, others], before_v[:, :, others])
    for r in range(rows):
        for h in range(heads):
            ks, vs = keys[r, h // (heads // kv), start[r] : slot + 1].astype(np.float64), values[r, h // (heads // kv), start[r] : slot + 1]
            scores = ks @ q_rot[r, h] * 0.25
            w = np.exp(scores - scores.max())
            np.testing.assert_allclose(out[r, h * dim : (h + 1) * dim], w @ vs / w.sum(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shapes do not fit"):
        kernel.attend(q, k, v, Slots(keys, values, capacity, start, position, cos, sin, traditional), 0.25, 1)
    with pytest.raises(ValueError, match="shapes do not fit"):
        kernel.attend(q, k[:2], v, Slots(keys, values, slot, start, position, cos, sin, traditional), 0.25, 1)


@pytest.mark.parametrize("rope", [nn.RoPE(16, traditional=False, base=500.0, scale=0.5), nn.RoPE(16, traditional=True, base=1e4),
                                  Llama3RoPE(16, 64, False, 1e4, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                    "original_max_position_embeddings": 16})],
                         ids=["linear-scaled", "traditional", "llama3"])
def test_the_rotation_tables_reproduce_the_models_rope(rope):
    cos, sin = host_decode._rope_tables(rope, 16, bool(rope.traditional), 40)
    if type(rope) is nn.RoPE:  # the formula itself: theta = position * scale * base^(-2i/dim)
        theta = np.arange(40)[:, None] * rope.scale * rope.base ** (-np.arange(0, 16, 2) / 16)
        np.testing.assert_allclose(cos, np.cos(theta), atol=2e-5)
        np.testing.assert_allclose(sin, np.sin(theta), atol=2e-5)
    x = np.random.default_rng(2).normal(size=(40, 16)).astype(np.float32)
    want = np.array(rope(mx.array(x)[None, None]))[0, 0]
    np.testing.assert_allclose(rotate64(x.astype(np.float64), cos, sin, bool(rope.traditional)), want, rtol=1e-5, atol=1e-5)


def host_and_model_steps(model, prompts, steps, drop_after):
    """Logits of the host step and of the model's own step, side by side, greedy on the model's;
    after ``drop_after`` steps the first row is dropped from both caches."""
    with decode_weights(model, True, 2) as decoding:
        own, host_cache = _prefill(model, prompts), _prefill(model, prompts)
        with decoding(host_cache, steps + 1) as host:
            assert isinstance(host, HostStep)
            assert all(c.keys is None and c.values is None for c in host_cache)  # moved, not kept twice
            ids, pairs = mx.array([p[-1] for p in prompts]), []
            for n in range(steps):
                want = model(ids[:, None], cache=own)[:, -1, :]
                got = host(ids)
                pairs.append((np.array(got), np.array(want)))
                ids = mx.argmax(want, axis=-1)
                if n == drop_after:
                    ModelStep(model, own).keep_rows([1, 2])
                    host.keep_rows([1, 2])
                    ids = ids[mx.array([1, 2])]
    return pairs


@pytest.mark.parametrize("family,dora", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False)])
def test_the_host_step_gives_the_adapted_models_logits(kernel, family, dora):
    model = adapted(family, dora)
    assert whole_step_on_host(model)
    prompts = [[3, 17, 42, 99, 5, 250, 7, 33], [8, 9, 61], [4]]  # padded rows; the last has an empty prefill
    pairs = host_and_model_steps(model, prompts, steps=6, drop_after=2)
    for n, (got, want) in enumerate(pairs):
        assert got.shape == want.shape == (3 if n <= 2 else 2, model.args.vocab_size)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=f"{family} step {n}")


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
VARIANTS = {  # config keys of the tiny Llama that change what the host step computes
    "tied head, biases everywhere, 32-wide heads, one kv head": {
        "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True, "head_dim": 32, "num_key_value_heads": 1},
    "traditional rotary pairs": {"rope_traditional": True},
    "llama3-scaled rotary": {"rope_scaling": LLAMA3},
    "linear-scaled rotary": {"rope_scaling": {"type": "linear", "factor": 2.0}},
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_host_step_follows_the_models_variants_over_more_rows_than_a_tile(kernel, overrides):
    model = adapted("llama", overrides=overrides)
    assert whole_step_on_host(model)
    prompts = [[3 + i, 17, 42, 99, 5, 250, 7][: 1 + i % 7] for i in range(11)]  # 11 rows: more than the kernel's 8
    for n, (got, want) in enumerate(host_and_model_steps(model, prompts, steps=4, drop_after=1)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=f"step {n}")


@pytest.mark.parametrize("overrides", [{"rope_scaling": {"type": "dynamic", "factor": 2.0}},
                                       {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4}],
                         ids=["dynamic rotary", "a sliding-window layer"])
def test_llama_variants_the_host_step_does_not_compute_keep_their_own_layers(kernel, overrides):
    assert not whole_step_on_host(adapted("llama", overrides=overrides))


def test_a_prompt_of_one_token_starts_from_an_empty_cache(kernel):
    model = adapted("llama")
    pairs = host_and_model_steps(model, [[7], [9]], steps=3, drop_after=99)
    for got, want in pairs:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("family", ["gemma3_text", "smollm3", "phi3", "olmo3"])
def test_other_models_decode_through_their_own_layers(kernel, family):
    model = adapted(family)
    assert not whole_step_on_host(model)
    with decode_weights(model, True, 1) as decoding, decoding(_prefill(model, [[3, 4, 5]]), 2) as step:
        assert isinstance(step, ModelStep)
        assert PackedLinear in {type(m) for _, m in model.named_modules()}  # the linear layers still on the kernel


def test_a_quantized_layer_keeps_the_whole_step_off_the_host(kernel):
    model = adapted("llama")
    assert whole_step_on_host(model)
    layer = model.model.layers[1].mlp
    layer.down_proj = nn.QuantizedLinear.from_linear(layer.down_proj.linear, group_size=32, bits=4)
    assert not whole_step_on_host(model)


def test_the_layer_stack_and_the_step_refuse_sizes_that_do_not_fit(kernel):
    model = adapted("llama")
    packed = {name: layer.weight_packed for name, layer in decode._packed_layers(model, kernel, 1, {})}
    hm = host_decode.host_model(model, packed, kernel, 1)
    stack, d = hm.stack, hm.stack.dims
    with pytest.raises(ValueError, match="do not fit"):
        kernel.stack(d, [ws[:6] for ws in stack.weights], stack.norms, 1)
    with pytest.raises(ValueError, match="do not fit"):
        kernel.stack(dataclasses.replace(d, inter=d.inter + 1), stack.weights, stack.norms, 1)
    cache = host_decode.host_cache(hm, _prefill(model, [[3, 4, 5]]), 2)

    def slots(slot):
        return [Slots(k, v, slot, cache.start, cache.position, cache.cos, cache.sin, d.traditional) for k, v in zip(cache.keys, cache.values)]

    x = hm.embed[[4]]
    with pytest.raises(ValueError, match="shapes do not fit"):
        kernel.decode_layers(stack, np.zeros((1, d.hidden + 1), np.float32), slots(cache.length))
    with pytest.raises(ValueError, match="shapes do not fit"):
        kernel.decode_layers(stack, x, slots(cache.keys[0].shape[2]))  # past the cache's last slot
    assert kernel.decode_layers(stack, x, slots(cache.length)).shape == (1, d.hidden)
