"""Configuration: mlx-lm keys accepted, bad keys and values are one-line errors."""

import subprocess
import sys

import pytest
import yaml

from mlx_dpo.config import DEFAULTS, ConfigError, load_config

MLX_LM_STYLE = """
model: some/model
train: true
fine_tune_type: lora
optimizer: adamw
optimizer_config:
  adamw:
    weight_decay: 0.01
data: data_dir
seed: 0
num_layers: 8
batch_size: 2
iters: 100
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
resume_adapter_file: null
adapter_path: adapters
save_every: 100
test: false
test_batches: 100
max_seq_length: 2048
grad_checkpoint: false
grad_accumulation_steps: 1
mask_prompt: false
lr_schedule:
  name: cosine_decay
  warmup: 10
  arguments: [1e-5, 100, 1e-7]
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0
"""


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_mlx_lm_config_loads_unchanged_with_sft(tmp_path):
    args = load_config(["--config", write(tmp_path, MLX_LM_STYLE + "loss_type: sft\n")])
    assert args.loss_type == "sft" and args.learning_rate == 1e-5 and args.num_layers == 8
    assert args.lora_parameters["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert args.optimizer_config == {"adamw": {"weight_decay": 0.01}}
    assert args.beta == DEFAULTS["beta"] and args.reference_model is None


def test_flags_override_file_and_defaults_fill_the_rest(tmp_path):
    args = load_config(["--config", write(tmp_path, "beta: 0.3\niters: 7\nlora_parameters: {rank: 4}\n"), "--iters", "9", "--label-smoothing", "0.2"])
    assert args.iters == 9 and args.beta == 0.3 and args.label_smoothing == 0.2
    assert args.lora_parameters == {**DEFAULTS["lora_parameters"], "rank": 4}
    assert args.loss_type == "dpo"


def test_file_can_turn_on_trust_remote_code(tmp_path):
    # mlx-lm's own flag defaults to False, which would silently beat the file.
    assert load_config(["--config", write(tmp_path, "trust_remote_code: true\n")]).trust_remote_code is True


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("betta: 0.1\n", "unknown config key 'betta' (did you mean 'beta'?)"),
        ("learning_rat: 1e-5\n", "did you mean 'learning_rate'?"),
        ("beta: 0\n", "invalid value for 'beta'"),
        ("beta: -1\n", "invalid value for 'beta'"),
        ("label_smoothing: 0.5\n", "invalid value for 'label_smoothing'"),
        ("label_smoothing: -0.1\n", "invalid value for 'label_smoothing'"),
        ("batch_size: two\n", "invalid value for 'batch_size'"),
        ("batch_size: 2.5\n", "invalid value for 'batch_size'"),
        ("iters: true\n", "invalid value for 'iters'"),
        ("loss_type: dpoo\n", "invalid value for 'loss_type'"),
        ("fine_tune_type: qlora\n", "invalid value for 'fine_tune_type'"),
        ("lora_parameters: {alpha: 16}\n", "not 'alpha'"),
        ("lora_parameters: {rnak: 16}\n", "did you mean 'rank'?"),
        ("lora_parameters: {dropout: 1.5}\n", "invalid value for 'lora_parameters.dropout'"),
        ("- a\n- b\n", "must hold a mapping"),
        ("beta: [\n", "not valid YAML"),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_key(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(["--config", write(tmp_path, text)])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_flag_value_is_checked_too():
    with pytest.raises(ConfigError, match="invalid value for 'beta'"):
        load_config(["--beta", "-0.5"])


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, yaml.safe_dump({"model": "m", "train": True, "lable_smoothing": 0.1}))
    out = subprocess.run([sys.executable, "-m", "mlx_dpo.lora", "--config", path], capture_output=True, text=True)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "'lable_smoothing'" in lines[0] and "'label_smoothing'" in lines[0]


def test_shipped_configs_validate():
    from pathlib import Path

    from mlx_dpo.config import read_yaml

    root = Path(__file__).parents[1]
    files = sorted((root / "configs").glob("*.yaml")) + sorted((root / "examples").glob("**/*.yaml"))
    assert files
    sweeps = 0
    for f in files:
        spec = read_yaml(f)
        if "runs" in spec and "eval" in spec:  # a sweep file for mlx_dpo.frontier: each run's config (or the base) and keys
            assert set(spec) <= {"output", "base", "eval", "runs"} and spec["runs"], f
            for r in spec["runs"]:
                keys = {k: v for k, v in r.items() if k not in ("name", "method", "config")}
                config = r.get("config") or spec.get("base")
                load_config(["--config", str(root / config)] if config else [], overrides=keys)
            sweeps += 1
            continue
        load_config(["--config", str(f)])
    assert sweeps >= 2  # the demo's and the real model's
