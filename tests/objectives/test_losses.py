"""Every loss in mlx_dpo.losses against an independent float64 NumPy implementation.

The NumPy functions below are written from the papers' formulas (as stated in
the loss docstrings) and never call the MLX code.
"""

import zlib

import mlx.core as mx
import numpy as np
import pytest

from mlx_dpo.objectives.losses import (
    PAIR_LOSSES,
    REFERENCE_FREE,
    USES_LABEL_SMOOTHING,
    dpo_loss,
    kto_loss,
    nll_loss,
    robust_loss,
    simpo_loss,
)

B = 16
PAIR_NAMES = [
    "dpo", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo", "orpo", "cpo",
]  # fmt: skip
DEFAULTS = {"gamma": 0.5, "tau": 0.05, "alpha": 1.0}


# ----------------------------------------------------------------------------- NumPy references


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return np.exp(logsig(x))


def np_pair(name, pc, pr, rc, rr, nc, nr, beta, eps, gamma=0.5, tau=0.05, alpha=1.0, delta=None):
    """(loss, metrics) in float64. ``delta`` freezes BCO's baseline (for finite differences)."""
    eps = np.broadcast_to(np.asarray(eps, dtype=np.float64), pc.shape)
    extra = {}
    if name in REFERENCE_FREE:
        ac, ar = pc / nc, pr / nr
        nll = -pc.sum() / nc.sum()
        if name == "simpo":
            x = beta * (ac - ar) - gamma
            losses = -(1 - eps) * logsig(x) - eps * logsig(-x)
            cr, rj = beta * ac, beta * ar
        elif name == "orpo":
            log_odds = (ac - ar) - (np.log(1 - np.exp(ac)) - np.log(1 - np.exp(ar)))
            ratio = logsig(log_odds)
            losses = nll - beta * ratio  # its mean is the loss
            cr, rj = beta * ac, beta * ar
            extra = {"nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()}
        elif name == "cpo":
            x = beta * (pc - pr)
            losses = -(1 - eps) * logsig(x) - eps * logsig(-x) + alpha * nll
            cr, rj = beta * pc, beta * pr
            extra = {"nll_loss": nll}
    else:
        lc, lr = pc - rc, pr - rr
        cr, rj = beta * lc, beta * lr
        h = lc - lr
        x = beta * h
        if name == "dpo":
            losses = -(1 - eps) * logsig(x) - eps * logsig(-x)
        elif name == "robust":
            losses = ((1 - eps) * -logsig(x) - eps * -logsig(-x)) / (1 - 2 * eps)
        elif name == "hinge":
            losses = np.maximum(0.0, 1 - x)
        elif name == "ipo":
            losses = (lc / nc - lr / nr - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            e = np.where(eps == 0, 1e-3, eps)
            losses = sig(x) * (logsig(x) - np.log(1 - e)) + sig(-x) * (logsig(-x) - np.log(e))
        elif name == "nca_pair":
            losses = -logsig(cr) - 0.5 * logsig(-cr) - 0.5 * logsig(-rj)
        elif name == "bco_pair":
            d = np.concatenate([cr, rj]).mean() if delta is None else delta
            losses = -logsig(cr - d) - logsig(-(rj - d))
            extra = {"delta": d}
        elif name == "sppo_hard":
            losses = (lc - 1 / (2 * beta)) ** 2 + (lr + 1 / (2 * beta)) ** 2
        elif name == "apo_zero":
            losses = 1 - sig(cr) + sig(rj)
        elif name == "apo_down":
            losses = sig(cr) + 1 - sig(x)
        elif name == "discopop":
            m = sig(x / tau)
            losses = -logsig(x) * (1 - m) + np.exp(-x) * m
        elif name == "sigmoid_norm":
            xn = beta * (lc / nc - lr / nr)
            losses = -(1 - eps) * logsig(xn) - eps * logsig(-xn)
    metrics = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rj.mean(),
        "rewards/accuracies": (cr > rj).mean(),
        "rewards/margins": (cr - rj).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
        **extra,
    }
    return losses.mean(), metrics


def np_kto(pl, rl, labels, pkl, rkl, beta, wd=1.0, wu=1.0):
    labels = np.asarray(labels).astype(bool)
    z0 = max(0.0, (pkl - rkl).mean())
    r = pl - rl
    losses = np.where(labels, wd * (1 - sig(beta * (r - z0))), wu * (1 - sig(beta * (z0 - r))))
    d, u = labels, ~labels

    def mean_over(x, mask):
        return x[mask].mean() if mask.any() else 0.0

    metrics = {
        "rewards/chosen": mean_over(beta * r, d),
        "rewards/rejected": mean_over(beta * r, u),
        "logps/chosen": mean_over(pl, d),
        "logps/rejected": mean_over(pl, u),
        "kl": z0,
        "count/desirable": float(d.sum()),
        "count/undesirable": float(u.sum()),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics


# ----------------------------------------------------------------------------- helpers


def f32(a):
    """Round to float32 (what MLX sees) and back, so both sides get identical inputs."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def make_inputs(seed, n=B):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (f32(-np.abs(rng.normal(size=n) * 5 - 20)) for _ in range(4))
    nc, nr = (rng.integers(3, 31, size=n).astype(np.float64) for _ in range(2))
    return dict(pc=pc, pr=pr, rc=rc, rr=rr, nc=nc, nr=nr)


def mlx_kwargs(x, name, eps):
    ref_free = name in REFERENCE_FREE
    return dict(
        policy_chosen=mx.array(x["pc"], dtype=mx.float32),
        policy_rejected=mx.array(x["pr"], dtype=mx.float32),
        reference_chosen=None if ref_free else mx.array(x["rc"], dtype=mx.float32),
        reference_rejected=None if ref_free else mx.array(x["rr"], dtype=mx.float32),
        chosen_tokens=mx.array(x["nc"], dtype=mx.float32),
        rejected_tokens=mx.array(x["nr"], dtype=mx.float32),
        label_smoothing=eps if isinstance(eps, float) else mx.array(eps, dtype=mx.float32),
    )


def check_metrics(got, want, rtol=1e-4, atol=1e-5):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k, v in want.items():
        assert got[k].shape == (), k
        np.testing.assert_allclose(got[k].item(), v, rtol=rtol, atol=atol, err_msg=k)


def eps_value(kind, n=B):
    if kind == "array":
        return f32(np.random.default_rng(99).uniform(0.0, 0.4, size=n))
    return kind


# ----------------------------------------------------------------------------- paired losses


def test_registry_names_and_sets():
    assert sorted(PAIR_LOSSES) == sorted(PAIR_NAMES)
    assert set(REFERENCE_FREE) == {"simpo", "orpo", "cpo"}
    assert set(USES_LABEL_SMOOTHING) == {"dpo", "robust", "exo_pair", "sigmoid_norm", "simpo", "cpo"}
    for name in PAIR_NAMES:
        assert PAIR_LOSSES[name].__doc__, name


@pytest.mark.parametrize("name", PAIR_NAMES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.2, "array"])
@pytest.mark.parametrize("hp", ["default", "custom"])
def test_pair_loss_matches_numpy(name, beta, eps, hp):
    x = make_inputs(seed=zlib.crc32(repr((name, beta, eps, hp)).encode()))
    eps = eps_value(eps)
    hparams = {} if hp == "default" else {"gamma": 1.3, "tau": 0.5, "alpha": 0.3}
    # Unused keywords (other losses' hyper-parameters, KTO weights) must be ignored.
    loss, metrics = PAIR_LOSSES[name](**mlx_kwargs(x, name, eps), beta=beta, desirable_weight=3.0, **hparams)
    want_loss, want_metrics = np_pair(name, *x.values(), beta, eps, **{**DEFAULTS, **hparams})
    assert loss.shape == ()
    np.testing.assert_allclose(loss.item(), want_loss, rtol=1e-4, atol=1e-5)
    check_metrics(metrics, want_metrics)


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_label_smoothing_acts_exactly_where_declared(name):
    x = make_inputs(seed=5)
    a = PAIR_LOSSES[name](**mlx_kwargs(x, name, 0.0), beta=0.3)[0].item()
    b = PAIR_LOSSES[name](**mlx_kwargs(x, name, 0.25), beta=0.3)[0].item()
    if name in USES_LABEL_SMOOTHING:
        assert abs(a - b) > 1e-4
    else:
        assert a == b


@pytest.mark.parametrize("name", sorted(USES_LABEL_SMOOTHING))
def test_per_pair_label_smoothing_is_per_pair(name):
    """An ε array gives each pair the loss it would get with that ε as a scalar."""
    x = make_inputs(seed=6, n=4)
    eps = f32([0.0, 0.05, 0.2, 0.35])
    per_pair = PAIR_LOSSES[name](**mlx_kwargs(x, name, eps), beta=0.5)[0].item()
    one_by_one = []
    for i in range(4):
        xi = {k: v[i : i + 1] for k, v in x.items()}
        one_by_one.append(np_pair(name, *xi.values(), 0.5, float(eps[i]))[0])
    if name == "cpo":  # the NLL is over the whole batch, not per pair
        nll = -x["pc"].sum() / x["nc"].sum()
        one_by_one = [v - (-x["pc"][i] / x["nc"][i]) + nll for i, v in enumerate(one_by_one)]
    np.testing.assert_allclose(per_pair, np.mean(one_by_one), rtol=1e-5)
    # ...and it is not the same as the mean ε applied to every pair.
    mean_eps = PAIR_LOSSES[name](**mlx_kwargs(x, name, float(eps.mean())), beta=0.5)[0].item()
    assert abs(per_pair - mean_eps) > 1e-6


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_accuracy_is_strict(name):
    """Identical chosen and rejected responses tie: a tie is not a win."""
    x = make_inputs(seed=16, n=4)
    x = dict(x, pr=x["pc"], rr=x["rc"], nr=x["nc"])
    _, metrics = PAIR_LOSSES[name](**mlx_kwargs(x, name, 0.0), beta=0.5)
    assert metrics["rewards/accuracies"].item() == 0.0
    assert metrics["rewards/margins"].item() == 0.0


def test_robust_differs_from_dpo_only_when_eps_positive():
    x = make_inputs(seed=7)
    args = [mx.array(x[k], dtype=mx.float32) for k in ("pc", "pr", "rc", "rr")]
    assert robust_loss(*args, beta=0.2, label_smoothing=0.0)[0].item() == pytest.approx(
        dpo_loss(*args, beta=0.2, label_smoothing=0.0)[0].item(), rel=1e-6
    )
    r = robust_loss(*args, beta=0.2, label_smoothing=0.2)[0].item()
    d = dpo_loss(*args, beta=0.2, label_smoothing=0.2)[0].item()
    assert abs(r - d) > 1e-3
    with pytest.raises(ValueError):
        robust_loss(*args, beta=0.2, label_smoothing=0.5)


def test_exo_replaces_zero_eps_per_pair():
    x = make_inputs(seed=8, n=4)
    zeros = PAIR_LOSSES["exo_pair"](**mlx_kwargs(x, "exo_pair", 0.0), beta=0.4)[0].item()
    tiny = PAIR_LOSSES["exo_pair"](**mlx_kwargs(x, "exo_pair", 1e-3), beta=0.4)[0].item()
    assert np.isfinite(zeros) and zeros == pytest.approx(tiny, rel=1e-6)
    mixed = PAIR_LOSSES["exo_pair"](**mlx_kwargs(x, "exo_pair", f32([0.0, 0.1, 0.0, 0.3])), beta=0.4)[0].item()
    assert np.isfinite(mixed)


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_losses_accept_none_and_ignore_references(name):
    x = make_inputs(seed=9)
    kw = mlx_kwargs(x, name, 0.1)
    assert kw["reference_chosen"] is None
    a = PAIR_LOSSES[name](**kw, beta=0.5)[0].item()
    kw["reference_chosen"], kw["reference_rejected"] = mx.zeros(B), mx.ones(B)
    b = PAIR_LOSSES[name](**kw, beta=0.5)[0].item()
    assert np.isfinite(a) and a == b


@pytest.mark.parametrize("name", [n for n in PAIR_NAMES if n not in REFERENCE_FREE])
def test_reference_losses_require_references(name):
    x = make_inputs(seed=10)
    kw = mlx_kwargs(x, name, 0.0)
    kw["reference_chosen"] = kw["reference_rejected"] = None
    with pytest.raises(ValueError, match="reference"):
        PAIR_LOSSES[name](**kw, beta=0.1)


def test_simpo_direct_call_matches_registry_and_gamma_matters():
    x = make_inputs(seed=11)
    kw = mlx_kwargs(x, "simpo", 0.0)
    direct = simpo_loss(kw["policy_chosen"], kw["policy_rejected"], kw["chosen_tokens"], kw["rejected_tokens"], beta=2.0)
    assert direct[0].item() == PAIR_LOSSES["simpo"](**kw, beta=2.0)[0].item()
    assert PAIR_LOSSES["simpo"](**kw, beta=2.0, gamma=1.0)[0].item() > direct[0].item()


def test_orpo_is_finite_and_accurate_near_zero_logps():
    # Average log-probs close to 0 (a very confident model): log(1 - e^a) must stay accurate.
    pc = f32([-1e-4, -3e-3, -0.5, -2.0])
    pr = f32([-2e-3, -1e-5, -0.7, -9.0])
    n = np.ones(4)
    x = dict(pc=pc, pr=pr, rc=None, rr=None, nc=n, nr=n)
    loss, metrics = PAIR_LOSSES["orpo"](**mlx_kwargs(x, "orpo", 0.0), beta=0.25)
    want, want_m = np_pair("orpo", pc, pr, None, None, n, n, 0.25, 0.0)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-4)
    np.testing.assert_allclose(metrics["log_odds_chosen"].item(), want_m["log_odds_chosen"], rtol=1e-4)
    # A log-prob that rounds to exactly 0 gives a finite loss and gradient, not NaN.
    zero = dict(x, pc=f32([0.0, -1.0, -0.5, -2.0]))
    kw = mlx_kwargs(zero, "orpo", 0.0)
    val, grad = mx.value_and_grad(lambda p: PAIR_LOSSES["orpo"](**{**kw, "policy_chosen": p}, beta=0.25)[0])(
        kw["policy_chosen"]
    )
    assert np.isfinite(val.item()) and np.isfinite(np.array(grad)).all()


def test_discopop_is_finite_for_extreme_margins():
    h = f32([-2000.0, -300.0, 0.0, 300.0, 2000.0])
    z = np.zeros(5)
    kw = mlx_kwargs(dict(pc=h, pr=z, rc=z, rr=z, nc=z + 1, nr=z + 1), "discopop", 0.0)
    loss, _ = PAIR_LOSSES["discopop"](**kw, beta=0.5)
    # Per pair: very negative margins give -log σ(x) ≈ -x; positive ones exp(-x) ≈ 0.
    x = 0.5 * h
    want = np.mean(np.where(x < 0, -logsig(x), 0.0) + np.where(x == 0, np.log(2) * 0.5 + 0.5, 0.0))
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)


# ----------------------------------------------------------------------------- gradients


def numeric_grad(fn, arr, h=1e-6):
    out = np.zeros_like(arr)
    for i in range(arr.size):
        up, down = arr.copy(), arr.copy()
        up[i] += h
        down[i] -= h
        out[i] = (fn(up) - fn(down)) / (2 * h)
    return out


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_pair_loss_gradients_match_finite_differences(name):
    x = make_inputs(seed=12, n=5)
    beta, eps = 0.3, f32([0.0, 0.1, 0.2, 0.05, 0.3])
    hp = {"gamma": 0.7, "tau": 0.4, "alpha": 0.6}
    kw = mlx_kwargs(x, name, eps)
    # BCO's baseline δ is a stop-gradient: hold it at its value when differencing.
    delta = np_pair(name, *x.values(), beta, eps, **hp)[1].get("delta")

    def mlx_fn(pc, pr):
        return PAIR_LOSSES[name](**{**kw, "policy_chosen": pc, "policy_rejected": pr}, beta=beta, **hp)[0]

    g_c, g_r = mx.grad(mlx_fn, argnums=(0, 1))(kw["policy_chosen"], kw["policy_rejected"])

    def np_fn(which):
        def f(v):
            y = dict(x, **{which: v})
            return np_pair(name, *y.values(), beta, eps, delta=delta, **hp)[0]

        return f

    np.testing.assert_allclose(np.array(g_c), numeric_grad(np_fn("pc"), x["pc"]), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.array(g_r), numeric_grad(np_fn("pr"), x["pr"]), rtol=2e-4, atol=1e-6)
    assert np.abs(np.array(g_c)).max() > 0


@pytest.mark.parametrize("name", [n for n in PAIR_NAMES if n not in REFERENCE_FREE])
def test_no_gradient_flows_into_references(name):
    x = make_inputs(seed=13, n=5)
    kw = mlx_kwargs(x, name, 0.1)

    def f(rc, rr):
        return PAIR_LOSSES[name](**{**kw, "reference_chosen": rc, "reference_rejected": rr}, beta=0.3)[0]

    g_c, g_r = mx.grad(f, argnums=(0, 1))(kw["reference_chosen"], kw["reference_rejected"])
    assert not np.array(g_c).any() and not np.array(g_r).any()


@pytest.mark.parametrize("name", PAIR_NAMES)
@pytest.mark.parametrize("nll_first", [False, True])
def test_compiled_value_and_grad_with_nll_matches_eager(name, nll_first):
    """As the trainer runs them: metrics out of a compiled value_and_grad, with an
    RPO-style NLL term summed in (the first term's metric wins a shared name)."""
    x = make_inputs(seed=14, n=6)
    kw = mlx_kwargs(x, name, 0.1)

    def f(pc, pr, ct):
        parts = [
            PAIR_LOSSES[name](**{**kw, "policy_chosen": pc, "policy_rejected": pr, "chosen_tokens": ct}, beta=0.3),
            nll_loss(pc, ct),
        ]
        total, metrics = None, {}
        for w, (part, m) in zip((1.0, 0.5), parts[::-1] if nll_first else parts):
            total = w * part if total is None else total + w * part
            for k, v in m.items():
                metrics.setdefault(k, v)
        return total, metrics

    vg = mx.value_and_grad(f, argnums=(0, 1))
    args = (kw["policy_chosen"], kw["policy_rejected"], kw["chosen_tokens"])
    (v1, m1), g1 = vg(*args)
    (v2, m2), g2 = mx.compile(vg)(*args)
    np.testing.assert_allclose(v1.item(), v2.item(), rtol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-7)
    assert set(m1) == set(m2)
    for k in m1:
        np.testing.assert_allclose(m1[k].item(), m2[k].item(), rtol=1e-5, atol=1e-7, err_msg=k)


def test_compiled_kto_matches_eager():
    labels = mx.array(np.array([1, 0, 1, 1, 0], dtype=bool))
    pl, rl, _, pkl, rkl = kto_inputs(15, [1, 0, 1, 1, 0], 1.0)
    pl, rl, pkl, rkl = (mx.array(v, dtype=mx.float32) for v in (pl, rl, pkl, rkl))
    vg = mx.value_and_grad(lambda p, lab: kto_loss(p, rl, lab, pkl, rkl, beta=0.3))
    (v1, m1), g1 = vg(pl, labels)
    (v2, m2), g2 = mx.compile(vg)(pl, labels)
    np.testing.assert_allclose(v1.item(), v2.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(g1), np.array(g2), rtol=1e-4, atol=1e-7)
    for k in m1:
        np.testing.assert_allclose(m1[k].item(), m2[k].item(), rtol=1e-5, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------------------- KTO and NLL


def kto_inputs(seed, labels, kl_shift):
    rng = np.random.default_rng(seed)
    n = len(labels)
    pl, rl = (f32(-np.abs(rng.normal(size=n) * 5 - 20)) for _ in range(2))
    rkl = f32(-np.abs(rng.normal(size=n) * 5 - 20))
    pkl = f32(rkl + rng.normal(size=n) + kl_shift)
    return pl, rl, np.asarray(labels), pkl, rkl


def run_kto(pl, rl, labels, pkl, rkl, **kw):
    a = lambda v: mx.array(v, dtype=mx.float32)  # noqa: E731
    return kto_loss(a(pl), a(rl), mx.array(labels), a(pkl), a(rkl), **kw)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("kl_shift", [-3.0, 2.0])  # z0 clamped to 0 / positive
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
@pytest.mark.parametrize("label_dtype", [bool, np.float32])
def test_kto_matches_numpy_with_mixed_labels(beta, kl_shift, weights, label_dtype):
    labels = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=label_dtype)
    inputs = kto_inputs(21, labels, kl_shift)
    loss, metrics = run_kto(*inputs, beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    want, want_m = np_kto(*inputs, beta, *weights)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5, atol=1e-6)
    check_metrics(metrics, want_m)
    assert (metrics["kl"].item() > 0) == (kl_shift > 0)
    assert "rewards/accuracies" not in metrics


@pytest.mark.parametrize("kind", [1, 0])
def test_kto_single_kind_batch_has_no_nan(kind):
    labels = np.full(6, bool(kind))
    inputs = kto_inputs(22, labels, 1.0)
    loss, metrics = run_kto(*inputs, beta=0.2)
    for k, v in metrics.items():
        assert np.isfinite(v.item()), k
    want, want_m = np_kto(*inputs, 0.2)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)
    check_metrics(metrics, want_m)
    missing = "rejected" if kind else "chosen"
    assert metrics[f"rewards/{missing}"].item() == 0.0 and metrics[f"logps/{missing}"].item() == 0.0
    assert metrics["count/desirable"].item() == 6 * kind


def test_kto_gradient_matches_finite_differences_and_kl_is_stopped():
    labels = np.array([1, 0, 1, 0, 0], dtype=bool)
    pl, rl, _, pkl, rkl = kto_inputs(23, labels, 1.5)
    beta, wd, wu = 0.4, 1.3, 0.8
    a = lambda v: mx.array(v, dtype=mx.float32)  # noqa: E731

    def f(p, p_kl):
        return kto_loss(p, a(rl), mx.array(labels), p_kl, a(rkl), beta=beta, desirable_weight=wd, undesirable_weight=wu)[0]

    g, g_kl = mx.grad(f, argnums=(0, 1))(a(pl), a(pkl))
    numeric = numeric_grad(lambda v: np_kto(v, rl, labels, pkl, rkl, beta, wd, wu)[0], pl)
    np.testing.assert_allclose(np.array(g), numeric, rtol=2e-4, atol=1e-7)
    assert np.abs(numeric).min() > 1e-5
    assert not np.array(g_kl).any()  # z0 is a stop-gradient baseline


def test_nll_loss_matches_numpy():
    x = make_inputs(seed=24)
    loss, metrics = nll_loss(mx.array(x["pc"], dtype=mx.float32), mx.array(x["nc"], dtype=mx.float32))
    want = -x["pc"].sum() / x["nc"].sum()
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)
    assert set(metrics) == {"nll_loss"}
    np.testing.assert_allclose(metrics["nll_loss"].item(), want, rtol=1e-6)
