"""Dataset layouts beyond TRL's three (axolotl, Nectar, custom mappings), KTO data,
per-pair confidences, and the file types and hub splits they are read from."""

import json
import sys
import types

import numpy as np
import pytest

from mlx_dpo.data import (
    DATA_FORMATS,
    DATA_OPTION_KEYS,
    LAYOUTS,
    DataError,
    build_kto,
    build_pairs,
    detect_format,
    load_datasets,
    load_split_records,
    tokenize_pair,
)
from mlx_dpo.toy import preference_records, write_jsonl


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def dec(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def text_ids(tok, prompt, *responses):
    """What a text prompt and its responses must tokenize to."""
    return ([tok.bos_token_id] + enc(tok, prompt),) + tuple(enc(tok, r) + [tok.eos_token_id] for r in responses)


def conv_ids(tok, prompt, *responses):
    """What a message-list prompt and its responses must tokenize to (via the conversational layout)."""
    rec = {"prompt": prompt, "chosen": responses[0], "rejected": responses[-1]}
    return tokenize_pair(rec, tok, "conversational")


def only_pair(tok, rec, **kw):
    pairs, stats = build_pairs([rec], tok, 512, **kw)
    assert stats["pairs"] == len(pairs) == 1
    (chosen, c_off), (rejected, r_off) = pairs[0]
    assert c_off == r_off
    return chosen[:c_off], chosen[c_off:], rejected[r_off:]


def test_exported_names():
    assert DATA_FORMATS == (
        "auto", "standard", "conversational", "implicit", "chatml.intel", "argilla", "argilla_chat",
        "icr", "prompt_pairs", "sharegpt", "ultra", "nectar", "custom", "kto",
    )
    assert DATA_OPTION_KEYS == (
        "nectar_pairs", "field_prompt", "field_system", "field_chosen", "field_rejected",
        "field_completion", "field_label", "prompt_format",
    )
    assert set(LAYOUTS) == set(DATA_FORMATS) - {"auto"}


# ------------------------------------------------------------- text layouts


def test_chatml_intel(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"system": "Be kind.", "question": "Review the film.", "chosen": "great", "rejected": "dull"}
    assert detect_format(rec) == "chatml.intel"
    assert only_pair(tok, rec) == text_ids(tok, "Be kind.\n\nReview the film.", "great", "dull")
    assert only_pair(tok, rec, data_format="chatml.intel") == only_pair(tok, rec)


def test_argilla(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"instruction": "Review the park.", "chosen_response": "lovely", "rejected_response": "dull"}
    assert detect_format(rec) == "argilla"
    assert only_pair(tok, rec) == text_ids(tok, "Review the park.", "lovely", "dull")
    with_system = dict(rec, system="Be brief.")
    assert only_pair(tok, with_system, data_format="argilla") == text_ids(
        tok, "Be brief.\n\nReview the park.", "lovely", "dull"
    )


def test_icr(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"system": "Be brief.", "input": "Review the film.", "chosen": "great", "rejected": "dull"}
    assert detect_format(rec) == "icr"
    assert only_pair(tok, rec) == text_ids(tok, "Be brief.\n\nReview the film.", "great", "dull")


def test_prompt_pairs_is_standard(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"prompt": "Review the film.", "chosen": "great", "rejected": "dull"}
    assert detect_format(rec) == "standard"
    assert only_pair(tok, rec, data_format="prompt_pairs") == only_pair(tok, rec, data_format="standard")
    assert only_pair(tok, rec, data_format="prompt_pairs") == text_ids(tok, "Review the film.", "great", "dull")


# -------------------------------------------------------- message layouts


def test_argilla_chat_is_implicit_message_lists(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"chosen": [U("Review the film."), A("great")], "rejected": [U("Review the film."), A("dull")]}
    assert detect_format(rec) == "implicit"
    expected = conv_ids(tok, [U("Review the film.")], [A("great")], [A("dull")])
    assert only_pair(tok, rec, data_format="argilla_chat") == expected
    assert only_pair(tok, rec) == expected
    with pytest.raises(DataError, match="argilla_chat"):
        build_pairs([{"chosen": "a b", "rejected": "a c"}], tok, 512, data_format="argilla_chat")


def H(text):
    return {"from": "human", "value": text}


def G(text):
    return {"from": "gpt", "value": text}


def test_sharegpt_is_conversational_with_from_value_messages(tiny_tokenizer):
    """LLaMA-Factory's and axolotl's ShareGPT pairs: the same ids as the conversational layout."""
    tok = tiny_tokenizer
    rec = {
        "conversations": [{"from": "system", "value": "Be brief."}, H("Review the film."), G("Which one?"), H("The new one.")],
        "chosen": G("great"),
        "rejected": G("dull"),
    }
    assert detect_format(rec) == "sharegpt"
    expected = conv_ids(tok, [S("Be brief."), U("Review the film."), A("Which one?"), U("The new one.")], [A("great")], [A("dull")])
    assert only_pair(tok, rec) == expected
    assert only_pair(tok, rec, data_format="sharegpt") == expected
    aliases = {"conversations": [{"from": "user", "value": "Review the film."}], "chosen": {"from": "assistant", "value": "great"},
               "rejected": {"from": "model", "value": "dull"}, "system": "Be brief."}
    assert only_pair(tok, aliases) == conv_ids(tok, [S("Be brief."), U("Review the film.")], [A("great")], [A("dull")])


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"chosen": G("")}, "field 'chosen'.value is empty"),
        ({"chosen": H("great")}, "field 'chosen'.from is 'human', but a reply comes from the assistant (gpt)"),
        ({"rejected": {"from": "bot", "value": "dull"}}, "field 'rejected'.from 'bot' is not a known speaker"),
        ({"conversations": [H("Review the film."), G("great")]}, "field 'conversations' ends with a 'gpt' turn"),
        ({"conversations": [H("Review the film."), {"from": "human", "value": 3}]}, "field 'conversations'[1].value must be a string, got int"),
        ({"conversations": [H("Review the film."), {"role": "user", "content": "x"}]}, "field 'conversations'[1] must be a ShareGPT {from, value} message"),
        ({"conversations": []}, "field 'conversations' is an empty message list"),
    ],
)
def test_sharegpt_errors_name_the_field(tiny_tokenizer, change, expected):
    good = {"conversations": [H("Review the film.")], "chosen": G("great"), "rejected": G("dull")}
    with pytest.raises(DataError, match="line 2") as e:
        build_pairs([good, {**good, **change}], tiny_tokenizer, 512)
    assert expected in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError) as forced:
        build_pairs([{**good, **change}], tiny_tokenizer, 512, data_format="sharegpt")
    assert expected in str(forced.value)


