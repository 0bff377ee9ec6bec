"""Reading records: ``.jsonl``, ``.json`` and ``.parquet`` files, or a Hugging Face hub split.

The records come back as ``Records``, which remember their source (the file
path, or ``dataset, split name``) and what a position is called there (``line``,
``record`` or ``row``), so every later error can name where a bad record is.
Text files are UTF-8, with or without a byte-order mark, with LF, CRLF or CR
line ends; any other bytes are one error naming the file, offset and line.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterator, Optional

from .core import DataError, _one_line, _type


class Records(list):
    """Records read from one source, which errors name: ``source: line 7``.

    ``source`` is the file path as given (or ``dataset, split name`` for the
    Hub) and ``unit`` what a position is called there: ``line`` in JSON lines
    (the line in the file), ``record`` in a JSON list, ``row`` in a table.
    """

    def __init__(self, records=(), source: Optional[str] = None, unit: str = "line"):
        super().__init__(records)
        self.source = source
        self.unit = unit

    def at(self, n: int) -> str:
        """Where the n-th record (1-based) is, for an error message."""
        return f"{self.source}: {self.unit} {n}" if self.source else f"{self.unit} {n}"


def _at(records, n: int) -> str:
    return records.at(n) if isinstance(records, Records) else f"line {n}"


def _in(records) -> str:
    """``source: `` for errors about a whole split, or nothing."""
    source = getattr(records, "source", None)
    return f"{source}: " if source else ""


_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _not_utf8(path: Path, data: bytes, offset: int, what: str, utf16: bool = False) -> DataError:
    """The one-line error for bytes that are not UTF-8, naming where the first bad one is."""
    line = data[:offset].replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
    kind = ", it looks like UTF-16" if utf16 else ""
    return DataError(f"{path}: not UTF-8 text{kind} ({what} at offset {offset}, line {line}); re-save the file as UTF-8")


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, a leading byte-order mark dropped, line ends made LF.

    Other encodings are refused rather than guessed. UTF-16 shows as a UTF-16
    byte-order mark or a NUL in the first two bytes (JSON starts with an ASCII
    character); Latin-1 and the like as bytes that are not UTF-8. Either is
    one ``DataError`` naming the file, the first bad byte, its offset and line.
    """
    data = Path(path).read_bytes()
    if data.startswith(_UTF16_BOMS):
        raise _not_utf8(path, data, 0, f"byte-order mark 0x{data[0]:02x} 0x{data[1]:02x}", utf16=True)
    if b"\0" in data[:2]:
        raise _not_utf8(path, data, data.index(b"\0"), "NUL byte", utf16=True)
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        raise _not_utf8(path, data, offset, f"byte 0x{data[offset]:02x}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_records(path: Path) -> list[dict]:
    """Read a ``.jsonl`` file, one record per line.

    Only trailing blank lines are skipped, so the n-th record is always on
    line n and later errors can name the line. Returns ``Records`` naming
    ``path``; an empty file is an error.
    """
    path = Path(path)
    lines = read_text(path).split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: no records (the file is empty)")
    records = Records(source=str(path), unit="line")
    loads = json.loads
    for n, line in enumerate(lines, 1):
        try:
            record = loads(line)
        except json.JSONDecodeError as e:
            if not line.strip():
                raise DataError(f"{path}: line {n}: blank line (each line must hold one JSON object)") from None
            raise DataError(f"{path}: line {n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {n}: expected a JSON object, got {_type(record)}")
        records.append(record)
    return records


def load_json_records(path: Path) -> list[dict]:
    """Read a ``.json`` file: a JSON list of records (errors name ``record N``), or JSON lines."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: no records (the file is empty)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise DataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        return load_records(path)  # JSON lines, with per-line errors
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {_type(data)}")
    if not data:
        raise DataError(f"{path}: no records (an empty list)")
    for n, record in enumerate(data, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {n}: expected a JSON object, got {_type(record)}")
    return Records(data, source=str(path), unit="record")


def load_parquet_records(path: Path) -> list[dict]:
    """Read a ``.parquet`` file with pyarrow (an optional dependency); errors name ``row N``."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet files needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(str(path)).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:  # a damaged or non-parquet file
        raise DataError(f"{path}: cannot read parquet ({_one_line(e)})") from None
    if not rows:
        raise DataError(f"{path}: no records (the table has no rows)")
    return Records(rows, source=str(path), unit="row")


_READERS = {".jsonl": load_records, ".json": load_json_records, ".parquet": load_parquet_records}


def _hub_split_names(split: str, train_split, valid_split, test_split) -> tuple[tuple[str, ...], bool]:
    """Hub split names to try for ``split``, and whether the user named them."""
    chosen = {"train": train_split, "valid": valid_split, "test": test_split}.get(split)
    if chosen:
        return (chosen,), True
    defaults = {"train": ("train",), "valid": ("validation", "valid", "test"), "test": ("test",)}
    return defaults.get(split, (split,)), False


def load_split_records(
    data: str,
    split: str,
    *,
    train_split: Optional[str] = None,
    valid_split: Optional[str] = None,
    test_split: Optional[str] = None,
) -> Records | None:
    """Records of one split from a local folder or a Hugging Face dataset id.

    A local folder holds ``{split}.jsonl``, ``{split}.json`` (a list of
    records or JSON lines) or ``{split}.parquet``. Anything else is looked up
    on the Hub: ``train_split``/``valid_split``/``test_split`` name the hub
    splits (``train[:1000]`` slices work); unnamed, ``train`` and ``test`` are
    used as they are, and ``valid`` is the first of ``validation``, ``valid``,
    ``test`` that exists. Returns None when the split does not exist; a split
    named explicitly that does not exist, or one with no records, is an error.
    The ``Records`` name their file (or hub split), so errors can point at a line.
    """
    path = Path(data).expanduser()
    if path.is_dir():
        files = [path / f"{split}{ext}" for ext in _READERS if (path / f"{split}{ext}").exists()]
        if len(files) > 1:
            raise DataError(f"{data}: several files for the {split} split ({', '.join(f.name for f in files)}); keep one")
        return _READERS[files[0].suffix](files[0]) if files else None
    if path.exists() or data.startswith((".", "/", "~")):
        raise DataError(
            f"{data}: expected a folder with train/valid/test .jsonl, .json or .parquet files, "
            "or a Hugging Face dataset id"
        )
    try:
        from datasets import get_dataset_split_names, load_dataset
    except ImportError:
        raise DataError(
            f"{data!r} is not a local folder; loading it from the Hub needs the datasets package: "
            "pip install datasets"
        ) from None
    names, explicit = _hub_split_names(split, train_split, valid_split, test_split)
    available = get_dataset_split_names(data)
    for name in names:
        if name.split("[", 1)[0] in available:
            rows = Records((dict(row) for row in load_dataset(data, split=name)), source=f"{data}, split {name}", unit="row")
            if not rows:
                raise DataError(f"{rows.source}: no records (the split has no rows)")
            return rows
    if explicit:
        raise DataError(f"{data}: no split {names[0]!r} on the Hub; it has {', '.join(available)}")
    return None


def hub_split_names(hub_splits: Optional[dict]) -> dict:
    """``{train_split: ..., ...}`` from ``train``/``valid``/``test`` (or ``*_split``) keys."""
    names = {}
    for key, value in (hub_splits or {}).items():
        split_key = key if key.endswith("_split") else f"{key}_split"
        if split_key not in ("train_split", "valid_split", "test_split"):
            raise DataError(f"unknown hub split key {key!r}; expected train, valid or test")
        names[split_key] = value
    return names


def split_records(data: str, splits, hub_splits: Optional[dict] = None) -> Iterator[tuple[str, Optional["Records"]]]:
    """``(split, records)`` for each split (None where it is missing), records named for errors."""
    names = hub_split_names(hub_splits)
    for split in splits:
        records = load_split_records(data, split, **names)
        if records is not None and not isinstance(records, Records):
            records = Records(records, source=f"{data} ({split})")
        yield split, records
