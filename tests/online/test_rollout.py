"""The GRPO rollout engine against plain, cache-free decoding and exact distributions."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load

from mlx_dpo._platform import blas
from mlx_dpo.compute.decode import load_kernel, whole_step_on_host
from mlx_dpo.compute.streams import blas_threads
from mlx_dpo.online.rollout import SAMPLE_BLOCK, Completion, SamplingParams, host_sample, make_sampler, sample_groups
from tests.support import adapted_model

# Different lengths, one of them a lone token (an empty prefill).
PROMPTS = [[1, 5, 9, 33], [1], [1, 7, 8, 9, 10, 11, 12, 40, 41], [1, 2, 3]]


@pytest.fixture(scope="module")
def model(tiny_model_path):
    m, _ = load(str(tiny_model_path))
    return m


def greedy_reference(model, prompt, max_tokens, eos=()):
    """Token by token, the whole sequence re-run each step: no cache, no padding, no batching."""
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        tok = mx.argmax(model(mx.array(ids)[None])[0, -1]).item()
        out.append(tok)
        ids.append(tok)
        if tok in eos:
            break
    return out


def last_probs(model, prompt, temperature):
    logits = model(mx.array(prompt)[None])[0, -1].astype(mx.float32)
    return np.array(mx.softmax(logits / temperature))


def first_token_counts(model, prompt, n, params, seed=0):
    mx.random.seed(seed)
    params.max_tokens = 1
    comps = sample_groups(model, [prompt], n, params, [], max_batch=n)
    return np.bincount([c.token_ids[0] for c in comps], minlength=len(last_probs(model, prompt, 1.0)))


def assert_matches(counts, probs):
    """Every count within 5 binomial standard deviations (+3 for tiny expectations) of n * p."""
    n = counts.sum()
    tol = 5 * np.sqrt(n * probs * (1 - probs)) + 3
    worst = np.max(np.abs(counts - n * probs) - tol)
    assert worst <= 0, f"a token frequency is off by {worst:.1f} beyond the tolerance"


def restrict(probs, keep):
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


def test_greedy_matches_plain_decoding_and_stops_at_eos(model):
    plain = [greedy_reference(model, p, 12) for p in PROMPTS]
    # An EOS that greedy decoding does produce: one prompt stops early, another never sees it.
    eos = next(t for t in plain[0][1:] if t not in plain[1])
    expect = [greedy_reference(model, p, 12, {eos}) for p in PROMPTS]
    comps = sample_groups(model, PROMPTS, 2, SamplingParams(temperature=0, max_tokens=12), {eos})
    assert [c.prompt_index for c in comps] == [0, 0, 1, 1, 2, 2, 3, 3]
    for i, e in enumerate(expect):
        for g in range(2):
            c = comps[2 * i + g]
            assert c.token_ids == e
            assert c.finished == (e[-1] == eos)
    assert comps[0].finished and comps[0].token_ids[-1] == eos and len(comps[0].token_ids) < 12
    assert not comps[2].finished and len(comps[2].token_ids) == 12


def test_same_seed_same_completions_other_seed_different(model):
    params = SamplingParams(temperature=1.0, max_tokens=8)

    def run(seed):
        mx.random.seed(seed)
        return sample_groups(model, PROMPTS, 3, params, [2], max_batch=4)

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert len({tuple(x.token_ids) for x in a[:3]}) > 1  # a group's members differ


def test_first_token_follows_softmax_of_logits_over_t(model):
    prompt, T, n = PROMPTS[0], 0.2, 2000
    counts = first_token_counts(model, prompt, n, SamplingParams(temperature=T))
    assert_matches(counts, last_probs(model, prompt, T))
    with pytest.raises(AssertionError):  # the check can tell temperatures apart
        assert_matches(counts, last_probs(model, prompt, 0.3))


def test_top_k_keeps_the_k_most_likely(model):
    prompt, k = PROMPTS[2], 5
    probs = last_probs(model, prompt, 1.0)
    keep = probs >= np.sort(probs)[-k]
    counts = first_token_counts(model, prompt, 1000, SamplingParams(temperature=1.0, top_k=k))
    assert counts[~keep].sum() == 0
    assert_matches(counts, restrict(probs, keep))


def test_top_p_keeps_the_smallest_set_reaching_p(model):
    prompt, T, top_p = PROMPTS[3], 0.3, 0.4
    probs = last_probs(model, prompt, T)
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros_like(probs, dtype=bool)
    keep[order[before < top_p]] = True
    assert 1 < keep.sum() < 50
    counts = first_token_counts(model, prompt, 1000, SamplingParams(temperature=T, top_p=top_p))
    assert counts[~keep].sum() == 0
    assert_matches(counts, restrict(probs, keep))


def test_min_p_keeps_tokens_near_the_top(model):
    prompt, T, min_p = PROMPTS[0], 0.3, 0.3
    probs = last_probs(model, prompt, T)
    keep = probs >= min_p * probs.max()
    assert 1 < keep.sum() < 50
    counts = first_token_counts(model, prompt, 1000, SamplingParams(temperature=T, min_p=min_p))
    assert counts[~keep].sum() == 0
    assert_matches(counts, restrict(probs, keep))


def test_lora_model_samples_from_the_adapter_in_eval_mode(tiny_model_path):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(tiny_model_path))
    base = [greedy_reference(model, p, 8) for p in PROMPTS]
    model.freeze()
    # Dropout 0.5: sampling in training mode would not be greedy-reproducible.
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.5})
    mx.random.seed(3)
    for name, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.5
    model.eval()
    adapted = [greedy_reference(model, p, 8) for p in PROMPTS]
    assert adapted != base
    model.train()
    comps = sample_groups(model, PROMPTS, 1, SamplingParams(temperature=0, max_tokens=8), [])
    assert model.training
    assert [c.token_ids for c in comps] == adapted
    model.eval()
    sample_groups(model, PROMPTS[:1], 1, SamplingParams(temperature=0, max_tokens=2), [])
    assert not model.training


def test_max_tokens_rows_are_unfinished_and_full_length(model):
    mx.random.seed(0)
    comps = sample_groups(model, PROMPTS, 3, SamplingParams(temperature=1.0, max_tokens=5), [])
    assert len(comps) == 12
    assert all(not c.finished and len(c.token_ids) == 5 for c in comps)
    # An EOS drawn at the very last step still counts as finished.
    eos = comps[0].token_ids[-1]
    mx.random.seed(0)
    again = sample_groups(model, PROMPTS, 3, SamplingParams(temperature=1.0, max_tokens=5), [eos])
    assert again[0] == Completion(0, comps[0].token_ids, True)


class CountingModel:
    """Forwards to a model and records the (batch, length) of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, tokens, cache=None):
        self.calls.append(tuple(tokens.shape))
        return self.model(tokens, cache=cache)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("G,max_batch", [(4, 64), (5, 2)])
