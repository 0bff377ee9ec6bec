"""Your own loss terms: the three example terms against float64 NumPy, what a term sees against an
independent log-softmax of the model's logits, the shared-prefix path, compile, logging and errors."""

import importlib.util
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlx_dpo.compute.batching import iterate_batches
from mlx_dpo.compute.reference import make_reference, token_reference
from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.data import DataError, build_pairs, load_datasets
from mlx_dpo.lora import main, run
from mlx_dpo.loss_terms import LossTerm, LossTermError, TermInputs, load_loss_terms
from mlx_dpo.toy import preference_records, write_jsonl
from tests.support import ROOT, Recorder, cli_args, make_loss

spec = importlib.util.spec_from_file_location("constraints", ROOT / "examples" / "constraints.py")
constraints = importlib.util.module_from_spec(spec)
spec.loader.exec_module(constraints)


def random_inputs(seed=0, b=5, t=7, columns=None):
    """TermInputs of random log-probs (tokens in (-6, -0.01)) with ragged masks; the NumPy copies."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=(2, b))
    mask = (np.arange(t)[None, None] < lengths[..., None]).astype(np.float64)  # (2, B, T)
    tokens = -rng.uniform(0.01, 6.0, size=(2, b, t)) * mask
    ref_tokens = -rng.uniform(0.01, 6.0, size=(2, b, t)) * mask
    cols = {k: np.asarray(v, np.float64) for k, v in (columns or {}).items()}
    f = lambda a: mx.array(a.astype(np.float32))  # noqa: E731
    inputs = TermInputs(
        policy_chosen=f(tokens[0].sum(-1)), policy_rejected=f(tokens[1].sum(-1)),
        policy_chosen_tokens=f(tokens[0]), policy_rejected_tokens=f(tokens[1]),
        chosen_mask=f(mask[0]), rejected_mask=f(mask[1]),
        chosen_length=f(mask[0].sum(-1)), rejected_length=f(mask[1].sum(-1)),
        reference_chosen=f(ref_tokens[0].sum(-1)), reference_rejected=f(ref_tokens[1].sum(-1)),
        columns={k: f(v) for k, v in cols.items()}, beta=0.1,
    )
    return inputs, dict(tokens=tokens, ref=ref_tokens, mask=mask, columns=cols)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_token", [False, True])
def test_no_chosen_drop_matches_numpy(seed, per_token):
    t, n = random_inputs(seed)
    drop = n["ref"][0].sum(-1) - n["tokens"][0].sum(-1)
    if per_token:
        drop = drop / n["mask"][0].sum(-1)
    want = np.maximum(drop, 0.0)
    got = np.array(constraints.no_chosen_drop(t, per_token=per_token))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (want > 0).any() and (want == 0).any() or seed != 0  # the random draw exercises both sides


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_length_budget_matches_numpy(seed):
    t, n = random_inputs(seed)
    want = np.zeros(5)
    for k in range(2):
        length = n["mask"][k].sum(-1)
        ratio = (n["tokens"][k].sum(-1) - n["ref"][k].sum(-1)) / length
        want += (length > 4) * np.maximum(ratio - 0.05, 0.0)
    got = np.array(constraints.length_budget(t, max_tokens=4, threshold=0.05))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("response", ["rejected", "chosen"])
def test_unsafe_unlikelihood_matches_numpy_and_its_gradient(response):
    flags = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    t, n = random_inputs(3, columns={"unsafe": flags})
    k = 1 if response == "rejected" else 0
    mask = n["mask"][k]
    logp = np.where(mask > 0, n["tokens"][k], -1.0)  # off the mask: any value, multiplied by 0
    per_token = -np.log1p(-np.exp(logp)) * mask
    want = flags * per_token.sum(-1) / mask.sum(-1)
    got = np.array(constraints.unsafe_unlikelihood(t, column="unsafe", response=response))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # d/dlogp of -log(1 - e^logp) is e^logp / (1 - e^logp): every flagged token is pushed down.
    name = f"policy_{response}_tokens"

    def total(x):
        return constraints.unsafe_unlikelihood(TermInputs(**{**vars(t), name: x}), column="unsafe", response=response).sum()

    grad = np.array(mx.grad(total)(getattr(t, name)))
    want_grad = flags[:, None] * mask * np.exp(logp) / (1 - np.exp(logp)) / mask.sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_unsafe_unlikelihood_names_a_missing_column():
    t, _ = random_inputs(0, columns={"other": [0, 1, 0, 1, 0]})
    with pytest.raises(KeyError, match="rejected_unsafe"):
        constraints.unsafe_unlikelihood(t)


# ------------------------------------------------------------------ inside the loss


@pytest.fixture(scope="module")
def lora_model(tiny_model_path):
    model, tok = load(str(tiny_model_path))
    model.freeze()
    mx.random.seed(0)  # LoRA's "A" weights are drawn from MLX's global generator: fix them
    linear_to_lora_layers(model, -1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    # Non-zero LoRA "B" weights: the policy differs from the reference (adapters bypassed).
    rng = np.random.default_rng(0)
    updates = [(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))) for k, v in _lora_b(model)]
    model.load_weights(updates, strict=False)
    return model, tok


def _lora_b(model):
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]


def _numpy_token_logps(logits, tokens):
    """float64 log-softmax of ``logits`` (N, L-1, V) at the next tokens."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None].astype(np.int64), -1)[..., 0]


