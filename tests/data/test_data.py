"""The data layer: layouts, prompt/response boundaries, lengths and errors."""

import json
import sys

import pytest

from mlx_dpo.data import (
    DataError,
    build_pairs,
    build_sft,
    detect_format,
    load_datasets,
    load_records,
    load_split_records,
    split_implicit_prompt,
    tokenize_pair,
)
from mlx_dpo.toy import preference_records, write_jsonl
from tests.support import NoBosTokenizer, NoTemplateTokenizer


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)



    def encode(self, text, add_special_tokens=True):
        return self._tok.encode(text, add_special_tokens=add_special_tokens)


# ----------------------------------------------------------------- standard


def test_standard_boundaries(tiny_tokenizer):
    tok = tiny_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rec = {
        "prompt": "Write a review of the film.",
        "chosen": " I think the film was great.",
        "rejected": "honestly the film was dull.",
    }
    assert detect_format(rec) == "standard"
    prompt, chosen, rejected = tokenize_pair(rec, tok, "standard")
    # The toy tokenizer adds BOS itself, so the prompt matches its own encoding.
    assert prompt == tok.encode(rec["prompt"]) == [bos] + enc(tok, rec["prompt"])
    assert prompt.count(bos) == 1
    assert chosen == enc(tok, rec["chosen"]) + [eos]
    assert rejected == enc(tok, rec["rejected"]) + [eos]
    for ids in (chosen, rejected):
        assert ids.count(eos) == 1 and ids[-1] == eos
        assert bos not in ids


def test_standard_system_and_eos_in_text(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    rec = {
        "system": "You are a critic.",
        "prompt": "Review the park.",
        "chosen": "the park was lovely.</s>",
        "rejected": "the park was dull.",
    }
    prompt, chosen, rejected = tokenize_pair(rec, tok, detect_format(rec))
    assert prompt == [tok.bos_token_id] + enc(tok, "You are a critic.\n\nReview the park.")
    assert chosen == enc(tok, "the park was lovely.</s>")
    assert chosen.count(eos) == 1 and chosen[-1] == eos
    assert rejected.count(eos) == 1 and rejected[-1] == eos


def test_no_bos_where_tokenizer_adds_none(tiny_tokenizer):
    tok = NoBosTokenizer(tiny_tokenizer)
    rec = {"prompt": "Write a review.", "chosen": "great", "rejected": "awful"}
    prompt, chosen, _ = tokenize_pair(rec, tok, "standard")
    assert prompt == enc(tiny_tokenizer, "Write a review.")
    assert tok.bos_token_id not in prompt
    assert chosen == enc(tiny_tokenizer, "great") + [tok.eos_token_id]


def test_empty_response_is_an_error(tiny_tokenizer):
    rec = {"prompt": "Write a review.", "chosen": "", "rejected": "awful"}
    with pytest.raises(DataError, match="field 'chosen' is empty"):
        tokenize_pair(rec, tiny_tokenizer, "standard")


# ----------------------------------------------------------- conversational


def test_conversational_boundaries(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    msgs = [{"role": "user", "content": "Write a review of the park."}]
    rec = {
        "prompt": msgs,
        "chosen": [{"role": "assistant", "content": "the park was lovely."}],
        "rejected": [{"role": "assistant", "content": "the park was dull."}],
    }
    assert detect_format(rec) == "conversational"
    prompt, chosen, rejected = tokenize_pair(rec, tok, "conversational")
    prompt_text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt == enc(tok, prompt_text)
    assert prompt.count(tok.bos_token_id) == 1
    for ids, key in ((chosen, "chosen"), (rejected, "rejected")):
        content = rec[key][0]["content"]
        assert content in tok.decode(ids)
        assert ids[-1] == eos and ids.count(eos) == 1
        full = tok.apply_chat_template(msgs + rec[key], tokenize=False)
        assert tok.decode(prompt + ids, skip_special_tokens=False) == full.rstrip()


def test_conversational_system_field_becomes_system_message(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "user", "content": "Review the film."}]
    rec = {
        "system": "Be brief.",
        "prompt": msgs,
        "chosen": [{"role": "assistant", "content": "great"}],
        "rejected": [{"role": "assistant", "content": "dull"}],
    }
    prompt, _, _ = tokenize_pair(rec, tok, detect_format(rec))
    with_system = [{"role": "system", "content": "Be brief."}] + msgs
    text = tok.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False)
    assert prompt == enc(tok, text)


def test_messages_need_a_chat_template(tiny_tokenizer):
    rec = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    with pytest.raises(DataError, match="no chat template"):
        tokenize_pair(rec, NoTemplateTokenizer(tiny_tokenizer), "conversational")