def test_each_prompt_is_prefilled_once(model, G, max_batch):
    counting = CountingModel(model)
    comps = sample_groups(counting, PROMPTS, G, SamplingParams(temperature=0, max_tokens=3), [], max_batch)
    prefill = [c for c in counting.calls if c[1] > 1]
    # One batch of 4 distinct prompts, or one call per prompt (the lone token needs none); never G copies.
    assert sum(b for b, _ in prefill) == (len(PROMPTS) if G <= max_batch else sum(len(p) > 1 for p in PROMPTS))
    assert max(b for b, _ in counting.calls) <= max_batch
    # Split groups still line up with their prompts and agree with each other (greedy).
    for i, p in enumerate(PROMPTS):
        group = comps[i * G : (i + 1) * G]
        assert all(c.prompt_index == i and c.token_ids == group[0].token_ids for c in group)
        assert group[0].token_ids == greedy_reference(model, p, 3)


def test_the_host_decode_step_samples_as_the_models_own_layers(model):
    """``fast_decode`` on the tiny Llama runs the whole step on the host (compute/host_decode.py):
    groups split over batches, rows ending at an EOS mid-batch, the same greedy tokens."""
    if load_kernel()[0] is None:
        pytest.skip(f"no kernel on this machine: {load_kernel()[1]}")
    assert whole_step_on_host(model)
    params = SamplingParams(temperature=0, max_tokens=6)
    eos = sample_groups(model, PROMPTS, 5, params, [], 2)[0].token_ids[2]  # the first group ends at step 3
    own = sample_groups(model, PROMPTS, 5, params, [eos], 2)
    host = sample_groups(model, PROMPTS, 5, SamplingParams(temperature=0, max_tokens=6, fast_decode=True), [eos], 2)
    assert host == own and any(c.finished for c in own) and not all(c.finished for c in own)


