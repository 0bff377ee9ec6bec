"""GGUF export and import per family (llama, mistral, qwen2, qwen3, gemma3): a tiny random instance of
each, written by ``mlx_dpo.fuse``'s writer, is read back by our importer to the same model, by
transformers' own GGUF loader and by llama.cpp itself (llama-cpp-python 0.3.36, built from its sdist)
to the same logits and token ids."""

import numpy as np
import pytest
from mlx_lm.utils import load, load_tokenizer

import mlx.core as mx
from mlx_dpo.convert import convert
from mlx_dpo.gguf.writer import write_gguf
from tests.support import FAMILY_CONFIGS, make_family

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp: pip install llama-cpp-python (see .ci/run)")
IDS = [1, 17, 42, 99, 250, 7, 300, 12, 5, 480, 33, 64]  # longer than Gemma's test window of 4
TEXTS = ["In 2024, 1234567 people", "a  b\t\tc\n\n\nd   ", "café naïve façade", "emoji 😀🚀 end",
         "<|user|>hi</s><|assistant|>"]
# The relative rounding llama.cpp applies to a matmul's activations for each weight type: F16 and
# BF16 weights take activations in their own type; Q8_0 and Q4_0 take them as Q8_0 blocks (int8 of
# the block's largest magnitude / 127). Logits may move by that rounding times the network's
# amplification, which on these random instances is under 10 (measured: 2.6 to 9.0), so the test
# allows 16 times the rounding, relative to the largest logit.
ACTIVATION_ROUNDING = {"f16": 2.0**-11, "bf16": 2.0**-8, "q8_0": 1 / 127, "q4_0": 1 / 127}


@pytest.fixture(scope="module")
def families(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: make_family(root / f, f, tiny_model_path) for f in FAMILY_CONFIGS}


def mlx_logits(path) -> np.ndarray:
    model, _ = load(str(path))
    return np.array(model(mx.array([IDS]))[0], np.float64)


def cpp_model(path):
    # float32 K/V cache: the default float16 cache would round every key and value.
    return llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)


def cpp_logits(llm) -> np.ndarray:
    llm.reset()
    llm.eval(IDS)
    return np.array(llm.scores[: len(IDS)], np.float64)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_an_f32_file_is_the_same_model_in_our_importer_in_llama_cpp_and_in_transformers(families, tmp_path, family):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path = write_gguf(families[family], tmp_path / "m.gguf", "f32")
    ours = mlx_logits(families[family])
    np.testing.assert_array_equal(mlx_logits(convert(path, tmp_path / "back", dequantize=True)), ours)
    llm = cpp_model(path)
    # Gemma's GELU is tabulated in float16 by llama.cpp's CPU code; the other families use SiLU.
    np.testing.assert_allclose(cpp_logits(llm), ours, atol=5e-3 if family == "gemma3_text" else 1e-4)
    tok = load_tokenizer(families[family])
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi 42"}, {"role": "assistant", "content": "Oui."}],
                                   tokenize=False)
    for text in [*TEXTS, chat]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([IDS])).logits[0].double().numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


@pytest.mark.parametrize("kind", list(ACTIVATION_ROUNDING))
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_llama_cpp_runs_each_type_as_its_rounded_weights_give(families, tmp_path, family, kind):
    """Compared with our float32 model of the file's own (rounded) weights, which equal llama.cpp's
    rounding exactly (``test_writer``): what is left is llama.cpp's rounding of the activations."""
    path = write_gguf(families[family], tmp_path / f"m-{kind}.gguf", kind)
    rounded = mlx_logits(convert(path, tmp_path / "back", dequantize=True))
    theirs = cpp_logits(cpp_model(path))
    bound = 16 * ACTIVATION_ROUNDING[kind] * np.abs(rounded).max()
    assert np.abs(theirs - rounded).max() < bound
    assert np.abs(theirs - rounded).max() > 0  # the rounding is there: the bound is what is tested
