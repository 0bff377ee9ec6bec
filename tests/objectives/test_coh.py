"""Chain of Hindsight: the sequences, their masks, the loss against float64 NumPy, truncation,
layouts, the generation phrase, and a CLI run."""

import math

import numpy as np
import pytest
from mlx_lm.utils import load

from mlx_dpo.compute.batching import iterate_batches, pad_batch
from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.data import (
    COH_NEGATIVE,
    COH_POSITIVE,
    DataError,
    build_coh,
    build_pairs_tokens,
)
from mlx_dpo.generate import coh_phrases, cut_at_phrase
from mlx_dpo.generate import main as generate_main
from mlx_dpo.lora import run
from mlx_dpo.toy import preference_records
from tests.support import Recorder, cli_args, make_loss


def eos_ids(tok):
    return set(tok.eos_token_ids or ()) | {tok.eos_token_id}


def test_both_orders_with_the_answers_as_the_only_trained_spans(tiny_tokenizer):
    records = preference_records(4, 0)
    ds, stats = build_coh(records, tiny_tokenizer, 256)
    assert stats["pairs"] == 4 and stats["examples"] == 8 and len(ds) == 8
    triples, _ = build_pairs_tokens(records, tiny_tokenizer)
    pos = tiny_tokenizer.encode(COH_POSITIVE, add_special_tokens=False)
    neg = tiny_tokenizer.encode(COH_NEGATIVE, add_special_tokens=False)
    eos = tiny_tokenizer.eos_token_id
    for i, (prompt, chosen, rejected, _) in enumerate(triples):
        assert chosen[-1] == eos and rejected[-1] == eos
        for (tokens, spans), (first_phrase, first, second_phrase, second) in zip(
            (ds[2 * i][0], ds[2 * i + 1][0]),
            ((pos, chosen[:-1], neg, rejected), (neg, rejected[:-1], pos, chosen)),
        ):
            assert tokens == prompt + first_phrase + first + second_phrase + second
            (a1, b1), (a2, b2) = spans
            assert tokens[a1:b1] == first and tokens[a2:b2] == second  # the answers, ending in one EOS
            assert tokens[b1:a2] == second_phrase and tokens[:a1] == prompt + first_phrase


def test_the_mask_covers_exactly_the_answers(tiny_tokenizer):
    ds, _ = build_coh(preference_records(3, 1), tiny_tokenizer, 256)
    batch = pad_batch(list(ds[:4]))
    mask = np.array(batch["mask"])
    for r, ((tokens, spans),) in enumerate(ds[:4]):
        want = np.zeros(mask.shape[1])
        for a, b in spans:
            want[a - 1 : b - 1] = 1  # mask[j] scores target tokens[j + 1]
        np.testing.assert_array_equal(mask[r], want)
        assert mask[r].sum() == sum(b - a for a, b in spans)


