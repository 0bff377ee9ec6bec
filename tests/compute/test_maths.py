"""get_batched_logps and dpo_loss against independent float64 NumPy computations."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dpo.compute.batching import pad_batch
from mlx_dpo.compute.logps import get_batched_logps, token_logps, token_logps_entropy
from mlx_dpo.objectives.losses import dpo_loss

VOCAB = 11
EOS = 2


class FixedLogits(nn.Module):
    """A 'model' whose logits are given: row r, position t -> table[r, t]."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = mx.array(table)

    def __call__(self, inputs):
        return self.table[:, : inputs.shape[1]]


def np_response_logps(logits: np.ndarray, seqs) -> np.ndarray:
    """Float64 reference: sum over response positions of log softmax(logits)[target]."""
    out = []
    for r, (toks, start) in enumerate(seqs):
        total = 0.0
        for p in range(max(start, 1), len(toks)):  # target position p is predicted at p-1
            row = logits[r, p - 1].astype(np.float64)
            lse = np.log(np.exp(row - row.max()).sum()) + row.max()
            total += row[toks[p]] - lse
        out.append(total)
    return np.array(out)


def np_dpo(pc, pr, rc, rr, beta, eps):
    h = beta * ((pc - rc) - (pr - rr))
    logsig = lambda x: -np.logaddexp(0.0, -x)
    losses = -(1 - eps) * logsig(h) - eps * logsig(-h)
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    return losses.mean(), cr.mean(), rj.mean(), (cr > rj).mean(), (cr - rj).mean()


def make_pairs(rng):
    """Pairs of different lengths whose responses use token 0 and EOS as real tokens."""
    pairs = []
    for n_prompt, n_c, n_r in [(3, 4, 2), (1, 2, 5), (5, 1, 1)]:
        prompt = list(rng.integers(0, VOCAB, n_prompt))
        chosen = [0] + list(rng.integers(0, VOCAB, n_c - 1))  # id 0 is a real response token
        rejected = list(rng.integers(0, VOCAB, n_r - 1)) + [EOS]  # the real EOS target counts
        pairs.append(((prompt + chosen, n_prompt), (prompt + rejected, n_prompt)))
    return pairs


def test_batched_logps_match_numpy_with_padding_zero_ids_and_eos_padding():
    rng = np.random.default_rng(0)
    pairs = make_pairs(rng)
    batch = pad_batch(pairs, pad_id=EOS)  # EOS used as padding
    n_rows, width = batch["tokens"].shape
    logits = rng.normal(size=(n_rows, width, VOCAB)).astype(np.float32) * 3

    logps, ntoks = get_batched_logps(FixedLogits(logits), batch["tokens"], batch["mask"])

    seqs = [p[0] for p in pairs] + [p[1] for p in pairs]  # chosen rows first, then rejected
    expected = np_response_logps(logits, seqs)
    np.testing.assert_allclose(np.array(logps), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(ntoks), [len(t) - s for t, s in seqs])
    # Row order: chosen of pair i at row i, rejected at row B + i.
    tokens = np.array(batch["tokens"])
    for i, (c, r) in enumerate(pairs):
        assert list(tokens[i, : len(c[0])]) == c[0]
        assert list(tokens[len(pairs) + i, : len(r[0])]) == r[0]


