"""The prompt computed once (prefix.py): the same losses, metrics and gradients as running it per sequence.

Every check compares the shared path with the plain one (each sequence run whole), which the
other test files check against float64 NumPy; here the question is only whether sharing changes
anything, for LoRA, DoRA and full fine-tuning, for pairs, KTO rows and GRPO groups.
"""

import random

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import load

from mlx_dpo.compute.batching import iterate_batches, pad_batch
from mlx_dpo.compute.forward import resolve_prefix_sharing, sharing_problem
from mlx_dpo.compute.logps import get_batched_logps
from mlx_dpo.compute.prefix import PrefixCache, is_shared, shared_prefix_fields
from mlx_dpo.compute.reference import (
    compute_reference_logps,
    make_reference,
    token_reference,
)
from mlx_dpo.config import load_config
from mlx_dpo.data import as_dataset, load_datasets
from mlx_dpo.data.prompts import Prompt
from mlx_dpo.lora import run
from mlx_dpo.online.grpo import GRPOArgs, make_grpo_loss, make_rollout_source
from mlx_dpo.online.rollout import SamplingParams
from mlx_dpo.toy import write_jsonl
from mlx_dpo.train.metrics_log import read_metrics
from tests.support import adapted_model, make_loss

WORDS = "the a good bad movie film was very plot actor scene story great terrible boring loved it not".split()