def test_coh_loss_is_the_answer_nll_in_float64(tiny_model_path, tiny_tokenizer):
    model, _ = load(str(tiny_model_path))
    ds, _ = build_coh(preference_records(4, 2), tiny_tokenizer, 256)
    batch = next(iterate_batches(ds, 4, shuffle=False))
    loss, metrics = make_loss("coh")(model, batch)
    logits = np.array(model(batch["tokens"][:, :-1]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens = np.array(batch["tokens"])
    picked = np.take_along_axis(logp, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
    mask = np.array(batch["mask"], np.float64)
    want = -(picked * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert metrics["weight"].item() == mask.sum()


def test_truncation_keeps_both_answers(tiny_tokenizer):
    long = " ".join(["the film was wonderful and charming"] * 30)
    records = [{"prompt": "Write a review.", "chosen": long, "rejected": long.replace("wonderful", "dreadful")}]
    ds, stats = build_coh(records, tiny_tokenizer, 64)
    assert stats["truncated"] == 1 and len(ds) == 2
    for ((tokens, spans),) in ds:
        assert len(tokens) <= 64
        (a1, b1), (a2, b2) = spans
        assert b1 - a1 >= 10 and b2 - a2 >= 10 and b2 == len(tokens)
    # A prompt that leaves no room for the answers drops the pair, and says so.
    records = [{"prompt": "word " * 80, "chosen": "good", "rejected": "bad"}]
    ds, stats = build_coh(records, tiny_tokenizer, 64)
    assert len(ds) == 0 and stats["dropped_long_prompt"] == 1


def test_short_pairs_are_not_cut_when_they_fit(tiny_tokenizer):
    records = preference_records(5, 3)
    ds, stats = build_coh(records, tiny_tokenizer, 512)
    assert stats["truncated"] == 0
    triples, _ = build_pairs_tokens(records, tiny_tokenizer)
    for i, (prompt, chosen, rejected, _) in enumerate(triples):
        (tokens, _), = ds[2 * i]
        assert len(tokens) == len(prompt) + len(chosen) - 1 + len(rejected) + len(
            tiny_tokenizer.encode(COH_POSITIVE, add_special_tokens=False)) + len(tiny_tokenizer.encode(COH_NEGATIVE, add_special_tokens=False))


@pytest.mark.parametrize("record", [
    {"prompt": [{"role": "user", "content": "Write a review of the park."}],
     "chosen": [{"role": "assistant", "content": "A lovely park."}],
     "rejected": [{"role": "assistant", "content": "A dull park."}]},
    {"conversations": [{"from": "human", "value": "Write a review of the park."}],
     "chosen": {"from": "gpt", "value": "A lovely park."}, "rejected": {"from": "gpt", "value": "A dull park."}},
    {"chosen": "\n\nHuman: Write a review of the park.\n\nAssistant: A lovely park.",
     "rejected": "\n\nHuman: Write a review of the park.\n\nAssistant: A dull park."},
])
def test_any_preference_layout_builds_chains(tiny_tokenizer, record):
    ds, stats = build_coh([record], tiny_tokenizer, 256)
    assert stats["pairs"] == 1 and len(ds) == 2
    text = tiny_tokenizer.decode(ds[0][0][0])
    assert "lovely" in text and "dull" in text and text.index("lovely") < text.index("dull")
    text = tiny_tokenizer.decode(ds[1][0][0])
    assert text.index("dull") < text.index("lovely")


def test_bad_phrases_and_combinations_are_one_line_errors(tiny_tokenizer):
    with pytest.raises(DataError, match="two different non-empty phrases"):
        build_coh(preference_records(2, 0), tiny_tokenizer, 128, positive="Answer: ", negative=" Answer: ")
    with pytest.raises(ConfigError, match="'coh' trains on one hindsight sequence"):
        load_config(["--model", "m", "--data", "d"], overrides={"loss_type": ["coh", "dpo"]})
    with pytest.raises(ConfigError, match="invalid value for 'coh_positive'"):
        load_config(["--model", "m", "--data", "d"], overrides={"coh_positive": "  "})


def test_generation_phrase_and_cut():
    assert cut_at_phrase("A great film. An unhelpful answer: awful", COH_NEGATIVE) == "A great film."
    assert cut_at_phrase("A great film.", COH_NEGATIVE) == "A great film."
    assert coh_phrases(None) == (COH_POSITIVE, COH_NEGATIVE)


def test_cli_run_learns_and_generate_coh_uses_the_adapter_phrases(tiny_model_path, tiny_data_path, tmp_path, capsys):
    rec = Recorder()
    args = cli_args(tiny_model_path, tiny_data_path, tmp_path / "ad", "--loss-type", "coh", "--test")
    metrics = run(load_config(args, overrides={"coh_positive": "Good: ", "coh_negative": " Bad: "}), rec)
    assert rec.val[-1]["val_loss"] < rec.val[0]["val_loss"] - 0.5
    assert metrics["num_examples"] == 32 and math.isfinite(metrics["ppl"])  # 16 test pairs, both orders
    assert coh_phrases(str(tmp_path / "ad")) == ("Good: ", " Bad: ")
    capsys.readouterr()
    text = generate_main(["--model", str(tiny_model_path), "--adapter-path", str(tmp_path / "ad"),
                          "--prompt", "Write a review of the park.", "--coh", "--max-tokens", "20"])
    assert "Bad:" not in text and text.strip() == capsys.readouterr().out.strip()