@pytest.mark.parametrize("full_lists", [True, False])
def test_ultra(tiny_tokenizer, full_lists):
    tok = tiny_tokenizer
    lead = [U("Review the film.")] if full_lists else []
    rec = {
        "system": "Be brief.",
        "prompt": "Review the film.",
        "chosen": lead + [A("the film was great.")],
        "rejected": lead + [A("the film was dull.")],
    }
    assert detect_format(rec) == "ultra"
    prompt, chosen, rejected = only_pair(tok, rec)
    expected = conv_ids(tok, [S("Be brief."), U("Review the film.")], [A("the film was great.")], [A("the film was dull.")])
    assert (prompt, chosen, rejected) == expected
    assert dec(tok, prompt).endswith("<|user|>\nReview the film.</s>\n<|assistant|>\n")
    assert dec(tok, chosen) == "the film was great.</s>"
    assert chosen.count(tok.eos_token_id) == 1 and tok.bos_token_id not in chosen


def test_ultra_lists_must_share_the_user_turn(tiny_tokenizer):
    rec = {"prompt": "q", "chosen": [U("q"), A("a")], "rejected": [U("other"), A("b")]}
    with pytest.raises(DataError, match="line 1: ultra"):
        build_pairs([rec], tiny_tokenizer, 512)


# ------------------------------------------------------------------ nectar

NECTAR = {
    "prompt": "\n\nHuman: Review the film.\n\nAssistant:",
    "answers": [
        {"answer": "it was fine.", "rank": 2, "model": "b"},
        {"answer": "it was great.", "rank": 1, "model": "a"},
        {"answer": "it was dull.", "rank": 4, "model": "d"},
        {"answer": "no idea.", "rank": 3, "model": "c"},
    ],
}


def responses(tok, pairs):
    return [(dec(tok, c[o:]), dec(tok, r[o:])) for (c, o), (r, _) in pairs]


