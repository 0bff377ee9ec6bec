"""Data validation at load time: every problem is one line naming the file, the
line (``record N`` in a JSON list, ``row N`` in a table or hub split) and the field."""

import json
import shutil
import subprocess
import sys
import time
import types

import pytest

from mlx_dpo.data import DataError, build_pairs, load_datasets
from mlx_dpo.toy import preference_records

GOOD = {"prompt": "Review the film.", "chosen": "the film was great.", "rejected": "the film was dull."}


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


CHAT = {"prompt": [U("Review the film.")], "chosen": [A("great")], "rejected": [A("dull")]}
KTO = [
    {"prompt": "Review the film.", "completion": "the film was great.", "label": True},
    {"prompt": "Review the park.", "completion": "the park was dull.", "label": False},
]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """``data/`` in the working directory, so messages name ``data/train.jsonl``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def write(data_dir, records, name="train.jsonl"):
    lines = (r if isinstance(r, str) else json.dumps(r) for r in records)
    (data_dir / name).write_text("".join(line + "\n" for line in lines))


def load_error(tokenizer, kind="pairs", **kwargs) -> str:
    with pytest.raises(DataError) as e:
        load_datasets("data", tokenizer, kind, 512, splits=("train",), **kwargs)
    message = str(e.value)
    assert "\n" not in message and message.strip() == message, "one line"
    return message


def assert_names(message, where, field=None):
    assert message.startswith(f"{where}: "), message
    if field is not None:
        assert f"field {field!r}" in message, message


# 1 ------------------------------------------------------------ malformed JSON


def test_malformed_json_names_file_and_line(data_dir, tiny_tokenizer):
    write(data_dir, [GOOD, GOOD, '{"prompt": "x", "chosen": oops}'])
    message = load_error(tiny_tokenizer)
    assert_names(message, "data/train.jsonl: line 3")
    assert "malformed JSON" in message
    (data_dir / "train.jsonl").unlink()
    (data_dir / "train.json").write_text('[\n{"prompt": "a"},\n oops\n]')
    assert_names(load_error(tiny_tokenizer), "data/train.json: line 3")


# 2 ------------------------------------------------------ missing / empty field


def test_missing_field_names_the_layout_fields(data_dir, tiny_tokenizer):
    recs = preference_records(7)
    del recs[6]["rejected"]
    write(data_dir, recs)
    message = load_error(tiny_tokenizer)
    assert message == "data/train.jsonl: line 7: missing field 'rejected' (layout standard: prompt, chosen, rejected)"
    assert "Known layouts" not in message


def test_empty_and_whitespace_fields(data_dir, tiny_tokenizer):
    for value, line in (("", 2), ("  \n\t", 4)):
        recs = preference_records(4)
        recs[line - 1]["chosen"] = value
        write(data_dir, recs)
        message = load_error(tiny_tokenizer)
        assert_names(message, f"data/train.jsonl: line {line}", "chosen")
        assert "empty" in message


def test_missing_field_in_a_json_list_and_a_forced_layout(data_dir, tiny_tokenizer):
    recs = preference_records(3)
    del recs[2]["prompt"]
    (data_dir / "train.json").write_text(json.dumps(recs, indent=2))
    message = load_error(tiny_tokenizer)
    assert message == "data/train.json: record 3: missing field 'prompt' (layout standard: prompt, chosen, rejected)"
    message = load_error(tiny_tokenizer, data_format="standard")
    assert_names(message, "data/train.json: record 3", "prompt")
    assert "data_format 'standard'" in message


def test_unrecognisable_first_record_keeps_the_full_list(data_dir, tiny_tokenizer):
    write(data_dir, [{"query": "q", "good": "a"}, GOOD])
    message = load_error(tiny_tokenizer)
    assert_names(message, "data/train.jsonl: line 1")
    assert "unrecognised" in message and "Known layouts" in message and "query (str)" in message


# 3 ------------------------------------------------------------- wrong types


def test_non_string_text_field(data_dir, tiny_tokenizer):
    recs = preference_records(3)
    recs[1]["chosen"] = 5
    write(data_dir, recs)
    message = load_error(tiny_tokenizer)
    assert_names(message, "data/train.jsonl: line 2", "chosen")
    assert "field 'chosen' must be a string, got int" in message
    # The first record too: read as the layout it comes closest to.
    write(data_dir, recs[1:])
    assert_names(load_error(tiny_tokenizer), "data/train.jsonl: line 1", "chosen")


def test_non_string_message_content(data_dir, tiny_tokenizer):
    bad = dict(CHAT, prompt=[U("Review the film."), {"role": "user", "content": [{"type": "text", "text": "x"}]}])
    write(data_dir, [CHAT, CHAT, bad])
    message = load_error(tiny_tokenizer)
    assert message == "data/train.jsonl: line 3: field 'prompt'[1].content must be a string, got list"


# 4 --------------------------------------------------------------- messages


@pytest.mark.parametrize(
    "message, expected",
    [
        ({"role": "human", "content": "hi"}, "field 'chosen'[0].role 'human' is not a known role"),
        ("great", "field 'chosen'[0] must be a {role, content} message, got str"),
        ({"content": "hi"}, "field 'chosen'[0] has no 'role'"),
        ({"role": "assistant"}, "field 'chosen'[0] has no 'content'"),
        ({"from": "gpt", "value": "hi"}, "field 'chosen'[0] is a ShareGPT {from, value} message"),
    ],
)
def test_bad_messages_name_field_and_index(data_dir, tiny_tokenizer, message, expected):
    write(data_dir, [CHAT, dict(CHAT, chosen=[message])])
    message = load_error(tiny_tokenizer)
    assert_names(message, "data/train.jsonl: line 2")
    assert expected in message


def test_known_roles_load(data_dir, tiny_tokenizer):
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        U("Review the film."),
        {"role": "assistant", "content": "", "tool_calls": [{"name": "lookup"}]},
        {"role": "tool", "content": "rating: 5"},
    ]
    write(data_dir, [dict(CHAT, prompt=prompt)])
    out = load_datasets("data", tiny_tokenizer, "pairs", 512, splits=("train",))
    assert len(out["train"]) == 1


# 5 ------------------------------------------------------------ mixed layouts


def test_mixed_layouts(data_dir, tiny_tokenizer):
    recs = preference_records(2) + [{"question": "Review the park.", "chosen": "lovely", "rejected": "dull"}]
    write(data_dir, recs)
    message = load_error(tiny_tokenizer)
    assert_names(message, "data/train.jsonl: line 3")
    assert "chatml.intel layout (question, chosen, rejected), but line 1 is standard" in message
    assert "all records must share one layout" in message


# 6 --------------------------------------------------------- no chat template


@pytest.fixture(scope="module")
def no_template_tokenizer(tiny_model_path, tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    path = tmp_path_factory.mktemp("no_template") / "model"
    shutil.copytree(tiny_model_path, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(path)
    assert not tokenizer.has_chat_template
    return tokenizer


def test_messages_without_a_chat_template(data_dir, no_template_tokenizer):
    write(data_dir, [CHAT] * 3)
    message = load_error(no_template_tokenizer)
    assert message == (
        "data/train.jsonl: line 1: field 'prompt' is a message list, but the tokenizer of this model has no chat template"
    )
    write(data_dir, [{"messages": [U("Review the film."), A("great")]}] * 2)
    message = load_error(no_template_tokenizer, "sft")
    assert_names(message, "data/train.jsonl: line 1", "messages")
    assert message.count("chat template") == 1
    # Text records need no template.
    write(data_dir, preference_records(2))
    assert len(load_datasets("data", no_template_tokenizer, "pairs", 512, splits=("train",))["train"]) == 2


# 7 ------------------------------------------------------- not a JSON object


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ("7", "int"), ('"text"', "str"), ("null", "null")])
def test_record_that_is_not_an_object(data_dir, tiny_tokenizer, line, kind):
    write(data_dir, [GOOD, line, GOOD])
    message = load_error(tiny_tokenizer)
    assert message == f"data/train.jsonl: line 2: expected a JSON object, got {kind}"


def test_json_list_entry_that_is_not_an_object(data_dir, tiny_tokenizer):
    (data_dir / "train.json").write_text(json.dumps([GOOD, [1], GOOD]))
    assert load_error(tiny_tokenizer) == "data/train.json: record 2: expected a JSON object, got list"


# 8 ---------------------------------------------------------------------- SFT


@pytest.mark.parametrize(
    "records, field",
    [
        ([{"text": "the film was great."}, {"text": "fine."}, {"body": "the park."}], "text"),
        ([{"messages": [U("Review the film."), A("great")]}, {"msgs": []}, {"messages": []}], "messages"),
        ([{"prompt": "Review the film.", "completion": "great"}, {"prompt": "x", "completion": "y"}, {"prompt": "x"}], "completion"),
    ],
)
def test_sft_missing_field_in_a_later_record(data_dir, tiny_tokenizer, records, field):
    write(data_dir, records)
    message = load_error(tiny_tokenizer, "sft")
    line = 2 if field == "messages" else 3
    assert_names(message, f"data/train.jsonl: line {line}", field)
    assert message.startswith(f"data/train.jsonl: line {line}: missing field {field!r}")


def test_sft_bad_values(data_dir, tiny_tokenizer):
    write(data_dir, [{"text": "the film was great."}, {"text": "   "}])
    assert_names(load_error(tiny_tokenizer, "sft"), "data/train.jsonl: line 2", "text")
    write(data_dir, [{"messages": [U("hi"), A("yo")]}, {"messages": [U("hi"), {"role": "bot", "content": "x"}]}])
    message = load_error(tiny_tokenizer, "sft")
    assert message.startswith("data/train.jsonl: line 2: field 'messages'[1].role 'bot'")
    write(data_dir, [{"unknown": "x"}])
    message = load_error(tiny_tokenizer, "sft")
    assert_names(message, "data/train.jsonl: line 1")
    assert "unknown (str)" in message


# 9 ---------------------------------------------------------------- KTO label


@pytest.mark.parametrize("label", ["yes", 2, 0.5, None, [True]])
def test_kto_label_must_be_boolean(data_dir, tiny_tokenizer, label):
    write(data_dir, KTO + [dict(KTO[0], label=label)])
    message = load_error(tiny_tokenizer, "kto")
    assert_names(message, "data/train.jsonl: line 3", "label")


def test_kto_label_zero_one_and_missing_field(data_dir, tiny_tokenizer):
    write(data_dir, [dict(KTO[0], label=1), dict(KTO[1], label=0)])
    out = load_datasets("data", tiny_tokenizer, "kto", 512, splits=("train",))
    assert list(out["train"].fields["label"]) == [1.0, 0.0]
    write(data_dir, KTO + [{"prompt": "Review the cafe.", "label": True}])
    message = load_error(tiny_tokenizer, "kto")
    assert message == "data/train.jsonl: line 3: missing field 'completion' (layout kto: prompt, completion, label)"


# ------------------------------------------------- drops, empty files, sources


def test_identical_pairs_are_dropped_and_counted(data_dir, tiny_tokenizer, capsys):
    recs = preference_records(3)
    recs[1]["rejected"] = recs[1]["chosen"]
    write(data_dir, recs)
    out = load_datasets("data", tiny_tokenizer, "pairs", 512, splits=("train",))
    assert len(out["train"]) == 2
    assert "train: 2 pairs (1 dropped: chosen same as rejected)" in capsys.readouterr().out


@pytest.mark.parametrize("name, text", [("train.jsonl", ""), ("train.jsonl", "\n \n"), ("train.json", "[]")])
def test_empty_file(data_dir, tiny_tokenizer, name, text):
    (data_dir / name).write_text(text)
    message = load_error(tiny_tokenizer)
    assert message.startswith(f"data/{name}: no records")


def test_hub_rows_and_parquet_rows(data_dir, tiny_tokenizer, monkeypatch):
    recs = preference_records(3)
    del recs[1]["rejected"]
    hub = types.SimpleNamespace(
        get_dataset_split_names=lambda name: ["train_prefs"],
        load_dataset=lambda name, split: recs if split == "train_prefs" else [],
    )
    monkeypatch.setitem(sys.modules, "datasets", hub)
    with pytest.raises(DataError) as e:
        load_datasets("me/prefs", tiny_tokenizer, "pairs", 512, splits=("train",), hub_splits={"train": "train_prefs"})
    assert str(e.value).startswith("me/prefs, split train_prefs: row 2: missing field 'rejected'")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = preference_records(3)
    rows[2]["chosen"] = None  # a null cell
    pq.write_table(pa.Table.from_pylist(rows), data_dir / "train.parquet")
    assert_names(load_error(tiny_tokenizer), "data/train.parquet: row 3", "chosen")


def test_all_records_are_checked_before_tokenizing(tiny_tokenizer):
    recs = preference_records(100_000, seed=5)
    recs[-1] = {"prompt": "x", "chosen": "y"}
    start = time.perf_counter()
    with pytest.raises(DataError, match="line 100000: missing field 'rejected'"):
        build_pairs(recs, tiny_tokenizer, 512)
    assert time.perf_counter() - start < 5  # checking is cheap; tokenizing 100k records is not


def test_internal_errors_are_not_data_errors(data_dir, tiny_tokenizer):
    class Broken:
        def __getattr__(self, name):
            return getattr(tiny_tokenizer, name)

        def encode(self, *args, **kwargs):
            raise RuntimeError("tokenizer bug")

    write(data_dir, preference_records(2))
    with pytest.raises(RuntimeError, match="tokenizer bug"):
        load_datasets("data", Broken(), "pairs", 512, splits=("train",))


# ---------------------------------------------------------------------- CLI


def test_cli_bad_data_is_one_line_and_exit_2(tmp_path, tiny_model_path):
    data = tmp_path / "data"
    data.mkdir()
    recs = preference_records(6)
    recs[5]["chosen"] = ["not", "a", "string"]
    write(data, recs)
    out = tmp_path / "adapters"
    result = subprocess.run(
        [sys.executable, "-m", "mlx_dpo.lora", "--model", str(tiny_model_path), "--data", "data", "--train",
         "--iters", "1", "--batch-size", "1", "--adapter-path", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mlx_dpo.lora: error: data/train.jsonl: line 6: field 'chosen' must be a string, got list")
    assert not (out / "adapters.safetensors").exists()
    assert not out.exists() or not any(out.iterdir())