class Capture:
    """A term that keeps what it saw, the per-token reference included, and returns 0."""

    def __init__(self):
        self.seen = None

    def __call__(self, t):
        self.seen = t
        self.ref_chosen_tokens, self.ref_rejected_tokens = t.reference_chosen_tokens, t.reference_rejected_tokens
        return mx.zeros(t.policy_chosen.shape)


def test_term_inputs_match_an_independent_log_softmax(lora_model, tiny_data_path):
    from mlx_dpo.compute.reference import adapters_disabled

    model, tok = lora_model
    data = load_datasets(str(tiny_data_path), tok, "pairs", 128, splits=("train",))["train"]
    batch = next(iterate_batches(data, 4, shuffle=False))
    cap = Capture()
    terms = [LossTerm("capture", cap, 1.0, {})]
    loss_fn = make_loss("dpo", make_reference(model), beta=0.1, loss_terms=terms, token_reference=token_reference(model, None, 1.0))
    loss, metrics = loss_fn(model, batch)
    plain, _ = make_loss("dpo", make_reference(model), beta=0.1)(model, batch)
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)  # the capture term adds 0
    assert metrics["loss_terms/capture"].item() == 0.0

    tokens, mask = np.array(batch["tokens"]), np.array(batch["mask"], np.float64)
    policy = _numpy_token_logps(model(batch["tokens"][:, :-1]), tokens) * mask
    with adapters_disabled(model):
        reference = _numpy_token_logps(model(batch["tokens"][:, :-1]), tokens) * mask
    start = batch["logits_from"]
    t, b = cap.seen, 4
    assert not np.allclose(policy, reference, atol=1e-3)  # the test can tell policy from reference
    np.testing.assert_allclose(np.array(t.policy_chosen), policy[:b].sum(-1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(t.policy_rejected), policy[b:].sum(-1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(t.reference_chosen), reference[:b].sum(-1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(t.reference_rejected), reference[b:].sum(-1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(t.policy_chosen_tokens), policy[:b, start:], atol=1e-5)
    np.testing.assert_allclose(np.array(t.policy_rejected_tokens), policy[b:, start:], atol=1e-5)
    np.testing.assert_allclose(np.array(cap.ref_chosen_tokens), reference[:b, start:], atol=1e-5)
    np.testing.assert_allclose(np.array(cap.ref_rejected_tokens), reference[b:, start:], atol=1e-5)
    np.testing.assert_array_equal(np.array(t.chosen_mask), mask[:b, start:])
    np.testing.assert_array_equal(np.array(t.rejected_length), mask[b:].sum(-1))


def test_a_term_adds_its_weighted_value_and_its_gradient(lora_model, tiny_data_path):
    import mlx.nn as nn

    model, tok = lora_model
    data = load_datasets(str(tiny_data_path), tok, "pairs", 128, splits=("train",))["train"]
    batch = next(iterate_batches(data, 4, shuffle=False))
    ref = make_reference(model)
    term = LossTerm("no_chosen_drop", constraints.no_chosen_drop, 2.5, {})
    with_term = make_loss("dpo", ref, loss_terms=[term])
    plain = make_loss("dpo", ref)
    loss, metrics = with_term(model, batch)
    base, base_metrics = plain(model, batch)
    pc, rc = np.array(base_metrics["logps/chosen"]), None  # noqa: F841 (means only: recompute per pair)
    from mlx_dpo.compute.forward import sequence_logps

    logps = np.array(sequence_logps(model, batch)[0], np.float64)
    refs = np.array(ref(batch), np.float64)
    want = np.maximum(refs[:4] - logps[:4], 0.0).mean()
    assert want > 0  # the random adapters lowered some chosen log-probs
    assert metrics["loss_terms/no_chosen_drop"].item() == pytest.approx(want, rel=1e-4)
    assert loss.item() == pytest.approx(base.item() + 2.5 * want, rel=1e-5)

    g_term = nn.value_and_grad(model, lambda m, b: with_term(m, b)[0])(model, batch)[1]
    g_plain = nn.value_and_grad(model, lambda m, b: plain(m, b)[0])(model, batch)[1]
    from mlx.utils import tree_flatten

    diff = max(float(mx.abs(a - b).max()) for (_, a), (_, b) in zip(tree_flatten(g_term), tree_flatten(g_plain)))
    assert diff > 1e-6  # the term reaches the adapters


def test_shared_prefix_batches_give_terms_the_same_values(lora_model, tiny_data_path):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model, tok = lora_model
    data = load_datasets(str(tiny_data_path), tok, "pairs", 128, splits=("train",))["train"]
    plain_batch = next(iterate_batches(data, 4, shuffle=False))
    shared_batch = next(iterate_batches(data, 4, shuffle=False, share_prefix=True))
    assert "prefix_tokens" in shared_batch
    terms = [LossTerm("no_chosen_drop", constraints.no_chosen_drop, 1.0, {}),
             LossTerm("length_budget", constraints.length_budget, 1.0, {"max_tokens": 6})]
    loss_fn = make_loss("dpo", make_reference(model), loss_terms=terms)
    (l1, m1), g1 = nn.value_and_grad(model, loss_fn)(model, plain_batch)
    (l2, m2), g2 = nn.value_and_grad(model, loss_fn)(model, shared_batch)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-4)
    for k in ("loss_terms/no_chosen_drop", "loss_terms/length_budget"):
        assert m1[k].item() == pytest.approx(m2[k].item(), rel=1e-4, abs=1e-6)
    for (_, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------ columns


def test_numeric_fields_become_columns(tiny_tokenizer):
    records = preference_records(6, 0)
    for i, r in enumerate(records):
        r["rejected_unsafe"] = i % 2 == 0
        r["score"] = float(i)
    ds, _ = build_pairs(records, tiny_tokenizer, 128, columns=True)
    np.testing.assert_array_equal(ds.fields["column.rejected_unsafe"], [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(ds.fields["column.score"], np.arange(6))
    assert "column.score" not in build_pairs(records, tiny_tokenizer, 128)[0].fields  # only when asked
    records[0]["confidence"] = 0.8  # optional per record: never a column
    assert "column.confidence" not in build_pairs(records, tiny_tokenizer, 128, columns=True)[0].fields
    records[3]["score"] = "high"  # no longer a number in every record: not a column...
    assert "column.score" not in build_pairs(records, tiny_tokenizer, 128, columns=True)[0].fields
    with pytest.raises(DataError, match=r"4.*column 'score'"):  # ...unless another split needs it
        build_pairs(records, tiny_tokenizer, 128, columns=["score"])


def test_every_split_carries_the_train_splits_columns(tiny_tokenizer, tmp_path):
    for split, n, seed in (("train", 8, 0), ("valid", 4, 1), ("test", 4, 2)):
        rows = preference_records(n, seed)
        for r in rows:
            if split != "test":
                r["unsafe"] = 1
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    with pytest.raises(DataError, match=r"test.*line 1.*column 'unsafe'"):
        load_datasets(str(tmp_path), tiny_tokenizer, "pairs", 128, columns=True)


def test_confidence_of_a_dropped_pair_still_counts(tiny_tokenizer):
    records = preference_records(2, 0)
    records[0]["confidence"] = 0.7
    records[0]["rejected"] = records[0]["chosen"]  # dropped: no preference
    ds, stats = build_pairs(records, tiny_tokenizer, 128)
    assert stats["dropped_identical"] == 1 and ds.fields["confidence"].tolist() == [1.0]


def test_one_reference_pass_serves_the_objective_and_the_terms(lora_model, tiny_data_path):
    model, tok = lora_model
    data = load_datasets(str(tiny_data_path), tok, "pairs", 128, splits=("train",))["train"]
    batch = next(iterate_batches(data, 4, shuffle=False))

    def no_summed_reference(batch):
        raise AssertionError("a second reference pass")

    cap = Capture()
    terms = [LossTerm("capture", cap, 1.0, {})]
    loss, _ = make_loss("dpo", no_summed_reference, loss_terms=terms, token_reference=token_reference(model, None, 1.0))(model, batch)
    want, _ = make_loss("dpo", make_reference(model))(model, batch)
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    np.testing.assert_allclose(np.array(cap.ref_chosen_tokens.sum(-1)), np.array(cap.seen.reference_chosen), rtol=1e-5)


@pytest.fixture(scope="module")
def flagged_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("flagged")
    for split, n, seed in (("train", 32, 0), ("valid", 8, 1), ("test", 8, 2)):
        rows = [{**r, "rejected_unsafe": int(i % 3 == 0)} for i, r in enumerate(preference_records(n, seed))]
        write_jsonl(path / f"{split}.jsonl", rows)
    return path


def write_config(folder: Path, terms: str) -> Path:
    (folder / "constraints.py").write_text((ROOT / "examples" / "constraints.py").read_text())
    cfg = folder / "terms.yaml"
    cfg.write_text("loss_terms:\n" + terms)
    return cfg


def test_cli_run_compiles_and_logs_each_term(tiny_model_path, flagged_data, tmp_path):
    cfg = write_config(tmp_path, "  - {fn: constraints.no_chosen_drop, weight: 1.0}\n"
                                 "  - {fn: constraints.unsafe_unlikelihood, weight: 1.0, name: unsafe}\n")
    rec = Recorder()
    run(load_config(["--config", str(cfg)] + cli_args(tiny_model_path, flagged_data, tmp_path / "ad", "--iters", "20")), rec)
    last = rec.train[-1]
    assert last["loss_terms/unsafe"] > 0 and math.isfinite(last["loss_terms/no_chosen_drop"])
    assert "val_loss_terms/unsafe" in rec.val[-1]
    logged = [json.loads(line) for line in (tmp_path / "ad" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_terms/unsafe" in row for row in logged)
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["loss_terms"][1]["name"] == "unsafe"


def test_precomputed_reference_still_gives_per_token_reference(tiny_model_path, tiny_data_path, tmp_path):
    (tmp_path / "ref_terms.py").write_text(
        "import mlx.core as mx\n"
        "def token_floor(t):\n"
        "    return mx.maximum((t.reference_chosen_tokens - t.policy_chosen_tokens).sum(-1), 0.0)\n"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss_terms:\n  - {fn: ref_terms.token_floor, weight: 1.0}\n")
    rec = Recorder()
    run(load_config(["--config", str(cfg)] + cli_args(tiny_model_path, tiny_data_path, tmp_path / "ad", "--iters", "10", "--precompute-reference")), rec)
    assert math.isfinite(rec.train[-1]["loss_terms/token_floor"])
    assert rec.train[-1]["loss_terms/token_floor"] > 0


@pytest.mark.parametrize("body, message", [
    ("def bad(t):\n    raise RuntimeError('boom')\n", "loss term 'bad' raised RuntimeError: boom"),
    ("import mlx.core as mx\ndef bad(t):\n    return mx.zeros((2, 3))\n", "loss term 'bad' returned shape (2, 3)"),
    ("def bad(t):\n    return 1.0\n", "loss term 'bad' returned float, not an MLX array"),
])
def test_a_broken_term_ends_in_one_line_naming_it(tiny_model_path, tiny_data_path, tmp_path, capsys, body, message):
    (tmp_path / "broken.py").write_text(body)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss_terms:\n  - {fn: broken.bad}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(cfg)] + cli_args(tiny_model_path, tiny_data_path, tmp_path / "ad", "--iters", "3"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_non_finite_term_is_named_and_nothing_is_applied(tiny_model_path, tiny_data_path, tmp_path, capsys):
    (tmp_path / "nan_term.py").write_text("import mlx.core as mx\ndef nan_term(t):\n    return mx.log(t.policy_chosen * 0 - 1)\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss_terms:\n  - {fn: nan_term.nan_term}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(cfg)] + cli_args(tiny_model_path, tiny_data_path, tmp_path / "ad", "--iters", "3"))
    assert exit_.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss term 'nan_term' is nan" in err[0], err


def test_term_configuration_errors(tmp_path, tiny_model_path, tiny_data_path):
    (tmp_path / "terms.py").write_text("def a(t):\n    return t.policy_chosen\n")
    terms = load_loss_terms([{"fn": "terms.a"}, {"fn": "terms.a", "weight": 2, "scale": 3}], [tmp_path])
    assert [(t.name, t.weight, t.kwargs) for t in terms] == [("a", 1.0, {}), ("a_2", 2.0, {"scale": 3})]
    with pytest.raises(LossTermError, match="has no 'b' \\(it defines: a\\)"):
        load_loss_terms([{"fn": "terms.b"}], [tmp_path])
    with pytest.raises(LossTermError, match="no module 'nowhere'"):
        load_loss_terms([{"fn": "nowhere.f"}], [tmp_path])
    with pytest.raises(LossTermError, match="weight must be a number"):
        load_loss_terms([{"fn": "terms.a", "weight": "high"}], [tmp_path])
    with pytest.raises(ConfigError, match="invalid value for 'loss_terms'"):
        load_config(["--model", "m", "--data", "d"], overrides={"loss_terms": ["terms.a"]})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss_terms:\n  - {fn: terms.a}\n")
    with pytest.raises(ConfigError, match="paired objectives"):
        run(load_config(["--config", str(cfg)] + cli_args(tiny_model_path, tiny_data_path, tmp_path / "ad", "--loss-type", "sft")))


def test_a_misspelt_term_fails_before_the_model_loads(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss_terms:\n  - {fn: nowhere.floor}\n")
    with pytest.raises(SystemExit):
        main(["--config", str(cfg), "--model", str(tmp_path / "no_model"), "--data", str(tmp_path), "--train"])
    err = capsys.readouterr().err
    assert "loss term 'nowhere.floor': no module 'nowhere'" in err and "no_model" not in err


def test_testing_an_adapter_alone_finds_the_terms_beside_its_training_config(tiny_model_path, tiny_data_path, tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    cfg = write_config(folder, "  - {fn: constraints.no_chosen_drop, weight: 1.0}\n")
    run(load_config(["--config", str(cfg)] + cli_args(tiny_model_path, tiny_data_path, tmp_path / "ad", "--iters", "3")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    metrics = run(load_config(["--model", str(tiny_model_path), "--data", str(tiny_data_path),
                               "--adapter-path", str(tmp_path / "ad"), "--test"]))
    assert "loss_terms/no_chosen_drop" in metrics