def test_nectar_best_vs_others(tiny_tokenizer):
    tok = tiny_tokenizer
    few = {"prompt": "Review the park.", "answers": [{"answer": "lovely", "rank": 1}]}
    assert detect_format(NECTAR) == "nectar"
    pairs, stats = build_pairs([NECTAR, few], tok, 512)
    assert stats == {
        "pairs": 3, "truncated": 0, "dropped_long_prompt": 0, "dropped_identical": 0,
        "dropped_few_answers": 1, "dropped_tied": 0,
    }
    # hh prompts end in "Assistant:", so each answer follows after a space, as in HH.
    assert responses(tok, pairs) == [
        (" it was great.</s>", " it was fine.</s>"),
        (" it was great.</s>", " no idea.</s>"),
        (" it was great.</s>", " it was dull.</s>"),
    ]
    prompt, chosen = text_ids(tok, NECTAR["prompt"], " it was great.")
    assert pairs[0][0] == (prompt + chosen, len(prompt))


def test_nectar_adjacent(tiny_tokenizer):
    tok = tiny_tokenizer
    pairs, stats = build_pairs([NECTAR], tok, 512, options={"nectar_pairs": "adjacent"})
    assert stats["pairs"] == 3
    assert responses(tok, pairs) == [
        (" it was great.</s>", " it was fine.</s>"),
        (" it was fine.</s>", " no idea.</s>"),
        (" no idea.</s>", " it was dull.</s>"),
    ]


