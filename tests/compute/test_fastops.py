"""compute/fastops.py and fastops.cpp: the vectorised SwiGLU and exp against float64 NumPy, their
gradient, their place in a model, and the fall-backs where the extension cannot serve."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import gemma, llama

from mlx_dpo._platform import extension as build_extension
from mlx_dpo.compute import fastops


@pytest.fixture(scope="module")
def fast():
    """The extension built for this machine; the test is skipped where it cannot be."""
    module, why = fastops.extension()
    if module is None:
        pytest.skip(f"no fastops extension on this machine: {why}")
    return module


def _values(shape, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.normal(0, 4, shape).astype(np.float32)
    g.flat[:6] = [0.0, -0.0, 90.0, -90.0, 1e-8, -200.0]  # both signs, past exp's range, tiny
    return g, rng.normal(0, 1, shape).astype(np.float32)


def test_swiglu_and_its_gradient_are_float64_numpy(fast):
    g, x = _values((7, 300))
    d = np.random.default_rng(1).normal(0, 1, g.shape).astype(np.float32)
    g64, x64, d64 = (a.astype(np.float64) for a in (g, x, d))
    s = 1 / (1 + np.exp(-g64))
    out = fastops.swiglu(mx.array(g), mx.array(x))
    np.testing.assert_allclose(np.array(out), g64 * s * x64, rtol=2e-6, atol=1e-30)
    dg, dx = mx.grad(lambda a, b: (fastops.swiglu(a, b) * mx.array(d)).sum(), argnums=(0, 1))(mx.array(g), mx.array(x))
    np.testing.assert_allclose(np.array(dx), d64 * g64 * s, rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(np.array(dg), d64 * x64 * s * (1 + g64 * (1 - s)), rtol=2e-5, atol=1e-6)
    dx_alone = mx.grad(lambda b: (fastops.swiglu(mx.array(g), b) * mx.array(d)).sum())(mx.array(x))
    assert mx.array_equal(dx_alone, dx)


def test_swiglus_gradient_takes_a_half_precision_cotangent(fast):
    """A custom_function's vjp may return float16 (MLX's own top-level vjp casts, this does not)."""
    g, x = (mx.array(a) for a in _values((3, 40), seed=5))

    @mx.custom_function
    def halve(a):
        return a

    @halve.vjp
    def _(primals, cotangent, output):
        return (cotangent.astype(mx.float16),)

    def loss(f):
        return lambda a: (halve(f(a, x)) * 3.0).sum()

    got, want = mx.grad(loss(fastops.swiglu))(g), mx.grad(loss(lambda a, b: nn.silu(a) * b))(g)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


def test_swiglu_reads_strided_inputs_and_runs_on_any_cpu_stream(fast):
    g, x = _values((40, 30), seed=2)
    gt, xt = mx.array(g).T, mx.array(x)[:, ::1].T  # column-major views
    with mx.stream(mx.new_stream(mx.cpu)):
        out = fastops.swiglu(gt, xt)
    np.testing.assert_allclose(np.array(out), np.array(nn.silu(gt) * xt), rtol=2e-6, atol=1e-30)


def test_exp_shifted_is_float64_numpy_and_zero_past_float32s_range(fast):
    z = np.random.default_rng(3).normal(0, 20, (5, 1001)).astype(np.float32)
    z[0, :3] = [-np.inf, -1e30, 80.0]
    z[1, 0] = np.nan
    top = np.nanmax(z, axis=-1)
    out = np.array(fastops.exp_shifted(mx.array(z), mx.array(top)))
    want = np.exp((z - top[:, None]).astype(np.float64))  # the float32 difference is the argument, as in MLX's
    ok = ~np.isnan(z)
    np.testing.assert_allclose(out[ok], want[ok], rtol=2e-7, atol=1e-37)
    assert out[0, 0] == 0 and out[0, 1] == 0 and np.isnan(out[1, 0])
    with pytest.raises(ValueError, match="one value a row"):
        fast.exp_shifted(mx.array(z), mx.array(top[:2]))
    with pytest.raises(ValueError, match="one value a row"):  # as many values, the wrong shape
        fast.exp_shifted(mx.zeros((2, 3, 4)), mx.zeros((3, 2)))
    assert fastops.exp_shifted(mx.zeros((3, 0)), mx.zeros((3,))).shape == (3, 0)


def test_exp_shifted_gives_nan_outside_its_domain_and_subnormals_as_zero(fast):
    z = mx.array([[-87.4, -87.3, -30.0, 1e-3, 5.0, 100.0, 0.0]])
    out = np.array(fast.exp_shifted(z, mx.zeros((1,))))
    assert out[0, 0] == 0 and out[0, 1] == pytest.approx(np.exp(-87.3), rel=1e-6)
    assert np.isnan(out[0, 3:6]).all() and out[0, 6] == 1 and out[0, 2] == pytest.approx(np.exp(-30.0), rel=1e-6)


def test_off_the_fast_path_each_function_is_mlxs_own(fast):
    g, x = (mx.array(a).astype(mx.float16) for a in _values((3, 50)))
    assert mx.array_equal(fastops.swiglu(g, x), nn.silu(g) * x)
    z = mx.array(np.linspace(-3, 0, 12, dtype=np.float32)).reshape(3, 4).astype(mx.bfloat16)
    assert mx.array_equal(fastops.exp_shifted(z, z.max(axis=-1)), mx.exp(z - z.max(axis=-1)[..., None]))


def test_a_compiled_step_through_swiglu_matches_the_uncompiled_one(fast):
    g, x = (mx.array(a) for a in _values((6, 64), seed=4))
    step = mx.value_and_grad(lambda a, b: (fastops.swiglu(a, b) ** 2).sum())
    plain, compiled = step(g, x), mx.compile(step)(g, x)
    assert mx.allclose(plain[0], compiled[0], rtol=1e-6).item() and mx.allclose(plain[1], compiled[1], rtol=1e-6).item()


def _llama():
    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=64, num_key_value_heads=2)
    mx.random.seed(0)
    return llama.Model(args)


def test_use_fast_mlps_switches_swiglu_mlps_once_and_keeps_their_output(fast):
    model = _llama()
    tokens = mx.array([[1, 5, 9, 3, 7]])
    before, names = model(tokens), [k for k, _ in tree_flatten(model.parameters())]
    assert fastops.use_fast_mlps(model) == 2 and fastops.use_fast_mlps(model) == 0
    mlp = model.layers[0].mlp
    assert isinstance(mlp, llama.MLP) and type(mlp).__call__ is not llama.MLP.__call__
    np.testing.assert_allclose(np.array(model(tokens)), np.array(before), rtol=1e-5, atol=1e-5)
    assert [k for k, _ in tree_flatten(model.parameters())] == names  # weights and adapters load as before


def test_an_mlp_whose_call_finds_another_swiglu_is_left_as_it_is():
    namespace = {"swiglu": lambda gate, x: gate * x}
    exec(compile("def __call__(self, x):\n    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))\n",
                 llama.__file__, "exec"), namespace)
    assert namespace["__call__"].__code__.co_code == llama.MLP.__call__.__code__.co_code
    other = type("MLP", (llama.MLP,), {"__call__": namespace["__call__"], "__module__": llama.__name__})
    model = _llama()
    model.layers[0].mlp.__class__ = other
    assert fastops.use_fast_mlps(model) == 1 and type(model.layers[0].mlp) is other


def test_an_extension_whose_results_differ_from_mlxs_is_not_used(monkeypatch, fast):
    class Wrong:
        def swiglu(self, gate, x):
            return fast.swiglu(gate, x) * 1.01

        def exp_shifted(self, z, top):
            return fast.exp_shifted(z, top)

    monkeypatch.setattr(fastops.build_extension, "build", lambda *a: (Wrong(), "built"))
    fastops.extension.cache_clear()
    try:
        module, why = fastops.extension()
        assert module is None and "differ from MLX's" in why
    finally:
        fastops.extension.cache_clear()


def test_mlps_of_another_shape_are_left_as_they_are():
    args = gemma.ModelArgs(model_type="gemma", hidden_size=32, num_hidden_layers=1, intermediate_size=48,
                           num_attention_heads=4, head_dim=8, rms_norm_eps=1e-5, vocab_size=64, num_key_value_heads=1)
    model = gemma.Model(args)
    assert fastops.use_fast_mlps(model) == 0 and type(model.model.layers[0].mlp) is gemma.MLP


def test_without_a_compiler_the_build_says_why(monkeypatch):
    monkeypatch.setenv("MLX_DPO_CC", "off")
    module, why = build_extension.build(fastops.SOURCE, fastops.NAME)
    assert module is None and "no C++ compiler" in why