def test_logps_upcast_half_precision_logits():
    rng = np.random.default_rng(1)
    pairs = make_pairs(rng)
    batch = pad_batch(pairs, pad_id=EOS)
    logits = (rng.normal(size=batch["tokens"].shape + (VOCAB,)) * 3).astype(np.float16)
    model = FixedLogits(logits.astype(np.float32))
    model.table = model.table.astype(mx.float16)
    logps, _ = get_batched_logps(model, batch["tokens"], batch["mask"])
    assert logps.dtype == mx.float32
    seqs = [p[0] for p in pairs] + [p[1] for p in pairs]
    np.testing.assert_allclose(np.array(logps), np_response_logps(logits.astype(np.float64), seqs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_loss_matches_numpy(beta, eps):
    rng = np.random.default_rng(2)
    pc, pr, rc, rr = (rng.normal(size=16) * 5 - 20 for _ in range(4))
    loss, m = dpo_loss(*(mx.array(a.astype(np.float32)) for a in (pc, pr, rc, rr)), beta=beta, label_smoothing=eps)
    want = np_dpo(pc, pr, rc, rr, beta, eps)
    got = (loss.item(), m["rewards/chosen"].item(), m["rewards/rejected"].item(), m["rewards/accuracies"].item(), m["rewards/margins"].item())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m["logps/chosen"].item(), pc.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["logps/rejected"].item(), pr.mean(), rtol=1e-5)


def test_dpo_accuracy_is_strict_and_equal_logps_give_log2():
    x = mx.array([-3.0, -4.0])
    loss, m = dpo_loss(x, x, x, x, beta=0.1)
    assert abs(loss.item() - np.log(2)) < 1e-6
    assert m["rewards/accuracies"].item() == 0.0  # ties are not wins


def test_dpo_gradient_matches_numpy_finite_difference():
    rng = np.random.default_rng(3)
    pc, pr, rc, rr = (rng.normal(size=4) for _ in range(4))
    beta, eps = 0.3, 0.2

    def f(pc_):
        return dpo_loss(pc_, mx.array(pr), mx.array(rc), mx.array(rr), beta=beta, label_smoothing=eps)[0]

    grad = np.array(mx.grad(f)(mx.array(pc)))
    h = 1e-6
    numeric = np.zeros(4)
    for i in range(4):
        up, down = pc.copy(), pc.copy()
        up[i] += h
        down[i] -= h
        numeric[i] = (np_dpo(up, pr, rc, rr, beta, eps)[0] - np_dpo(down, pr, rc, rr, beta, eps)[0]) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


def test_logits_from_is_no_later_than_any_response_target():
    rng = np.random.default_rng(4)
    for _ in range(20):
        pairs = []
        for _ in range(3):
            n_prompt = int(rng.integers(1, 40))
            prompt = list(rng.integers(0, VOCAB, n_prompt))
            pairs.append(tuple((prompt + list(rng.integers(0, VOCAB, int(rng.integers(1, 9)))), n_prompt) for _ in range(2)))
        first = int(np.argmax(np.array(pad_batch(pairs)["mask"]).any(axis=0)))
        for multiple in (1, 8, 32):  # rounded down like the padded widths
            start = pad_batch(pairs, pad_multiple=multiple)["logits_from"]
            assert start % multiple == 0 and 0 <= start <= first
            assert first - start < multiple


def numpy_log_softmax(z: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: logits far from 0, where an unshifted exp overflows
def test_token_logps_entropy_and_their_gradient_match_float64_numpy(scale):
    """One pass of exp (logps.logsumexp_parts) and a backward that reuses it: log-probs, entropies
    and d(sum w * logp)/dlogits = w (onehot - softmax), against float64 NumPy."""
    rng = np.random.default_rng(3)
    z = (rng.normal(size=(3, 5, 97)) * scale).astype(np.float32)
    t = rng.integers(0, 97, size=(3, 5))
    w = rng.normal(size=(3, 5))
    logits, targets, weights = mx.array(z), mx.array(t.astype(np.int32)), mx.array(w.astype(np.float32))
    logps, entropy = token_logps_entropy(logits, targets, True)
    grad = mx.grad(lambda x: (token_logps_entropy(x, targets, True)[0] * weights).sum())(logits)
    log_softmax = numpy_log_softmax(z)
    p = np.exp(log_softmax)
    np.testing.assert_allclose(np.array(logps), np.take_along_axis(log_softmax, t[..., None], -1)[..., 0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(entropy), -(p * log_softmax).sum(-1), rtol=1e-4, atol=1e-4)
    onehot = np.eye(97)[t]
    np.testing.assert_allclose(np.array(grad), w[..., None] * (onehot - p), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.array(token_logps(logits, targets)), np.array(logps))


def test_token_logps_on_a_cpu_and_their_gradient_match_float64_numpy():
    """On a CPU ``token_logps`` takes its log-normaliser from ``logsumexp_parts`` (one pass of
    exp for the value and the gradient): against float64 NumPy, and equal to MLX's own
    ``logsumexp`` path to float32 rounding."""
    rng = np.random.default_rng(5)
    z = (rng.normal(size=(4, 6, 211)) * 8).astype(np.float32)
    t = rng.integers(0, 211, size=(4, 6))
    w = rng.normal(size=(4, 6))
    logits, targets, weights = mx.array(z), mx.array(t.astype(np.int32)), mx.array(w.astype(np.float32))
    assert mx.default_device() == mx.cpu
    value, grad = mx.value_and_grad(lambda x: (token_logps(x, targets) * weights).sum())(logits)
    log_softmax = numpy_log_softmax(z)
    want = np.take_along_axis(log_softmax, t[..., None], -1)[..., 0]
    np.testing.assert_allclose(value.item(), (want * w).sum(), rtol=1e-5)
    np.testing.assert_allclose(np.array(grad), w[..., None] * (np.eye(211)[t] - np.exp(log_softmax)), rtol=1e-4, atol=1e-6)
    mlx_own = np.take_along_axis(z, t[..., None], -1)[..., 0] - np.array(mx.logsumexp(logits, axis=-1))
    np.testing.assert_allclose(np.array(token_logps(logits, targets)), mlx_own, rtol=1e-6, atol=1e-5)
