"""LoRA adapters in Hugging Face PEFT's layout, both ways: an mlx-dpo adapter exported with
``mlx_dpo.fuse --export-peft`` gives transformers + PEFT the logits mlx-lm gives with it, and a
PEFT adapter made by PEFT itself starts a run (``resume_adapter_file``) from those same logits."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load

from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.fuse import main as fuse_main
from mlx_dpo.lora import run

KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
IDS = [1, 17, 42, 99, 250, 7, 300, 12, 5, 480]


def hf_logits(model_path, peft_dir) -> np.ndarray:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(peft_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].double().numpy()


def mlx_logits(model_path, adapter_dir) -> np.ndarray:
    model, _ = load(str(model_path), adapter_path=str(adapter_dir) if adapter_dir else None)
    return np.array(model(mx.array([IDS]))[0], np.float64)


def train_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--adapter-path", str(out), "--train", "--iters", "4",
            "--batch-size", "2", "--num-layers", "-1", "--val-batches", "0", "--learning-rate", "5e-2", *extra]


def test_an_exported_adapter_gives_transformers_and_peft_the_same_logits(tiny_model_path, tiny_data_path, tmp_path):
    out = tmp_path / "ad"
    args = load_config(train_args(tiny_model_path, tiny_data_path, out), overrides={"lora_parameters": {"rank": 4, "scale": 10.0, "keys": KEYS}})
    run(args)
    fuse_main(["--model", str(tiny_model_path), "--adapter-path", str(out), "--export-peft", str(tmp_path / "peft")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 40.0 and len(config["target_modules"]) == 3 * 2  # 2 layers
    ours, base = mlx_logits(tiny_model_path, out), mlx_logits(tiny_model_path, "")
    assert np.abs(ours - base).max() > 1e-3  # the adapter changes the logits: the comparison can fail
    np.testing.assert_allclose(hf_logits(tiny_model_path, tmp_path / "peft"), ours, atol=1e-4)


def test_a_peft_adapter_starts_a_run_from_its_own_logits(tiny_model_path, tiny_data_path, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_path), dtype=torch.float32)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, init_lora_weights=False)
    peft.get_peft_model(base, lora).save_pretrained(str(tmp_path / "peft"))  # random A and B: a trained adapter's shape
    keys = {"lora_parameters": {"rank": 4, "scale": 2.0, "keys": KEYS}, "resume_adapter_file": str(tmp_path / "peft")}
    args = load_config(train_args(tiny_model_path, tiny_data_path, tmp_path / "ad", "--learning-rate", "1e-12", "--iters", "1"), overrides=keys)
    run(args)
    theirs = hf_logits(tiny_model_path, tmp_path / "peft")
    assert np.abs(theirs - mlx_logits(tiny_model_path, "")).max() > 1e-3
    np.testing.assert_allclose(mlx_logits(tiny_model_path, tmp_path / "ad"), theirs, atol=1e-4)
    wrong = load_config(train_args(tiny_model_path, tiny_data_path, tmp_path / "wrong"),
                        overrides={**keys, "lora_parameters": {"rank": 8, "scale": 2.0, "keys": KEYS}})
    with pytest.raises(ConfigError, match="does not match this run's: set lora_parameters"):
        run(wrong)


def test_dora_is_refused_in_one_line(tiny_model_path, tiny_data_path, tmp_path, capsys):
    run(load_config(train_args(tiny_model_path, tiny_data_path, tmp_path / "dora", "--fine-tune-type", "dora", "--iters", "1")))
    with pytest.raises(SystemExit) as e:
        fuse_main(["--model", str(tiny_model_path), "--adapter-path", str(tmp_path / "dora"), "--export-peft", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "only LoRA converts to PEFT" in err