# ----------------------------------------------------------------- implicit

HH_PROMPT = "\n\nHuman: What is on the mat?\n\nAssistant:"


def test_implicit_hh_diverging_mid_word(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {
        "chosen": HH_PROMPT + " The cat sat on it.",
        "rejected": HH_PROMPT + " The car went away.",
    }
    assert detect_format(rec) == "implicit"
    prompt, c, r = split_implicit_prompt(rec["chosen"], rec["rejected"])
    assert prompt == HH_PROMPT
    assert prompt.endswith("\n\nAssistant:")
    assert (c, r) == (" The cat sat on it.", " The car went away.")
    prompt_ids, chosen, rejected = tokenize_pair(rec, tok, "implicit")
    assert prompt_ids == [tok.bos_token_id] + enc(tok, HH_PROMPT)
    assert chosen == enc(tok, " The cat sat on it.") + [tok.eos_token_id]
    assert rejected == enc(tok, " The car went away.") + [tok.eos_token_id]


def test_implicit_multi_turn_splits_at_last_shared_assistant_turn():
    shared = (
        "\n\nHuman: hello there.\n\nAssistant: hi, how can I help you today?"
        "\n\nHuman: Review the film.\n\nAssistant:"
    )
    chosen = shared + " The film was great."
    rejected = shared + " The film was awful."
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert prompt == shared
    assert prompt.count("\n\nAssistant:") == 2
    assert (c, r) == (" The film was great.", " The film was awful.")


@pytest.mark.parametrize(
    "prompt",
    [
        "<|user|>\nReview the film.\n<|assistant|>\n",
        "<|im_start|>user\nReview the film.<|im_end|>\n<|im_start|>assistant\n",
        "[INST] Review the film. [/INST]",
        "### Instruction:\nReview the film.\n\n### Response:",
        "Human: Review the film. Assistant:",
    ],
)
def test_implicit_other_markers(prompt):
    chosen, rejected = prompt + " The film was great.", prompt + " The film was awful."
    assert split_implicit_prompt(chosen, rejected) == (
        prompt,
        " The film was great.",
        " The film was awful.",
    )


def test_implicit_without_marker_cuts_on_whitespace():
    chosen = "The weather today is sunny and warm."
    rejected = "The weather today is sultry."
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert prompt == "The weather today is"  # the space goes with the response, as BPEs encode " word"
    assert prompt + c == chosen and prompt + r == rejected
    assert c.startswith(" sunny") and r == " sultry."


def test_implicit_without_any_whitespace_gives_empty_prompt(tiny_tokenizer):
    assert split_implicit_prompt("abcd", "abxy") == ("", "abcd", "abxy")
    prompt, chosen, _ = tokenize_pair({"chosen": "abcd", "rejected": "abxy"}, tiny_tokenizer, "implicit")
    assert prompt == [tiny_tokenizer.bos_token_id]
    assert chosen == enc(tiny_tokenizer, "abcd") + [tiny_tokenizer.eos_token_id]


def test_implicit_message_lists(tiny_tokenizer):
    tok = tiny_tokenizer
    user = {"role": "user", "content": "Review the film."}
    first = [user, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and the park?"}]
    chosen = first + [{"role": "assistant", "content": "the park was lovely."}]
    rejected = first + [{"role": "assistant", "content": "the park was dull."}]
    rec = {"chosen": chosen, "rejected": rejected}
    assert detect_format(rec) == "implicit"
    assert split_implicit_prompt(chosen, rejected) == (first, chosen[3:], rejected[3:])
    prompt, c, _ = tokenize_pair(rec, tok, "implicit")
    text = tok.apply_chat_template(first, add_generation_prompt=True, tokenize=False)
    assert prompt == enc(tok, text)
    assert "the park was lovely." in tok.decode(c)
    assert c.count(tok.eos_token_id) == 1


def test_implicit_message_lists_errors():
    user = {"role": "user", "content": "hi"}
    a = {"role": "assistant", "content": "a"}
    b = {"role": "assistant", "content": "b"}
    with pytest.raises(DataError, match="no messages after"):
        split_implicit_prompt([user, a], [user, a, b])
    with pytest.raises(DataError, match="no prompt"):
        split_implicit_prompt([a], [b])


# ------------------------------------------------------------------ layouts


def test_unknown_layout_lists_fields_and_layouts():
    with pytest.raises(DataError) as e:
        detect_format({"question": "q", "answer_good": "a", "answer_bad": "b"})
    msg = str(e.value)
    for word in ("question", "answer_good", "answer_bad", "standard", "conversational", "implicit"):
        assert word in msg


def test_mismatched_types_are_unknown():
    with pytest.raises(DataError, match="prompt \\(str\\)"):
        detect_format({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"})


def test_mixed_layouts_name_the_line(tmp_path, tiny_tokenizer):
    recs = preference_records(2)
    recs.append({"chosen": HH_PROMPT + " yes", "rejected": HH_PROMPT + " no"})
    write_jsonl(tmp_path / "train.jsonl", recs)
    with pytest.raises(DataError, match="line 3"):
        build_pairs(load_records(tmp_path / "train.jsonl"), tiny_tokenizer, 128)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": oops}\n')
    with pytest.raises(DataError) as e:
        load_records(path)
    assert "line 2" in str(e.value) and "train.jsonl" in str(e.value)


def test_load_records_ignores_trailing_blank_lines(tmp_path):
    recs = preference_records(3)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n  \n")
    assert load_records(path) == recs


# ---------------------------------------------------------- lengths, stats


def test_truncation_and_dropping_counts(tiny_tokenizer):
    tok = tiny_tokenizer
    recs = preference_records(24, seed=3)
    recs[5] = dict(recs[5], prompt="Write a long review of " + "the film and " * 20 + "the park.")
    full = [tokenize_pair(r, tok, "standard") for r in recs]
    max_len = sorted(len(p) + len(c) for p, c, _ in full)[len(full) // 2]

    n_drop = sum(len(p) >= max_len for p, _, _ in full)
    n_trunc = sum(len(p) < max_len and max(len(c), len(r)) + len(p) > max_len for p, c, r in full)
    assert n_drop > 0 and n_trunc > 0  # the setup exercises both paths

    pairs, stats = build_pairs(recs, tok, max_len)
    assert stats == {
        "pairs": len(recs) - n_drop,
        "truncated": n_trunc,
        "dropped_long_prompt": n_drop,
        "dropped_identical": 0,
    }
    kept = [f for f in full if len(f[0]) < max_len]
    for ((c_seq, c_off), (r_seq, r_off)), (p, c, r) in zip(pairs, kept):
        assert c_off == r_off == len(p)
        assert c_seq == (p + c)[:max_len] and r_seq == (p + r)[:max_len]
        assert len(c_seq) <= max_len and len(r_seq) <= max_len


def test_identical_pairs_dropped(tiny_tokenizer):
    recs = preference_records(6)
    recs[2] = dict(recs[2], rejected=recs[2]["chosen"])
    pairs, stats = build_pairs(recs, tiny_tokenizer, 512)
    assert stats["dropped_identical"] == 1
    assert stats["pairs"] == len(pairs) == len(recs) - 1


def test_identical_implicit_transcripts_dropped(tiny_tokenizer):
    recs = [
        {"chosen": HH_PROMPT + " a cat", "rejected": HH_PROMPT + " a dog"},
        {"chosen": HH_PROMPT + " a cat", "rejected": HH_PROMPT + " a cat"},
    ]
    pairs, stats = build_pairs(recs, tiny_tokenizer, 512)
    assert (stats["pairs"], stats["dropped_identical"]) == (1, 1)


# ---------------------------------------------------------------------- sft


def test_sft_text(tiny_tokenizer):
    tok = tiny_tokenizer
    recs = [{"text": "the film was great."}, {"text": "the park was lovely."}]
    examples, stats = build_sft(recs, tok, 512, mask_prompt=False)
    assert stats["examples"] == len(examples) == 2
    for ((tokens, offset),), rec in zip(examples, recs):
        assert tokens == tok.encode(rec["text"]) + [tok.eos_token_id]
        assert offset == 0


def test_sft_text_with_mask_prompt_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError):
        build_sft([{"text": "x"}], tiny_tokenizer, 512, mask_prompt=True)


def test_sft_completions_mask_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"prompt": "Review the film.", "completion": "the film was great."}
    (((tokens, offset),),), _ = build_sft([rec], tok, 512, mask_prompt=True)
    prompt = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True)
    assert offset == len(prompt) > 0
    assert tokens[:offset] == prompt
    assert "the film was great." in tok.decode(tokens[offset:])
    (((_, offset),),), _ = build_sft([rec], tok, 512, mask_prompt=False)
    assert offset == 0


def test_sft_chat_and_renamed_features(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "user", "content": "Review the park."}, {"role": "assistant", "content": "lovely."}]
    (((tokens, offset),),), _ = build_sft([{"conv": msgs}], tok, 512, mask_prompt=True, chat_feature="conv")
    assert tokens == tok.apply_chat_template(msgs)
    assert 0 < offset < len(tokens)
    rec = {"question": "Review the park.", "answer": "lovely."}
    examples, _ = build_sft(
        [rec], tok, 512, mask_prompt=False, prompt_feature="question", completion_feature="answer"
    )
    assert examples[0][0][0] == tokens


def test_sft_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    recs = [{"text": t} for t in ("short.", "the film was great and the park was lovely and superb.")]
    lengths = [len(tok.encode(r["text"])) + 1 for r in recs]
    max_len = min(lengths) + 1
    examples, stats = build_sft(recs, tok, max_len, mask_prompt=False)
    assert stats["truncated"] == sum(n > max_len for n in lengths) > 0
    assert all(len(tokens) <= max_len for ((tokens, _),) in examples)


# ------------------------------------------------------------------ loading


def test_load_split_records_local(tiny_data_path):
    train = load_split_records(str(tiny_data_path), "train")
    assert train == load_records(tiny_data_path / "train.jsonl")
    assert load_split_records(str(tiny_data_path), "nonexistent") is None


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        load_split_records("someone/some-preferences", "train")


def test_load_datasets(tiny_data_path, tiny_tokenizer, capsys):
    out = load_datasets(str(tiny_data_path), tiny_tokenizer, "pairs", 512)
    printed = capsys.readouterr().out
    for split in ("train", "valid", "test"):
        n = len(load_records(tiny_data_path / f"{split}.jsonl"))
        assert len(out[split]) == n
        assert f"{split}: {n} pairs" in printed
        assert all(len(example) == 2 for example in out[split])


def test_load_datasets_missing_split_and_sft(tmp_path, tiny_tokenizer, capsys):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "the film was great."}] * 3)
    out = load_datasets(str(tmp_path), tiny_tokenizer, "sft", 512)
    assert out["valid"] is None and out["test"] is None
    assert len(out["train"]) == 3 and all(len(example) == 1 for example in out["train"])
    assert "train: 3 examples" in capsys.readouterr().out


