"""Prompt datasets for online methods: ids, truncation, columns and errors."""

import json

import pytest

from mlx_dpo.data import (
    DataError,
    Prompt,
    Records,
    build_prompts,
    load_prompt_splits,
    load_records,
)
from tests.support import NoBosTokenizer, NoTemplateTokenizer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def error(tmp_path, tok, records, **kwargs) -> str:
    records = load_records(write_jsonl(tmp_path / "train.jsonl", records))
    with pytest.raises(DataError) as e:
        build_prompts(records, tok, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


# ----------------------------------------------------------------- ids


def test_text_prompt_uses_the_tokenizers_bos_rule(tiny_tokenizer):
    tok = tiny_tokenizer
    [p], stats = build_prompts([{"prompt": "Write a review of the film."}], tok)
    assert p.ids == tok.encode("Write a review of the film.")
    assert p.ids[0] == tok.bos_token_id
    assert p.prompt == "Write a review of the film." and p.columns == {}
    assert stats == {"prompts": 1, "truncated": 0}
    [p], _ = build_prompts([{"prompt": "Write a review."}], NoBosTokenizer(tok))
    assert p.ids == tok.encode("Write a review.", add_special_tokens=False)


def test_conversational_prompt_gets_the_generation_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    [p], _ = build_prompts([{"prompt": CHAT}], tok)
    assert p.ids == list(tok.apply_chat_template(CHAT, add_generation_prompt=True))
    assert p.prompt == CHAT
    [q], _ = build_prompts([{"messages": CHAT}], tok)
    assert q.ids == p.ids and q.prompt == CHAT


def test_prompt_ending_with_assistant_is_continued(tiny_tokenizer):
    tok = tiny_tokenizer
    convo = CHAT + [{"role": "assistant", "content": "The capital is"}]
    [p], _ = build_prompts([{"prompt": convo}], tok)
    expected = tok.apply_chat_template(convo, continue_final_message=True, tokenize=False)
    assert expected.endswith("The capital is")
    assert p.ids == tok.encode(expected, add_special_tokens=False)
    assert p.ids != list(tok.apply_chat_template(convo, add_generation_prompt=True))


def test_long_prompts_keep_their_last_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    long_text = "the film was wonderful and the hotel was awful " * 4
    full = tok.encode(long_text)
    records = [{"prompt": long_text}, {"prompt": "hi"}]
    prompts, stats = build_prompts(records, tok, max_prompt_length=5)
    assert len(full) > 5
    assert prompts[0].ids == full[-5:]
    assert prompts[1].ids == tok.encode("hi")  # short prompts are untouched
    assert stats == {"prompts": 2, "truncated": 1}
    [p], stats = build_prompts(records[:1], tok, max_prompt_length=len(full))
    assert p.ids == full and stats["truncated"] == 0


def test_columns_are_the_union_with_none_for_missing(tiny_tokenizer):
    records = [
        {"prompt": "2+2?", "answer": "4", "level": 1},
        {"prompt": "3+3?", "answer": "6", "tests": ["assert f() == 6"]},
    ]
    prompts, _ = build_prompts(records, tiny_tokenizer)
    assert prompts[0].columns == {"answer": "4", "level": 1, "tests": None}
    assert prompts[1].columns == {"answer": "6", "level": None, "tests": ["assert f() == 6"]}
    assert list(prompts[1].columns) == ["answer", "level", "tests"]


# ----------------------------------------------------------------- errors


def test_missing_prompt_lists_the_fields(tmp_path, tiny_tokenizer):
    message = error(tmp_path, tiny_tokenizer, [{"prompt": "ok"}, {"question": "2+2?", "answer": "4"}])
    assert "train.jsonl: line 2: missing field 'prompt'" in message
    assert "question (str), answer (str)" in message


@pytest.mark.parametrize(
    "record, parts",
    [
        ({"prompt": 3}, ["line 2", "field 'prompt' must be a string or a message list, got int"]),
        ({"prompt": None}, ["line 2", "field 'prompt' is null"]),
        ({"prompt": "   "}, ["line 2", "field 'prompt' is empty"]),
        ({"prompt": []}, ["line 2", "field 'prompt' is an empty message list"]),
        ({"prompt": [{"role": "bot", "content": "hi"}]}, ["line 2", "field 'prompt'[0].role 'bot' is not a known role"]),
        ({"prompt": [{"role": "user", "content": 5}]}, ["line 2", "field 'prompt'[0].content must be a string"]),
        ({"prompt": [{"role": "user"}]}, ["line 2", "field 'prompt'[0] has no 'content'"]),
        ({"prompt": ["hi"]}, ["line 2", "field 'prompt'[0] must be a {role, content} message"]),
        ({"prompt": [{"role": "system", "content": "Be brief."}]}, ["line 2", "ends with a 'system' message"]),
        ({"prompt": [{"role": "user", "content": " "}]}, ["line 2", "field 'prompt' is empty"]),
        ({"messages": CHAT + [{"role": "assistant", "content": "Paris"}]}, ["line 2", "'messages' ends with an assistant"]),
        ({"prompt": "hi", "completions": "x"}, ["line 2", "field 'completions'", "reward function argument"]),
    ],
)
def test_bad_records_name_line_and_field(tmp_path, tiny_tokenizer, record, parts):
    message = error(tmp_path, tiny_tokenizer, [{"prompt": "fine"}, record])
    assert str(tmp_path / "train.jsonl") in message
    for part in parts:
        assert part in message, message


def test_every_record_is_checked_before_tokenizing(tmp_path, tiny_tokenizer):
    calls = []

    class CountingTokenizer(NoBosTokenizer):
        def encode(self, text, add_special_tokens=True):
            calls.append(text)
            return self._tok.encode(text, add_special_tokens=add_special_tokens)

    records = [{"prompt": "first"}, {"prompt": "second"}, {"prompt": 1}]
    message = error(tmp_path, CountingTokenizer(tiny_tokenizer), records)
    assert "line 3" in message
    assert "first" not in calls and "second" not in calls


def test_mixed_prompt_fields_are_an_error(tmp_path, tiny_tokenizer):
    message = error(tmp_path, tiny_tokenizer, [{"prompt": "hi"}, {"messages": CHAT}])
    assert "line 2" in message and "'messages'" in message and "line 1 has it in 'prompt'" in message


def test_message_prompt_needs_a_chat_template(tmp_path, tiny_tokenizer):
    message = error(tmp_path, NoTemplateTokenizer(tiny_tokenizer), [{"prompt": CHAT}])
    assert "line 1" in message and "'prompt'" in message and "no chat template" in message


def test_record_that_is_not_an_object(tiny_tokenizer):
    records = Records([{"prompt": "a"}, ["a"]], source="data.json", unit="record")
    with pytest.raises(DataError, match=r"^data.json: record 2: expected a JSON object, got list$"):
        build_prompts(records, tiny_tokenizer)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_prompt_length_must_be_positive(tiny_tokenizer, bad):
    with pytest.raises(DataError, match="max_prompt_length"):
        build_prompts([{"prompt": "a"}], tiny_tokenizer, max_prompt_length=bad)


# ----------------------------------------------------------------- splits


def test_load_prompt_splits_from_a_folder(tmp_path, tiny_tokenizer, capsys):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "the film " * 20, "answer": "a"}])
    (tmp_path / "valid.json").write_text(json.dumps([{"prompt": "hello", "answer": "c"}]))
    out = load_prompt_splits(str(tmp_path), tiny_tokenizer, max_prompt_length=8)
    assert out["test"] is None
    assert isinstance(out["train"][0], Prompt) and len(out["train"][0].ids) == 8
    assert out["valid"][0].columns == {"answer": "c"}
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["train: 1 prompts (1 cut to their last 8 tokens)", "valid: 1 prompts"]


def test_load_prompt_splits_errors_name_the_file(tmp_path, tiny_tokenizer):
    (tmp_path / "train.json").write_text(json.dumps([{"prompt": "a"}, {"text": "b"}]))
    with pytest.raises(DataError, match=r"train\.json: record 2: missing field 'prompt'"):
        load_prompt_splits(str(tmp_path), tiny_tokenizer, splits=("train",))
    with pytest.raises(DataError, match="unknown hub split key 'dev'"):
        load_prompt_splits(str(tmp_path), tiny_tokenizer, hub_splits={"dev": "x"})
