"""Seeded fuzzing of the loader and the CLI: every input ends in a clean error or a clean run.

Clean error: exit status 2 with one line on stderr, no traceback, and no adapter
file (complete or partial) written. Clean run: exit normally with loadable
adapters. Case counts are reported in RELIABILITY.md.
"""

import codecs
import contextlib
import copy
import io
import json
import random
import subprocess
import sys

import mlx.core as mx
import pytest
import yaml

from mlx_dpo.lora import main

N_DATA_CASES = 240
N_CONFIG_CASES = 120
N_ENCODING_CASES = 60
N_CLI_CASES = 8

GOOD = [
    {"prompt": "Write a review of the film.", "chosen": "It was lovely.", "rejected": "It was dull."},
    {"prompt": "Write a review of the park.", "chosen": "Great fun.", "rejected": "Boring."},
    {"prompt": "Write a review of the cafe.", "chosen": "Superb coffee.", "rejected": "Awful coffee."},
]
GOOD_CHAT = [
    {"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
     "rejected": [{"role": "assistant", "content": r["rejected"]}]}
    for r in GOOD
]
JUNK_VALUES = [None, 0, 7, -1.5, True, "", "   ", [], {}, [1, 2], {"a": 1}, "x" * 3000, "ünïcödé ✓", "\x00", [{"role": "user"}]]


def mutate_record(rec: dict, rng: random.Random) -> object:
    rec = copy.deepcopy(rec)
    kind = rng.randrange(9)
    keys = list(rec)
    if kind == 0 and keys:
        del rec[rng.choice(keys)]
    elif kind == 1 and keys:
        rec[rng.choice(keys)] = rng.choice(JUNK_VALUES)
    elif kind == 2:
        rec[rng.choice(["promt", "chosen_response", "answers", "label", "completion", "confidence", "system"])] = rng.choice(JUNK_VALUES + ["ok"])
    elif kind == 3 and isinstance(rec.get("prompt"), list):
        rec["prompt"][0]["role"] = rng.choice(["robot", "", None, 3, "assistant"])
    elif kind == 4 and isinstance(rec.get("chosen"), list):
        rec["chosen"] = rng.choice([[], [{"content": "x"}], [{"role": "assistant", "content": 5}], "plain string"])
    elif kind == 5:
        rec["confidence"] = rng.choice([0.2, 1.5, "high", None, 0.75, float("nan")])
    elif kind == 6:
        return rng.choice([[], 3, "text", None, [rec]])
    elif kind == 7:
        rec["chosen"] = rec.get("rejected")
    else:
        return {"chosen": "\n\nHuman: hi\n\nAssistant: " + rng.choice(["yes", "", "no"]), "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    return rec


def make_lines(rng: random.Random) -> list[str]:
    base = copy.deepcopy(rng.choice([GOOD, GOOD_CHAT]))
    records = [copy.deepcopy(rng.choice(base)) for _ in range(rng.randint(2, 6))]
    lines = [json.dumps(r) for r in records]
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(lines))
        choice = rng.randrange(10)
        if choice == 0:
            lines[i] = lines[i][: rng.randrange(1, max(2, len(lines[i])))]  # truncated JSON
        elif choice == 1:
            lines.insert(i, rng.choice(["", "   ", "null", "[]", "{}", "nan", "{'single': 'quotes'}"]))
        else:
            lines[i] = json.dumps(mutate_record(records[min(i, len(records) - 1)], rng))
    return lines