def real_shaped_records(n: int, seed: int = 0) -> list[dict]:
    """Multi-turn prompts (optional system turn, 1-3 user turns, earlier answers), responses from 1 to 90 words."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text(rng.randint(3, 12))}] if rng.random() < 0.5 else []
        turns = rng.randint(1, 3)
        for t in range(turns):
            msgs.append({"role": "user", "content": text(rng.randint(4, 50))})
            if t < turns - 1:
                msgs.append({"role": "assistant", "content": text(rng.randint(2, 25))})
        answer = lambda: [{"role": "assistant", "content": text(rng.choice([1, 3, 12, 40, 90]))}]  # noqa: E731
        out.append({"prompt": msgs, "chosen": answer(), "rejected": answer()})
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    for split, n, seed in (("train", 24, 0), ("valid", 8, 1), ("test", 8, 2)):
        write_jsonl(root / f"{split}.jsonl", real_shaped_records(n, seed))
    return root


def examples(model_path, data_dir, kind="pairs", max_len=160):
    _, tok = load(str(model_path))
    return load_datasets(str(data_dir), tok, kind, max_len, splits=("train",))["train"]


def assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert fa.keys() == fb.keys() and fa
    for k in fa:
        x, y = np.array(fa[k], dtype=np.float64), np.array(fb[k], dtype=np.float64)
        scale = max(np.abs(x).max(), 1e-3)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale, err_msg=k)


def loss_metrics_grad(loss_fn, model, batch):
    (loss, metrics), grad = nn.value_and_grad(model, lambda m: loss_fn(m, batch))(model)
    mx.eval(loss, metrics, grad)
    return loss, metrics, grad


# ----------------------------------------------------------------------------- batch layout


def test_fields_hold_each_prompt_once_and_each_response_from_the_last_prompt_token():
    seqs = [([5, 6, 7, 8, 1, 2], 4), ([9, 3, 1], 2), ([5, 6, 7, 8, 4], 4), ([9, 3, 7, 7, 7], 2)]
    f = shared_prefix_fields(seqs, [0, 1, 0, 1], pad_id=99)
    np.testing.assert_array_equal(f["prefix_lengths"], [3, 1])
    np.testing.assert_array_equal(f["prefix_tokens"], [[5, 6, 7], [9, 99, 99]])
    np.testing.assert_array_equal(f["suffix_tokens"], [[8, 1, 99], [3, 99, 99], [8, 99, 99], [3, 7, 7]])
    np.testing.assert_array_equal(f["suffix_targets"], [[1, 2, 99], [1, 99, 99], [4, 99, 99], [7, 7, 7]])
    np.testing.assert_array_equal(f["suffix_mask"], [[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(f["suffix_rows"], [0, 1, 0, 1])
    # Every target the plain batch scores is scored once here, and nothing else.
    plain = pad_batch([(seqs[0], seqs[2]), (seqs[1], seqs[3])])
    assert plain["mask"].sum().item() == f["suffix_mask"].sum()


def test_batches_whose_sequences_do_not_share_their_prompt_stay_plain():
    assert shared_prefix_fields([([1, 2, 3], 2), ([1, 5, 3], 2)], [0, 0]) is None  # different prompts
    assert shared_prefix_fields([([1, 2, 3], 2), ([1, 2, 3, 4], 3)], [0, 0]) is None  # different starts
    assert shared_prefix_fields([([1, 2], 1), ([1, 3], 1)], [0, 0]) is None  # a one-token prompt: nothing to cache
    assert not is_shared(pad_batch([(([1, 2, 3], 2), ([1, 5, 3], 2))], share_prefix=True))
    assert is_shared(pad_batch([(([1, 2, 3], 2), ([1, 2, 4], 2))], share_prefix=True))


def test_window_mask_matches_absolute_positions():
    """Sliding-window layers: a continuation row sees prompt keys within the window of its absolute position."""
    c = PrefixCache()
    c.keys = c.values = mx.zeros((2, 1, 5, 2))
    c.branch(mx.array([0, 1, 1]), mx.array([5, 2]))
    got = np.array(c.make_mask(3, window_size=3))[:, 0]
    lengths, wp = [5, 2, 2], 5
    for r, p in enumerate(lengths):
        for i in range(3):
            q = p + i
            want_prefix = [k < p and q - k < 3 for k in range(wp)]
            want_cont = [j <= i and i - j < 3 for j in range(3)]
            np.testing.assert_array_equal(got[r, i], want_prefix + want_cont)
    assert PrefixCache().make_mask(4) == "causal"


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "kto", "simpo", ["dpo", "sft"]])
def test_loss_metrics_and_gradients_equal_the_plain_path(tiny_model_path, data_dir, kind, loss_type):
    kto = loss_type == "kto"
    data = examples(tiny_model_path, data_dir, "kto" if kto else "pairs")
    model = adapted_model(tiny_model_path, kind)
    reference = make_reference(model, load(str(tiny_model_path))[0] if kind == "full" else None)
    loss_fn = make_loss(loss_type, reference, beta=0.2)
    checked = 0
    for plain, shared in zip(iterate_batches(data, 4, shuffle=False), iterate_batches(data, 4, shuffle=False, share_prefix=True)):
        assert is_shared(shared)
        # The data is real-shaped: long prompts, and the shared pass is much shorter.
        assert shared["prefix_tokens"].shape[1] > 8
        a, b = loss_metrics_grad(loss_fn, model, plain), loss_metrics_grad(loss_fn, model, shared)
        np.testing.assert_allclose(a[0].item(), b[0].item(), rtol=1e-5, atol=1e-6)
        assert a[1].keys() == b[1].keys()
        for k in a[1]:
            np.testing.assert_allclose(np.array(a[1][k]), np.array(b[1][k]), rtol=1e-4, atol=1e-5, err_msg=k)
        assert_trees_close(a[2], b[2])
        checked += 1
        if checked == 3:  # the shortest, a middle and a long group of the length-sorted data
            break
    assert checked == 3


def test_truncated_pairs_and_precomputed_reference_are_equal(tiny_model_path, data_dir):
    """A short max length truncates responses (and drops prompts that fill it); the precomputed
    reference pass shares too and gives the on-the-fly values."""
    data = examples(tiny_model_path, data_dir, max_len=128)
    assert any(len(ex[0][0]) == 128 or len(ex[1][0]) == 128 for ex in data)  # some responses were cut
    model = adapted_model(tiny_model_path, "lora")
    reference = make_reference(model)
    plain = compute_reference_logps(reference, data, 4)
    shared = compute_reference_logps(reference, data, 4, share_prefix=True)
    np.testing.assert_allclose(shared, plain, rtol=1e-5, atol=1e-4)
    cached = as_dataset(data).with_fields(reference_logps=shared)
    loss_fn = make_loss("dpo", None, beta=0.1)
    on_the_fly = make_loss("dpo", reference, beta=0.1)
    batch = next(iterate_batches(cached, 4, shuffle=False, share_prefix=True))
    plain_batch = next(iterate_batches(data, 4, shuffle=False))
    a, b = loss_metrics_grad(on_the_fly, model, plain_batch), loss_metrics_grad(loss_fn, model, batch)
    np.testing.assert_allclose(a[0].item(), b[0].item(), rtol=1e-5)
    assert_trees_close(a[2], b[2])


def test_gradient_reaches_the_prompt_positions_through_the_cache(tiny_model_path, data_dir, monkeypatch):
    """A cache that stopped the gradient would train only the response positions: the gradients
    would then differ from the plain path. Stopping it on purpose must be caught by the comparison."""
    data = examples(tiny_model_path, data_dir)
    model = adapted_model(tiny_model_path, "lora")
    loss_fn = make_loss("dpo", make_reference(model), beta=0.2)
    plain = next(iterate_batches(data, 4, shuffle=False))
    shared = next(iterate_batches(data, 4, shuffle=False, share_prefix=True))
    good = loss_metrics_grad(loss_fn, model, shared)[2]
    assert_trees_close(loss_metrics_grad(loss_fn, model, plain)[2], good)

    branch = PrefixCache.branch

    def detached(self, rows, lengths):
        branch(self, rows, lengths)
        self.keys, self.values = mx.stop_gradient(self.keys), mx.stop_gradient(self.values)

    monkeypatch.setattr(PrefixCache, "branch", detached)
    bad = loss_metrics_grad(loss_fn, model, shared)[2]
    gap = max(float(mx.abs(g - b).max()) for (_, g), (_, b) in zip(tree_flatten(good), tree_flatten(bad)))
    assert gap > 1e-3


def test_prompt_padding_is_never_attended(tiny_model_path, data_dir):
    """Prompts of different lengths share one right-padded prefix pass: the padding's token id
    must not change any log-prob."""
    data = examples(tiny_model_path, data_dir)
    model = adapted_model(tiny_model_path, "lora")
    group = [data[i] for i in range(0, len(data), max(1, len(data) // 5))][:5]
    lengths = {ex[0][1] for ex in group}
    assert len(lengths) > 1  # prompts of different lengths in one batch
    from mlx_dpo.compute.prefix import shared_logps

    a = np.array(shared_logps(model, pad_batch(group, pad_id=0, share_prefix=True))[0])
    b = np.array(shared_logps(model, pad_batch(group, pad_id=311, share_prefix=True))[0])
    plain = pad_batch(group)
    c = np.array(get_batched_logps(model, plain["tokens"], plain["mask"])[0])
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- GRPO groups


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_grpo_groups_share_their_prompt_with_equal_loss_and_gradients(tiny_model_path, kind):
    """G completions of one prompt: rollouts, old-policy and reference log-probs (mu = 2, beta > 0)
    and the GRPO loss, shared and plain, from the same samples; truncation masking."""
    _, tok = load(str(tiny_model_path))
    rng = random.Random(0)
    prompts = []
    for i in range(4):
        msgs = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
        prompts.append(Prompt(ids=list(ids), prompt=msgs))
    assert len({len(p.ids) for p in prompts}) > 1

    def reward(completion_ids, **_):
        return [float(sum(t % 3 == 0 for t in ids)) for ids in completion_ids]

    losses = []
    for share in (False, True):
        model = adapted_model(tiny_model_path, kind)
        ref = load(str(tiny_model_path))[0] if kind == "full" else None
        args = GRPOArgs(num_generations=3, num_iterations=2, sampling=SamplingParams(temperature=1.0, max_tokens=7),
                          beta=0.05, loss_type="grpo", share_prefix=share)
        source = make_rollout_source(model, tok, [("r", reward)], args, token_reference(model, ref, 1.0))
        batch = next(source(prompts, 4, loop=True, seed=3))
        assert is_shared(batch) == share
        assert 0 < float(batch["suffix_mask" if share else "mask"].sum()) and "old_logps" in batch and "reference_logps" in batch
        # Move the policy off the sampling policy so the ratios and the clip are not trivial.
        for _, m in model.named_modules():
            if "lora_a" in m:
                m.lora_a = m.lora_a * 1.5
        if kind == "full":
            model.update(tree_map(lambda p: p * 1.01, model.parameters()))
        loss_fn = make_grpo_loss(args)
        losses.append(loss_metrics_grad(loss_fn, model, batch))
    (la, ma, ga), (lb, mb, gb) = losses
    # Masking truncated completions masks the shared rows too (here: every row, none hit EOS in 7 tokens;
    # test_grpo_training checks which rows the plain path masks).
    args.mask_truncated_completions = True
    batch = next(make_rollout_source(model, tok, [("r", reward)], args)(prompts, 4, loop=True, seed=3))
    assert float(batch["suffix_mask"].sum()) == 0.0 and "mask" not in batch
    np.testing.assert_allclose(la.item(), lb.item(), rtol=1e-5, atol=1e-6)
    for k in ma:
        if not k.startswith("time/"):  # wall times differ
            np.testing.assert_allclose(np.array(ma[k]), np.array(mb[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    assert_trees_close(ga, gb)


# ----------------------------------------------------------------------------- the switch


def test_architectures_that_cannot_share_fall_back_with_one_line(tiny_model_path, monkeypatch):
    model = adapted_model(tiny_model_path, "lora")
    assert sharing_problem(model) is None
    assert resolve_prefix_sharing("auto", model, 40.0) == (True, None)
    on, why = resolve_prefix_sharing("auto", model, 5.0)
    assert not on and "average 5.0 tokens" in why
    assert resolve_prefix_sharing(True, model, 5.0) == (True, None)
    assert resolve_prefix_sharing(False, model, 40.0) == (False, None)
    # An attention that ignored the per-row mask (here: plain causal attention) would attend the
    # prompt padding: the probe sees the wrong numbers and turns sharing off.
    monkeypatch.setattr(PrefixCache, "make_mask", lambda self, N, **kw: "causal")
    problem = sharing_problem(model)
    assert problem is not None and "differs" in problem
    on, why = resolve_prefix_sharing(True, model, 40.0)
    assert not on and why.startswith("prefix sharing off: not supported for llama") and "\n" not in why


def test_the_check_catches_a_stopped_gradient_a_crash_a_bad_reference_and_grad_checkpoint(tiny_model_path, monkeypatch):
    model = adapted_model(tiny_model_path, "lora")
    # mx.checkpoint differentiates a layer through its explicit inputs only: the cache would be a constant.
    on, why = resolve_prefix_sharing("auto", model, 40.0, grad_checkpoint=True)
    assert not on and "grad_checkpoint" in why
    # A reference model that cannot share (here: no layers to give caches to) turns sharing off too.
    on, why = resolve_prefix_sharing("auto", model, 40.0, reference_model=nn.Linear(2, 2))
    assert not on and "reference model" in why and "layers" in why
    assert resolve_prefix_sharing("auto", model, 40.0, reference_model=load(str(tiny_model_path))[0]) == (True, None)
    branch = PrefixCache.branch

    def detached(self, rows, lengths):  # right values, no gradient into the prompt
        branch(self, rows, lengths)
        self.keys, self.values = mx.stop_gradient(self.keys), mx.stop_gradient(self.values)

    with monkeypatch.context() as m:
        m.setattr(PrefixCache, "branch", detached)
        assert "backward differs" in sharing_problem(model)
        frozen = load(str(tiny_model_path))[0]
        frozen.freeze()
        assert sharing_problem(frozen) is None  # nothing to train: only the values are compared

    def broken(self, keys, values):
        raise TypeError("unsupported cache\nsecond line")

    monkeypatch.setattr(PrefixCache, "update_and_fetch", broken)
    assert sharing_problem(model) == "its attention layers do not take a shared prompt's cache (TypeError: unsupported cache)"


def test_chunked_projection_temperature_and_entropy_match(tiny_model_path, data_dir):
    """The chunked vocabulary projection and GRPO's tempered per-token log-probs and entropies."""
    from mlx_dpo.compute.logps import get_token_logps
    from mlx_dpo.compute.prefix import shared_logps, shared_token_logps

    data = examples(tiny_model_path, data_dir)
    model = adapted_model(tiny_model_path, "lora")
    group = [data[i] for i in (0, 5, 9)]
    plain, shared = pad_batch(group), pad_batch(group, share_prefix=True)
    w = mx.array(np.linspace(-1, 1, 6).astype(np.float32))
    for chunk in (0, 8):
        f = lambda m: get_batched_logps(m, plain["tokens"], plain["mask"], chunk)[0]  # noqa: E731
        g = lambda m: shared_logps(m, shared, chunk)[0]  # noqa: E731
        np.testing.assert_allclose(np.array(f(model)), np.array(g(model)), rtol=1e-5, atol=1e-4)
        assert_trees_close(nn.value_and_grad(model, lambda m: (f(m) * w).sum())(model)[1],
                           nn.value_and_grad(model, lambda m: (g(m) * w).sum())(model)[1])
        # Per token: gather the plain path's response positions into the shared layout.
        lp, ent = get_token_logps(model, plain["tokens"], 0, 0.7, True, chunk)
        sp, sent = shared_token_logps(model, shared, 0.7, True, chunk)
        mask = np.array(plain["mask"]) > 0
        smask = np.array(shared["suffix_mask"]) > 0
        for r in range(mask.shape[0]):
            np.testing.assert_allclose(np.array(lp)[r][mask[r]], np.array(sp)[r][smask[r]], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(np.array(ent)[r][mask[r]], np.array(sent)[r][smask[r]], rtol=1e-5, atol=1e-4)


def test_training_with_and_without_sharing_gives_the_same_run(tiny_model_path, data_dir, tmp_path, capsys, monkeypatch):
    """The CLI path (compiled step, precomputed reference, validation): the same logged losses (SGD:
    Adam would turn float32-level gradient differences into lr-sized steps on near-zero components)."""
    import mlx_dpo.compute.forward as forward

    calls = []
    traced = forward.shared_logps
    monkeypatch.setattr(forward, "shared_logps", lambda *a, **k: calls.append(1) or traced(*a, **k))
    runs = {}
    for setting in ("false", "true"):
        out = tmp_path / setting
        args = load_config(["--model", str(tiny_model_path), "--data", str(data_dir), "--adapter-path", str(out),
                            "--train", "--iters", "4", "--batch-size", "2", "--steps-per-report", "1",
                            "--steps-per-eval", "4", "--val-batches", "2", "--max-seq-length", "160",
                            "--prefix-sharing", setting, "--precompute-reference", "--optimizer", "sgd", "--learning-rate", "0.05",
                            "--num-layers", "-1"])
        calls.clear()
        run(args)
        assert bool(calls) == (setting == "true")  # the shared path ran (traced once per shape when compiled)
        runs[setting] = [(r["split"], r["step"], r.get("loss", r.get("eval_loss"))) for r in read_metrics(out)]
    assert len(runs["true"]) == len(runs["false"]) >= 5
    assert abs(runs["true"][-1][2] - np.log(2)) > 1e-3  # it trained
    for (s1, i1, l1), (s2, i2, l2) in zip(runs["false"], runs["true"]):
        assert (s1, i1) == (s2, i2)
        np.testing.assert_allclose(l1, l2, rtol=1e-4)
    # On data with short prompts, auto says once why it does not share.
    capsys.readouterr()
    short = tmp_path / "short"
    write_jsonl(short / "train.jsonl", [{"prompt": "Hi.", "chosen": "Good film.", "rejected": "Bad film."}] * 4)
    args = load_config(["--model", str(tiny_model_path), "--data", str(short), "--adapter-path", str(tmp_path / "s"),
                        "--train", "--iters", "1", "--batch-size", "2", "--val-batches", "0", "--num-layers", "-1"])
    run(args)
    lines = [l for l in capsys.readouterr().out.splitlines() if "prefix sharing" in l]
    assert len(lines) == 1 and "auto shares from" in lines[0]
