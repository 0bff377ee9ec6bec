"""GGUF export (``mlx_dpo.fuse --export-gguf``): the file our importer reads back to the same
model, transformers' own GGUF loader reads to the same logits and token ids, and quantized types
hold exactly llama.cpp's quantization of the weights (computed by its ``gguf-py``)."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load, load_tokenizer

from mlx_dpo.convert import convert
from mlx_dpo.fuse import main as fuse_main
from mlx_dpo.gguf.reader import GGUFError
from mlx_dpo.gguf.writer import write_gguf

gguf = pytest.importorskip("gguf", reason="pip install gguf (a dependency of mlx-dpo)")
IDS = [1, 17, 42, 99, 250, 7, 300, 12, 5, 480]
TEXTS = ["In 2024, 1234567 people", "a  b\t\tc\n\n\nd   ", "café naïve façade", "emoji 😀🚀 end", "<|user|>hi</s><|assistant|>"]


def logits(path) -> np.ndarray:
    model, _ = load(str(path))
    return np.array(model(mx.array([IDS]))[0], np.float64)


def test_an_f32_file_reads_back_to_the_same_model_in_our_importer_and_in_transformers(tiny_model_path, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_gguf(tiny_model_path, tmp_path / "m.gguf", "f32")
    np.testing.assert_array_equal(logits(convert(path, tmp_path / "back", dequantize=True)), logits(tiny_model_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([IDS])).logits[0].double().numpy()
    np.testing.assert_allclose(theirs, logits(tiny_model_path), atol=1e-4)
    ours, hf_tok = load_tokenizer(tiny_model_path), AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    chat = ours.apply_chat_template([{"role": "user", "content": "Hi 42"}, {"role": "assistant", "content": "Oui."}], tokenize=False)
    for text in [*TEXTS, chat]:
        assert hf_tok.encode(text) == ours.encode(text), text
    reader = gguf.GGUFReader(str(path))
    template = reader.fields["tokenizer.chat_template"]
    assert bytes(template.parts[template.data[0]]).decode() == (tiny_model_path / "chat_template.jinja").read_text()


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0", "q4_0"])
def test_each_type_holds_llama_cpps_rounding_of_the_weights(tiny_model_path, tmp_path, kind):
    path = write_gguf(tiny_model_path, tmp_path / f"m-{kind}.gguf", kind)
    back = dict(mx.load(str(next((convert(path, tmp_path / "back", dequantize=True)).glob("*.safetensors")))))
    source = dict(mx.load(str(tiny_model_path / "model.safetensors")))
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    changed = 0
    for name, w in source.items():
        w = np.array(w.astype(mx.float32))
        if w.ndim == 1:  # norms stay float32
            np.testing.assert_array_equal(np.array(back[name]), w, err_msg=name)
            continue
        # llama.cpp reorders Q/K rows before quantizing, and its blocks run along a row: the order does not matter.
        want = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        np.testing.assert_allclose(np.array(back[name].astype(mx.float32)), want, rtol=0, atol=1e-6, err_msg=name)
        changed += int(not np.array_equal(want, w))
    assert changed > 0  # the type rounds: the comparison with the source can fail


def test_the_cli_writes_a_gguf_of_the_fused_model_and_refuses_other_families(tiny_model_path, tiny_data_path, tmp_path, capsys):
    from mlx_dpo.config import load_config
    from mlx_dpo.lora import run

    run(load_config(["--model", str(tiny_model_path), "--data", str(tiny_data_path), "--adapter-path", str(tmp_path / "ad"),
                     "--train", "--iters", "2", "--batch-size", "2", "--num-layers", "-1", "--val-batches", "0",
                     "--learning-rate", "5e-2"]))
    fuse_main(["--model", str(tiny_model_path), "--adapter-path", str(tmp_path / "ad"), "--save-path", str(tmp_path / "fused"),
               "--export-gguf", str(tmp_path / "fused.gguf"), "--gguf-type", "f32"])
    np.testing.assert_allclose(logits(convert(tmp_path / "fused.gguf", tmp_path / "again", dequantize=True)),
                               logits(tmp_path / "fused"), atol=1e-6)
    other = tmp_path / "other"
    shutil.copytree(tiny_model_path, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    with pytest.raises(GGUFError, match="architecture 'phi3' cannot be exported; supported: llama, mistral, qwen2, qwen3, gemma3_text"):
        write_gguf(other, tmp_path / "o.gguf")
    with pytest.raises(GGUFError, match="GGUF type 'q5_k' is not supported; supported: f32, f16, bf16, q8_0, q4_0"):
        write_gguf(tiny_model_path, tmp_path / "o.gguf", "q5_k")