def test_load_datasets_reports_split_and_line(tmp_path, tiny_tokenizer):
    recs = preference_records(3)
    recs[1] = {"prompt": "x"}
    write_jsonl(tmp_path / "train.jsonl", recs)
    with pytest.raises(DataError, match=r"train.*line 2"):
        load_datasets(str(tmp_path), tiny_tokenizer, "pairs", 512)


def test_sft_drops_examples_whose_masked_prompt_fills_the_length(tiny_tokenizer):
    tok = tiny_tokenizer
    recs = [
        {"prompt": "Review the film.", "completion": "great."},
        {"prompt": "Write a long review of " + "the film and " * 10, "completion": "great."},
    ]
    offsets = [
        len(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True))
        for r in recs
    ]
    max_len = min(offsets) + 2
    examples, stats = build_sft(recs, tok, max_len, mask_prompt=True)
    n_drop = sum(o >= max_len for o in offsets)
    assert stats["dropped_long_prompt"] == n_drop > 0
    assert stats["examples"] == len(examples) == len(recs) - n_drop
    assert all(offset < len(tokens) <= max_len for ((tokens, offset),) in examples)


def test_prompt_exactly_max_length_is_dropped(tiny_tokenizer):
    recs = preference_records(1)
    prompt, chosen, _ = tokenize_pair(recs[0], tiny_tokenizer, "standard")
    _, stats = build_pairs(recs, tiny_tokenizer, len(prompt))
    assert (stats["pairs"], stats["dropped_long_prompt"]) == (0, 1)
    pairs, stats = build_pairs(recs, tiny_tokenizer, len(prompt) + 1)
    assert stats["pairs"] == 1 and stats["truncated"] == 1
    assert pairs[0][0] == (prompt + chosen[:1], len(prompt))


def test_pairs_identical_after_truncation_are_dropped(tiny_tokenizer):
    from mlx_dpo.data import build_pairs

    shared = "the park was lovely and the staff was great and the food was fresh"
    recs = [{"prompt": "Write a review.", "chosen": shared + " indeed.", "rejected": shared + " sadly not."},
            {"prompt": "Write a review.", "chosen": "lovely.", "rejected": "awful."}]
    prompt_len = len(tiny_tokenizer.encode("Write a review."))
    shared_len = len(tiny_tokenizer.encode(shared, add_special_tokens=False))
    examples, stats = build_pairs(recs, tiny_tokenizer, prompt_len + shared_len - 2)
    assert stats["dropped_identical_truncated"] == 1 and stats["pairs"] == 1 and len(examples) == 1
    examples, stats = build_pairs(recs, tiny_tokenizer, 256)
    assert stats["pairs"] == 2 and not stats.get("dropped_identical_truncated")