def call_main(argv: list[str]) -> tuple[str, str]:
    """Run the CLI in-process; 'ok' or 'error' with stderr. Anything else propagates (a traceback)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 2, f"exit {e.code}: {err.getvalue()}"
            return "error", err.getvalue()
    return "ok", err.getvalue()


def check_outcome(outcome: str, stderr: str, out_dir) -> None:
    files = sorted(p.name for p in out_dir.glob("*")) if out_dir.exists() else []
    assert not [f for f in files if ".tmp" in f], files  # no partial file left behind
    if outcome == "error":
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("mlx_dpo.lora: error: "), stderr
        assert "adapters.safetensors" not in files
    else:
        assert mx.load(str(out_dir / "adapters.safetensors"))


def test_fuzz_datasets(tiny_model_path, tmp_path):
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for case in range(N_DATA_CASES):
        d = tmp_path / f"d{case}"
        d.mkdir()
        (d / "train.jsonl").write_text("\n".join(make_lines(rng)) + "\n")
        loss = rng.choice(["dpo", "dpo", "kto", "orpo", "sft"])
        out = tmp_path / f"o{case}"
        argv = ["--model", str(tiny_model_path), "--data", str(d), "--train", "--iters", "1", "--batch-size", "1",
                "--adapter-path", str(out), "--loss-type", loss, "--no-compile", "--val-batches", "0", "--num-layers", "1"]
        outcome, stderr = call_main(argv)
        check_outcome(outcome, stderr, out)
        outcomes[outcome] += 1
    assert outcomes["error"] > N_DATA_CASES // 2 and outcomes["ok"] > 0, outcomes


# How a data file may have been saved: the first four load, the rest are refused.
SAVED_AS = ("utf-8-bom", "crlf", "bom-crlf", "cr", "latin-1", "cp1252", "utf-16", "utf-16-le", "lone-byte", "cut-char")
LOADS = SAVED_AS[:4]


def save_as(text: str, how: str, rng: random.Random) -> bytes:
    """``text`` as bytes saved the way ``how`` names; an accent first, so the encoding shows."""
    text = text.replace("Write a", "Écris une")
    if how in LOADS:
        ends = "\r\n" if "crlf" in how else "\r" if how == "cr" else "\n"
        return (codecs.BOM_UTF8 if "bom" in how else b"") + text.replace("\n", ends).encode()
    if how in ("latin-1", "cp1252", "utf-16", "utf-16-le"):
        return text.encode(how, errors="replace")
    data = text.encode()
    if how == "lone-byte":
        i = rng.randrange(len(data) + 1)
        return data[:i] + bytes([rng.choice([0x80, 0xbf, 0xc0, 0xe9, 0xfe, 0xff])]) + data[i:]
    i = data.find("É".encode())  # cut-char: a two-byte character loses its second byte
    if i < 0:
        return data + "É".encode()[:1]
    return data[: i + 1] if rng.random() < 0.5 else data[: i + 1] + data[i + 2 :]


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_fuzz_encodings(tiny_model_path, tmp_path):
    """BOMs, CRLF and CR line ends load; Latin-1, cp1252, UTF-16 and broken UTF-8 are one line naming the offset."""
    rng = random.Random(4321)
    outcomes = {how: {"ok": 0, "error": 0} for how in SAVED_AS}
    for case in range(N_ENCODING_CASES):
        how = SAVED_AS[case % len(SAVED_AS)]
        clean = rng.random() < 0.5
        lines = [json.dumps(r) for r in rng.choice([GOOD, GOOD_CHAT])] if clean else make_lines(rng)
        data = save_as("\n".join(lines) + "\n", how, rng)
        d = tmp_path / f"d{case}"
        d.mkdir()
        (d / "train.jsonl").write_bytes(data)
        out = tmp_path / f"o{case}"
        argv = ["--model", str(tiny_model_path), "--data", str(d), "--train", "--iters", "1", "--batch-size", "1",
                "--adapter-path", str(out), "--loss-type", rng.choice(["dpo", "kto"]), "--no-compile", "--val-batches", "0",
                "--num-layers", "1"]
        outcome, stderr = call_main(argv)
        check_outcome(outcome, stderr, out)
        outcomes[how][outcome] += 1
        if how in LOADS and clean:
            assert outcome == "ok", (how, stderr)
        elif how.startswith("utf-16") or not is_utf8(data):  # pure ASCII is the same in Latin-1 and cp1252
            assert outcome == "error" and "not UTF-8 text" in stderr and " at offset " in stderr, (how, stderr)
            assert ("looks like UTF-16" in stderr) == how.startswith("utf-16"), (how, stderr)
    assert all(outcomes[how]["ok"] > 0 for how in LOADS), outcomes
    assert all(outcomes[how]["error"] > 0 for how in SAVED_AS if how not in LOADS), outcomes


def mutate_config(rng: random.Random) -> str:
    cfg = {"iters": 1, "batch_size": 1, "loss_type": "dpo", "beta": 0.1, "learning_rate": 1e-4,
           "lora_parameters": {"rank": 2, "scale": 10.0, "dropout": 0.0}, "val_batches": 0, "num_layers": 1}
    kind = rng.randrange(6)
    key = rng.choice(list(cfg) + ["label_smoothing", "fine_tune_type", "max_seq_length", "grad_accumulation_steps", "lr_schedule"])
    if kind == 0:
        cfg[key] = rng.choice(JUNK_VALUES + [-3, 0.5, 1e9, "1e-5", "lora", "full"])
    elif kind == 1:
        cfg[key[:-1] + rng.choice("xyz") if len(key) > 3 else key + "x"] = 1
    elif kind == 2:
        cfg["lora_parameters"][rng.choice(["rank", "alpha", "dropout", "scale", "keys", "rnak"])] = rng.choice(JUNK_VALUES + [4, 0.5, 16.0])
    elif kind == 3:
        return rng.choice(["beta: [", ": :", "- 1\n- 2", "iters: 1\n  bad indent: 2", "{", "'quoted", "null", "42"])
    elif kind == 4:
        cfg["loss_type"] = rng.choice([["dpo", "sft"], ["kto", "dpo"], [], "dpo ", ["simpo"], ["dpo", "nope"], 5])
        if rng.random() < 0.5:
            cfg["loss_weights"] = rng.choice([[1.0], [1.0, 0.5], "1", [None]])
    else:
        cfg["lr_schedule"] = rng.choice([{"name": "cosine_decay", "arguments": [1e-4, 10]}, {"name": "nope", "arguments": []},
                                         {"nme": "cosine_decay"}, "cosine", {"name": "cosine_decay", "arguments": [1e-4, 10], "warmup": 2}])
    return yaml.safe_dump(cfg)


def test_fuzz_configs(tiny_model_path, tiny_data_path, tmp_path):
    rng = random.Random(99)
    outcomes = {"ok": 0, "error": 0}
    for case in range(N_CONFIG_CASES):
        cfg = tmp_path / f"c{case}.yaml"
        cfg.write_text(mutate_config(rng))
        out = tmp_path / f"o{case}"
        argv = ["--config", str(cfg), "--model", str(tiny_model_path), "--data", str(tiny_data_path), "--train",
                "--adapter-path", str(out), "--no-compile"]
        outcome, stderr = call_main(argv)
        check_outcome(outcome, stderr, out)
        outcomes[outcome] += 1
    assert outcomes["error"] > N_CONFIG_CASES // 3 and outcomes["ok"] > 0, outcomes


@pytest.mark.parametrize("case", range(N_CLI_CASES))
def test_fuzz_cli_processes(tiny_model_path, tmp_path, case):
    """A few of the same inputs through a real process: exit 2, one line, no traceback."""
    rng = random.Random(5000 + case)
    d = tmp_path / "d"
    d.mkdir()
    lines = make_lines(rng)
    lines.insert(0, "{broken")  # always invalid, so the process must fail cleanly
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "mlx_dpo.lora", "--model", str(tiny_model_path), "--data", str(d), "--train",
                          "--iters", "1", "--batch-size", "1", "--adapter-path", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len([ln for ln in out.stderr.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "o" / "adapters.safetensors").exists()
