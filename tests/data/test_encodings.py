"""Text files as people save them: UTF-8 with a byte-order mark, CRLF or CR line
ends load as plain UTF-8 does; Latin-1, cp1252 and UTF-16 end in one line naming
the file, the first bad byte's offset and line, and what to do."""

import json
import subprocess
import sys

import pytest
import yaml

from mlx_dpo.data import DataError, load_datasets, load_json_records, load_records
from mlx_dpo.toy import preference_records

BOM = b"\xef\xbb\xbf"
RECORDS = preference_records(4) + [{"prompt": "Un café, s'il vous plaît.", "chosen": "Très bon.", "rejected": "Bof."}]


def jsonl_text(records=RECORDS) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def json_text(records=RECORDS) -> str:
    return json.dumps(records, ensure_ascii=False, indent=2) + "\n"


def written(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def error_of(read, path) -> str:
    with pytest.raises(DataError) as e:
        read(path)
    message = str(e.value)
    assert "\n" not in message and "\r" not in message, "one line"
    return message


# ------------------------------------------------------------------- loads


@pytest.mark.parametrize(
    "name, data",
    [
        ("bom.jsonl", BOM + jsonl_text().encode()),
        ("crlf.jsonl", jsonl_text().replace("\n", "\r\n").encode()),
        ("cr.jsonl", jsonl_text().replace("\n", "\r").encode()),
        ("bom_crlf_trailing_blanks.jsonl", BOM + (jsonl_text() + "\n  \n\t\n").replace("\n", "\r\n").encode()),
        ("bom.json", BOM + json_text().encode()),
        ("crlf.json", json_text().replace("\n", "\r\n").encode()),
        ("bom_crlf_lines.json", BOM + jsonl_text().replace("\n", "\r\n").encode()),  # JSON lines in a .json file
    ],
)
def test_bom_and_line_ends_load_as_plain_utf8(tmp_path, name, data):
    jsonl = name.endswith(".jsonl")
    read = load_records if jsonl else load_json_records
    plain = read(written(tmp_path, "plain.jsonl" if jsonl else "plain.json", (jsonl_text() if jsonl else json_text()).encode()))
    records = read(written(tmp_path, name, data))
    assert records == plain == RECORDS
    assert not any("\r" in v or "\ufeff" in v for r in records for v in r.values())


def test_bom_crlf_file_gives_the_same_examples(tmp_path, tiny_tokenizer):
    for folder, data in (("plain", jsonl_text().encode()), ("bom_crlf", BOM + jsonl_text().replace("\n", "\r\n").encode())):
        (tmp_path / folder).mkdir()
        written(tmp_path / folder, "train.jsonl", data)
    plain = load_datasets(str(tmp_path / "plain"), tiny_tokenizer, "pairs", 512, splits=("train",))["train"]
    other = load_datasets(str(tmp_path / "bom_crlf"), tiny_tokenizer, "pairs", 512, splits=("train",))["train"]
    assert len(plain) == len(RECORDS) and list(other) == list(plain)


def test_crlf_blank_line_is_still_named(tmp_path):
    lines = [json.dumps(r) for r in RECORDS[:2]] + [""] + [json.dumps(RECORDS[2])]
    path = written(tmp_path, "train.jsonl", "\r\n".join(lines).encode() + b"\r\n")
    assert error_of(load_records, path) == f"{path}: line 3: blank line (each line must hold one JSON object)"


# ------------------------------------------------------------------ refused


def test_latin1_names_file_offset_line_and_the_fix(tmp_path):
    text = jsonl_text()
    data = text.encode("latin-1")
    offset = text.index("é")  # everything before it is ASCII: the same bytes in both encodings
    path = written(tmp_path, "train.jsonl", data)
    assert error_of(load_records, path) == (
        f"{path}: not UTF-8 text (byte 0xe9 at offset {offset}, line 5); re-save the file as UTF-8"
    )


def test_cp1252_json_list(tmp_path):
    text = json_text().replace("Bof.", "\u201cBof.\u201d")  # curly quotes: 0x93 and 0x94 in cp1252
    data = text.encode("cp1252")
    offset = data.index(b"\xe9")  # the é of café comes first
    path = written(tmp_path, "train.json", data)
    line = text[: text.index("é")].count("\n") + 1
    assert error_of(load_json_records, path) == (
        f"{path}: not UTF-8 text (byte 0xe9 at offset {offset}, line {line}); re-save the file as UTF-8"
    )


@pytest.mark.parametrize(
    "data, offset, line, byte",
    [
        (b'{"prompt": "a"}\n{"prompt": "b\xffc"}\n', 29, 2, "0xff"),  # a lone invalid byte
        (b'{"prompt": "a"}\r\n{"prompt": "b"}\r\n{"prompt": "\xc3', 46, 3, "0xc3"),  # cut inside a character
        (BOM + b'{"prompt": "\x80"}\n', 15, 1, "0x80"),  # the offset counts the byte-order mark
    ],
)
def test_first_bad_byte_is_located(tmp_path, data, offset, line, byte):
    assert data[offset : offset + 1] == bytes.fromhex(byte[2:])
    path = written(tmp_path, "train.jsonl", data)
    message = error_of(load_records, path)
    assert message == f"{path}: not UTF-8 text (byte {byte} at offset {offset}, line {line}); re-save the file as UTF-8"


@pytest.mark.parametrize(
    "encoding, mark, what",
    [
        ("utf-16", b"", "byte-order mark 0xff 0xfe at offset 0"),  # Python writes little-endian after a mark
        ("utf-16-be", b"\xfe\xff", "byte-order mark 0xfe 0xff at offset 0"),
        ("utf-16-be", b"", "NUL byte at offset 0"),
        ("utf-16-le", b"", "NUL byte at offset 1"),
    ],
)
@pytest.mark.parametrize("name", ["train.jsonl", "train.json"])
def test_utf16_is_named_as_such(tmp_path, encoding, mark, what, name):
    jsonl = name.endswith(".jsonl")
    path = written(tmp_path, name, mark + (jsonl_text() if jsonl else json_text()).encode(encoding))
    message = error_of(load_records if jsonl else load_json_records, path)
    assert message == f"{path}: not UTF-8 text, it looks like UTF-16 ({what}, line 1); re-save the file as UTF-8"


def test_nul_inside_utf8_is_a_json_error_not_utf16(tmp_path):
    path = written(tmp_path, "train.jsonl", b'{"prompt": "a"}\n{"prompt": "b\x00"}\n')
    message = error_of(load_records, path)
    assert message.startswith(f"{path}: line 2: malformed JSON") and "UTF-16" not in message


# ---------------------------------------------------------------------- CLI


def test_cli_not_utf8_is_one_line_and_exit_2(tmp_path, tiny_model_path):
    data = tmp_path / "data"
    data.mkdir()
    text = jsonl_text()
    (data / "train.jsonl").write_bytes(text.encode("latin-1"))
    config = tmp_path / "run.yaml"
    out = tmp_path / "adapters"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_path), "data": "data", "train": True, "iters": 1, "batch_size": 1,
        "adapter_path": str(out),
    }))
    result = subprocess.run(
        [sys.executable, "-m", "mlx_dpo.lora", "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"mlx_dpo.lora: error: data/train.jsonl: not UTF-8 text (byte 0xe9 at offset {text.index('é')}, line 5); "
        "re-save the file as UTF-8"
    ], result.stderr
    assert not (out / "adapters.safetensors").exists()