def test_rejects_bad_arguments(model):
    with pytest.raises(ValueError):
        sample_groups(model, [[1], []], 2, SamplingParams(), [])
    with pytest.raises(ValueError):
        sample_groups(model, [[1]], 2, SamplingParams(top_p=0.0), [])


def test_sampling_threads_draw_the_same_tokens_and_are_restored(tiny_model_path, monkeypatch):
    """``SamplingParams.threads``: the BLAS runs with that many threads while sampling (a run
    training on 2 streams of 1 thread samples on all cores), the same tokens come out, and the
    count the run had is back afterwards."""
    model, tok = load(str(tiny_model_path))
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    if blas.get_threads() is None:
        pytest.skip("the BLAS in use is not one mlx-dpo sets threads for")
    asked, set_threads = [], blas.set_threads
    monkeypatch.setattr(blas, "set_threads", lambda n: asked.append(n) or set_threads(n))
    with blas_threads(1):
        runs = []
        for threads in (0, 2):
            mx.random.seed(7)
            runs.append([c.token_ids for c in sample_groups(model, prompts, 3, SamplingParams(temperature=1.0, max_tokens=12, threads=threads), [])])
            assert blas.get_threads() == 1
    assert runs[0] == runs[1] and asked[:3] == [1, 2, 1]  # the block's 1, sampling's 2, the 1 restored


def test_merged_adapters_sample_the_adapted_distribution(tiny_model_path):
    """``fast_decode``: greedy tokens as the adapter layers decode them, the first token's
    frequencies as the adapted model's softmax, and the adapter layers back afterwards."""
    model = adapted_model(tiny_model_path)
    model.eval()
    layers = [m for _, m in model.named_modules() if "lora_a" in m]
    merged = SamplingParams(temperature=0, max_tokens=8, fast_decode=True)
    comps = sample_groups(model, PROMPTS, 1, merged, [])
    assert [c.token_ids for c in comps] == [greedy_reference(model, p, 8) for p in PROMPTS]
    prompt = PROMPTS[2]
    counts = first_token_counts(model, prompt, 4000, SamplingParams(temperature=1.0, fast_decode=True))
    assert_matches(counts, last_probs(model, prompt, 1.0))
    after = [m for _, m in model.named_modules() if "lora_a" in m]
    assert len(after) == len(layers) and all(a is b for a, b in zip(after, layers))


def test_host_sampling_draws_softmax_over_t_and_follows_the_seed():
    """``host_sample`` (fast_decode, no filter): token frequencies as float64 softmax(z / T), the
    same draws for the same ``mx.random.seed``, and filters still cut with fast_decode on."""
    rng = np.random.default_rng(5)
    z = (rng.normal(size=(1, 40)) * 3).astype(np.float64)
    sampler = make_sampler(SamplingParams(temperature=0.7, fast_decode=True))
    logits = mx.array(np.repeat(z, 20000, axis=0).astype(np.float32))
    mx.random.seed(11)
    draws = np.array(sampler(logits))
    p = np.exp(z[0] / 0.7 - (z[0] / 0.7).max())
    assert_matches(np.bincount(draws, minlength=40), p / p.sum())
    mx.random.seed(11)
    assert np.array_equal(np.array(sampler(logits)), draws)
    top3 = make_sampler(SamplingParams(temperature=0.7, top_k=3, fast_decode=True))
    assert set(np.array(top3(logits[:500])).tolist()) <= set(np.argsort(z[0])[-3:].tolist())


def test_host_sampling_across_blocks_of_the_vocabulary():
    """A vocabulary of several ``SAMPLE_BLOCK``s, the mass on entries at the blocks' edges and in
    the last, partial block: frequencies as float64 softmax, and a zero-probability entry never drawn."""
    vocab = 2 * SAMPLE_BLOCK + 300
    z = np.full(vocab, -5.0)
    z[[0, SAMPLE_BLOCK - 1, SAMPLE_BLOCK, 2 * SAMPLE_BLOCK - 1, 2 * SAMPLE_BLOCK, vocab - 1]] = [2.0, 1.0, 1.5, 0.5, 1.0, 2.5]
    z[7] = -np.inf
    logits = mx.array(np.repeat(z[None], 6000, axis=0).astype(np.float32))
    mx.random.seed(3)
    draws = np.array(host_sample(logits, 1.0))
    p = np.exp(z - z.max())
    assert_matches(np.bincount(draws, minlength=vocab), p / p.sum())
    assert 7 not in draws