def test_nectar_ties_and_message_prompts(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {
        "prompt": [U("Review the film.")],
        "answers": [{"answer": "great", "rank": 1}, {"answer": "fine", "rank": 2}, {"answer": "ok", "rank": 2}],
    }
    pairs, stats = build_pairs([rec], tok, 512, options={"nectar_pairs": "adjacent"})
    assert (stats["pairs"], stats["dropped_tied"]) == (1, 1)
    (c, off), (r, _) = pairs[0]
    assert (c[:off], c[off:], r[off:]) == conv_ids(tok, [U("Review the film.")], [A("great")], [A("fine")])


def test_nectar_bad_answers_and_option(tiny_tokenizer):
    with pytest.raises(DataError, match=r"line 1: field 'answers'\[1\] must be \{answer: str, rank: number\}"):
        build_pairs([{"prompt": "q", "answers": [{"answer": "a", "rank": 1}, {"answer": "b"}]}], tiny_tokenizer, 512)
    with pytest.raises(DataError, match="nectar_pairs"):
        build_pairs([NECTAR], tiny_tokenizer, 512, options={"nectar_pairs": "all"})


# ------------------------------------------------------------------ custom


def test_custom_mapping_with_prompt_format(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"q": "Is the film good?", "sys": "Be honest.", "good": " Yes.", "bad": " No."}
    options = {
        "field_prompt": "q", "field_system": "sys", "field_chosen": "good", "field_rejected": "bad",
        "prompt_format": "{system}\nQuestion: {prompt}\nAnswer:",
    }
    assert detect_format(rec, options) == "custom"
    expected = text_ids(tok, "Be honest.\nQuestion: Is the film good?\nAnswer:", " Yes.", " No.")
    assert only_pair(tok, rec, options=options) == expected  # auto: a mapping means custom
    assert only_pair(tok, rec, data_format="custom", options=options) == expected
    # Without {system} in the format the system text goes first, as in the standard layout.
    options["prompt_format"] = "Question: {prompt}\nAnswer:"
    assert only_pair(tok, rec, options=options) == text_ids(
        tok, "Be honest.\n\nQuestion: Is the film good?\nAnswer:", " Yes.", " No."
    )


def test_custom_defaults_messages_and_implicit(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"prompt": "Review the film.", "chosen": "great", "rejected": "dull"}
    assert only_pair(tok, rec, data_format="custom") == text_ids(tok, "Review the film.", "great", "dull")
    conv = {"ask": [U("Review the film.")], "yes": [A("great")], "no": [A("dull")]}
    opts = {"field_prompt": "ask", "field_chosen": "yes", "field_rejected": "no"}
    assert only_pair(tok, conv, options=opts) == conv_ids(tok, [U("Review the film.")], [A("great")], [A("dull")])
    # No prompt field (and none named): the two transcripts share it.
    transcripts = {"good": [U("Review the film."), A("great")], "bad": [U("Review the film."), A("dull")]}
    opts = {"field_chosen": "good", "field_rejected": "bad"}
    assert only_pair(tok, transcripts, options=opts) == conv_ids(tok, [U("Review the film.")], [A("great")], [A("dull")])


def test_custom_errors(tiny_tokenizer):
    tok = tiny_tokenizer
    with pytest.raises(DataError, match=r"line 1: .*'custom'.*\{q\?, good, bad, system\?\}"):
        build_pairs([{"q": "x", "chosen": "a", "rejected": "b"}], tok, 512,
                    options={"field_prompt": "q", "field_chosen": "good", "field_rejected": "bad"})
    with pytest.raises(DataError, match="missing field 'q'"):
        build_pairs([{"chosen": "a", "rejected": "b"}], tok, 512, options={"field_prompt": "q"})
    with pytest.raises(DataError, match=r"must use \{prompt\}"):
        build_pairs([], tok, 512, options={"prompt_format": "Question: {question}"})
    with pytest.raises(DataError, match="not a valid format"):
        build_pairs([], tok, 512, options={"prompt_format": "Question: {prompt"})
    with pytest.raises(DataError, match="unknown data option"):
        build_pairs([], tok, 512, options={"field_answer": "a"})


# -------------------------------------------------------------- confidence


def test_confidence_aligned_after_drops(tiny_tokenizer):
    tok = tiny_tokenizer
    recs = preference_records(5, seed=1)
    recs[0]["confidence"] = 0.9
    recs[1] = dict(recs[1], rejected=recs[1]["chosen"], confidence=0.6)  # dropped: identical
    recs[2]["confidence"] = 0.7
    recs[3] = dict(recs[3], prompt="Write a long review of " + "the film and " * 40, confidence=0.55)  # too long
    # recs[4] has none: 1.0
    prompt_len = len(tokenize_pair(recs[3], tok, "standard")[0])
    max_len = min(prompt_len, 100)
    assert all(len(tokenize_pair(r, tok, "standard")[0]) < max_len for r in (recs[0], recs[2], recs[4]))
    pairs, stats = build_pairs(recs, tok, max_len)
    assert (stats["pairs"], stats["dropped_identical"], stats["dropped_long_prompt"]) == (3, 1, 1)
    conf = pairs.fields["confidence"]
    assert conf.dtype == np.float32 and conf.shape == (3,)
    np.testing.assert_allclose(conf, [0.9, 0.7, 1.0])


def test_confidence_only_when_given_and_checked(tiny_tokenizer):
    tok = tiny_tokenizer
    pairs, _ = build_pairs(preference_records(3), tok, 512)
    assert "confidence" not in pairs.fields
    nectar, _ = build_pairs([dict(NECTAR, confidence=0.75)], tok, 512)
    np.testing.assert_allclose(nectar.fields["confidence"], [0.75] * 3)
    for bad in (0.4, 1.5, True, "0.9"):
        recs = preference_records(3)
        recs[2]["confidence"] = bad
        with pytest.raises(DataError, match="line 3: field 'confidence'"):
            build_pairs(recs, tok, 512)


# --------------------------------------------------------------------- KTO


def kto_records(n=5):
    return [
        {"prompt": f"Review item {i}.", "completion": f"answer number {i}.", "label": i % 2 == 0}
        for i in range(n)
    ]


def completions_of(ds):
    return [a[o:] for (a, o), _ in ds]


def test_kto_text_examples_and_kl_partners(tiny_tokenizer):
    tok = tiny_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    recs = kto_records(5)
    assert detect_format(recs[0]) == "kto"
    ds, stats = build_kto(recs, tok, 512)
    assert stats == {"examples": 5, "desirable": 3, "undesirable": 2, "truncated": 0, "dropped_long_prompt": 0}
    np.testing.assert_array_equal(ds.fields["label"], np.array([1, 0, 1, 0, 1], dtype=np.float32))
    assert ds.fields["label"].dtype == np.float32
    completions = completions_of(ds)
    partners = []
    for i, (rec, ((seq, off), (kl, kl_off))) in enumerate(zip(recs, ds)):
        prompt, completion = text_ids(tok, rec["prompt"], rec["completion"])
        assert (seq, off) == (prompt + completion, len(prompt))
        assert seq.count(bos) == 1 and seq[0] == bos and seq.count(eos) == 1 and seq[-1] == eos
        # The KL row: the same prompt with another example's completion.
        assert kl_off == off and kl[:kl_off] == prompt
        j = completions.index(kl[kl_off:])
        assert j != i
        partners.append(j)
    # The partners follow one cycle through all examples: every completion is used once.
    assert sorted(partners) == list(range(5))
    seen, i = set(), 0
    while i not in seen:
        seen.add(i)
        i = partners[i]
    assert len(seen) == 5
    again, _ = build_kto(recs, tok, 512)
    assert list(again) == list(ds)  # deterministic for a seed
    others = [build_kto(recs, tok, 512, seed=s)[0] for s in range(1, 6)]
    assert any(list(o) != list(ds) for o in others)


@pytest.mark.parametrize("key", ["question", "instruction", "input"])
def test_kto_axolotl_style_prompts(tiny_tokenizer, key):
    tok = tiny_tokenizer
    recs = [
        {"system": "Be brief.", key: "Review the film.", "completion": "great", "label": True},
        {"system": "Be brief.", key: "Review the park.", "completion": "dull", "label": False},
    ]
    assert detect_format(recs[0]) == "kto"
    ds, stats = build_kto(recs, tok, 512)
    assert (stats["desirable"], stats["undesirable"]) == (1, 1)
    prompt, completion = text_ids(tok, "Be brief.\n\nReview the film.", "great")
    assert ds[0][0] == (prompt + completion, len(prompt))
    assert ds[0][1] == (prompt + text_ids(tok, "x", "dull")[1], len(prompt))


def test_kto_conversational(tiny_tokenizer):
    tok = tiny_tokenizer
    recs = [
        {"prompt": [U("Review the film.")], "completion": [A("great")], "label": True},
        {"prompt": [U("Review the park.")], "completion": [A("dull")], "label": False},
    ]
    ds, _ = build_kto(recs, tok, 512)
    prompt, great, _ = conv_ids(tok, [U("Review the film.")], [A("great")], [A("great")])
    _, dull, _ = conv_ids(tok, [U("Review the park.")], [A("dull")], [A("dull")])
    assert ds[0] == ((prompt + great, len(prompt)), (prompt + dull, len(prompt)))
    assert prompt.count(tok.bos_token_id) == 1 and great.count(tok.eos_token_id) == 1


def test_kto_from_pairs(tiny_tokenizer):
    tok = tiny_tokenizer
    recs = preference_records(3, seed=2)
    recs.append(dict(recs[0], rejected=recs[0]["chosen"]))  # no preference: skipped
    ds, stats = build_kto(recs, tok, 512)
    assert stats == {
        "examples": 6, "desirable": 3, "undesirable": 3, "truncated": 0, "dropped_long_prompt": 0,
        "dropped_identical": 1,
    }
    np.testing.assert_array_equal(ds.fields["label"], [1, 0, 1, 0, 1, 0])
    for k, rec in enumerate(recs[:3]):
        prompt, chosen, rejected = tokenize_pair(rec, tok, "standard")
        assert ds[2 * k][0] == (prompt + chosen, len(prompt))
        assert ds[2 * k + 1][0] == (prompt + rejected, len(prompt))
    # Nectar: each answer once per label it gets.
    ds, stats = build_kto([NECTAR, dict(NECTAR, prompt="\n\nHuman: Review the park.\n\nAssistant:")], tok, 512)
    assert (stats["desirable"], stats["undesirable"]) == (2, 6)


def test_kto_custom_mapping_and_forced_layouts(tiny_tokenizer):
    tok = tiny_tokenizer
    recs = [{"q": f"Review item {i}.", "text": f"answer {i}", "good": i == 0} for i in range(3)]
    opts = {"field_prompt": "q", "field_completion": "text", "field_label": "good", "prompt_format": "Q: {prompt}\nA:"}
    ds, stats = build_kto(recs, tok, 512, options=opts)
    assert (stats["desirable"], stats["undesirable"]) == (1, 2)
    prompt, completion = text_ids(tok, "Q: Review item 0.\nA:", "answer 0")
    assert ds[0][0] == (prompt + completion, len(prompt))
    # A forced paired layout also reads its unpaired variant.
    icr = [{"input": f"Review item {i}.", "completion": f"answer {i}", "label": bool(i)} for i in range(2)]
    ds, _ = build_kto(icr, tok, 512, data_format="icr")
    assert ds[1][0][0] == sum(text_ids(tok, "Review item 1.", "answer 1"), [])
    with pytest.raises(DataError, match=r"line 1: missing field 'question' \(data_format 'chatml.intel', unpaired"):
        build_kto(icr, tok, 512, data_format="chatml.intel")


def test_kto_lengths_and_errors(tiny_tokenizer):
    tok = tiny_tokenizer
    recs = kto_records(4)
    recs[1]["prompt"] = "Write a long review of " + "the film and " * 30
    long_prompt = len(text_ids(tok, recs[1]["prompt"])[0])
    short = len(text_ids(tok, recs[0]["prompt"])[0])
    max_len = short + 2
    assert long_prompt >= max_len
    ds, stats = build_kto(recs, tok, max_len)
    assert (stats["examples"], stats["dropped_long_prompt"]) == (3, 1)
    assert stats["truncated"] == 3 and all(len(s) <= max_len for ex in ds for s, _ in ex)
    np.testing.assert_array_equal(ds.fields["label"], [1, 1, 0])
    with pytest.raises(DataError, match="at least 2 examples"):
        build_kto(kto_records(1), tok, 512)
    bad = kto_records(2)
    bad[1]["label"] = "yes"
    with pytest.raises(DataError, match="line 2: field 'label' must be true or false"):
        build_kto(bad, tok, 512)
    with pytest.raises(DataError, match="line 3: .*all records must share one layout"):
        build_kto(kto_records(2) + preference_records(1), tok, 512)


def test_unpaired_records_need_kto(tiny_tokenizer):
    with pytest.raises(DataError, match="line 1: unpaired.*loss_type kto"):
        build_pairs(kto_records(2), tiny_tokenizer, 512)
    with pytest.raises(DataError, match="loss_type kto"):
        build_pairs(kto_records(2), tiny_tokenizer, 512, data_format="kto")


# ----------------------------------------------------- detection, forcing


def test_undetectable_layout_lists_fields_and_all_layouts(tiny_tokenizer):
    rec = {"query": "q", "good": "a", "bad": ["b"], "score": 3}
    with pytest.raises(DataError) as e:
        build_pairs([rec], tiny_tokenizer, 512)
    msg = str(e.value)
    assert "line 1" in msg
    for seen in ("query (str)", "good (str)", "bad (list)", "score (int)"):
        assert seen in msg
    for name in DATA_FORMATS[1:]:
        assert name in msg
    for field in ("question", "chosen_response", "answers", "completion", "field_prompt", "confidence"):
        assert field in msg


def test_instruction_without_argilla_fields_is_not_implicit():
    with pytest.raises(DataError, match="unrecognised"):
        detect_format({"instruction": "Review the film.", "chosen": "a b", "rejected": "a c"})


def test_forced_format_mismatch_names_the_line_and_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    recs = preference_records(3)
    with pytest.raises(DataError, match=r"line 1: record does not match data_format 'argilla' \{instruction"):
        build_pairs(recs, tok, 512, data_format="argilla")
    recs[1] = {"question": "x", "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match=r"line 2: missing field 'prompt' \(data_format 'standard': prompt, chosen, rejected\)"):
        build_pairs(recs, tok, 512, data_format="standard")
    with pytest.raises(DataError, match="unknown data_format"):
        build_pairs(recs, tok, 512, data_format="alpaca")


def test_forcing_picks_one_reading(tiny_tokenizer):
    tok = tiny_tokenizer
    # Both a standard and a chatml.intel record: forcing decides which prompt is used.
    rec = {"prompt": "Review the film.", "question": "Review the park.", "chosen": "great", "rejected": "dull"}
    assert detect_format(rec) == "standard"
    assert only_pair(tok, rec, data_format="chatml.intel") == text_ids(tok, "Review the park.", "great", "dull")
    # Implicit transcripts forced as conversational do not match.
    transcripts = {"chosen": [U("hi"), A("a")], "rejected": [U("hi"), A("b")]}
    with pytest.raises(DataError, match="'conversational'"):
        build_pairs([transcripts], tok, 512, data_format="conversational")


# ------------------------------------------------------------ files, hub


def test_json_list_and_json_lines_files(tmp_path, tiny_tokenizer):
    recs = preference_records(4)
    (tmp_path / "train.json").write_text(json.dumps(recs, indent=2))
    (tmp_path / "valid.json").write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    assert load_split_records(str(tmp_path), "train") == recs
    assert load_split_records(str(tmp_path), "valid") == recs[:2]
    assert load_split_records(str(tmp_path), "test") is None
    out = load_datasets(str(tmp_path), tiny_tokenizer, "pairs", 512)
    assert (len(out["train"]), len(out["valid"]), out["test"]) == (4, 2, None)
    (tmp_path / "test.json").write_text('[{"prompt": "a"},\n oops]')
    with pytest.raises(DataError, match="test.json: line 2: malformed JSON"):
        load_split_records(str(tmp_path), "test")
    (tmp_path / "test.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="record 1: expected a JSON object"):
        load_split_records(str(tmp_path), "test")
    write_jsonl(tmp_path / "train.jsonl", recs)
    with pytest.raises(DataError, match="several files"):
        load_split_records(str(tmp_path), "train")


def test_parquet_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    recs = [
        {"prompt": [U("Review the film.")], "chosen": [A("great")], "rejected": [A("dull")], "confidence": 0.8},
        {"prompt": [U("Review the park.")], "chosen": [A("lovely")], "rejected": [A("dull")], "confidence": 0.9},
    ]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "train.parquet")
    assert load_split_records(str(tmp_path), "train") == recs


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        load_split_records(str(tmp_path), "train")


@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in for the datasets package serving in-memory splits."""
    hub = {}
    loaded = []

    def get_dataset_split_names(name):
        return list(hub[name])

    def load_dataset(name, split):
        loaded.append(split)
        base, _, rest = split.partition("[")
        rows = hub[name][base]
        return rows[: int(rest.strip(":]"))] if rest else rows

    module = types.SimpleNamespace(get_dataset_split_names=get_dataset_split_names, load_dataset=load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", module)
    return hub, loaded


def test_hub_split_names(fake_hub, tiny_tokenizer):
    hub, loaded = fake_hub
    recs = preference_records(6)
    hub["me/prefs"] = {"train_prefs": recs, "test_prefs": recs[:2], "test": recs[:3]}
    assert load_split_records("me/prefs", "train") is None
    assert load_split_records("me/prefs", "valid") == recs[:3]  # validation, valid, then test
    assert load_split_records("me/prefs", "train", train_split="train_prefs[:4]") == recs[:4]
    with pytest.raises(DataError, match="no split 'validation'.*train_prefs"):
        load_split_records("me/prefs", "valid", valid_split="validation")
    hub["me/other"] = {"train": recs, "validation": recs[:1], "valid": recs[:2]}
    assert load_split_records("me/other", "valid") == recs[:1]
    loaded.clear()
    out = load_datasets(
        "me/prefs", tiny_tokenizer, "pairs", 512,
        hub_splits={"train_split": "train_prefs", "valid_split": "test_prefs", "test_split": "test_prefs"},
    )
    assert loaded == ["train_prefs", "test_prefs", "test_prefs"]
    assert [len(out[s]) for s in ("train", "valid", "test")] == [6, 2, 2]
    out = load_datasets("me/prefs", tiny_tokenizer, "pairs", 512, splits=("train",), hub_splits={"train": "test"})
    assert len(out["train"]) == 3


def test_load_datasets_kto_and_options(tmp_path, tiny_tokenizer, capsys):
    write_jsonl(tmp_path / "train.jsonl", kto_records(4))
    out = load_datasets(str(tmp_path), tiny_tokenizer, "kto", 512, splits=("train",))
    assert len(out["train"]) == 4 and all(len(ex) == 2 for ex in out["train"])
    np.testing.assert_array_equal(out["train"].fields["label"], [1, 0, 1, 0])
    assert "train: 4 examples (2 desirable, 2 undesirable)" in capsys.readouterr().out
    write_jsonl(tmp_path / "train.jsonl", [NECTAR] * 2)
    out = load_datasets(str(tmp_path), tiny_tokenizer, "pairs", 512, splits=("train",), options={"nectar_pairs": "adjacent"})
    assert len(out["train"]) == 6
    with pytest.raises(DataError, match=r"train.jsonl: line 1: record does not match data_format 'ultra'"):
        load_datasets(str(tmp_path), tiny_tokenizer, "pairs", 512, splits=("train",), data_format="ultra")
