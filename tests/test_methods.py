"""The one decision: each configuration names one method, with the records it reads, whether a
reference runs and what its test counts; the rules that depend on the method are one line each."""

import mlx.core as mx
import pytest

from mlx_dpo import methods
from mlx_dpo.compute.forward import Forward
from mlx_dpo.config import ConfigError, load_config


@pytest.mark.parametrize("keys, name, data, reference, unit", [
    ({"loss_type": "sft"}, "sft", "sft", False, "examples"),
    ({"loss_type": "dpo"}, "offline_dpo", "pairs", True, "pairs"),
    ({"loss_type": "simpo"}, "offline_dpo", "pairs", False, "pairs"),
    ({"loss_type": ["dpo", "sft"], "loss_weights": [1.0, 0.5]}, "offline_dpo", "pairs", True, "pairs"),
    ({"loss_type": "kto"}, "kto", "kto", True, "examples"),
    ({"rl": "kto"}, "kto", "kto", True, "examples"),
    ({"loss_type": "coh"}, "coh", "coh", False, "examples"),
    ({"loss_type": "dapo"}, "grpo", "prompts", False, "completions"),
    ({"rl": "grpo", "beta": 0.04}, "grpo", "prompts", True, "completions"),
    ({"loss_type": "ipo", "online": True}, "online_dpo", "prompts", True, "pairs"),
    ({"loss_type": "dpo", "rounds": 2}, "iterative_dpo", "prompts", True, "pairs"),
])
def test_each_configuration_names_one_method(keys, name, data, reference, unit):
    args = load_config(["--model", "m", "--data", "d"], overrides=keys)
    method = methods.choose(args)
    assert (method.name, method.data, method.reference, method.unit) == (name, data, reference, unit)
    assert method.samples == (data == "prompts")
    assert method.name in methods.METHODS


def test_grpo_defaults_to_beta_0_and_the_others_keep_theirs():
    assert load_config(["--model", "m", "--data", "d"], overrides={"loss_type": "grpo"}).beta == 0.0
    assert load_config(["--model", "m", "--data", "d"], overrides={"loss_type": "dpo"}).beta == 0.1


@pytest.mark.parametrize("keys, message", [
    ({"rl": "grpo", "loss_type": "dpo"}, "'rl: grpo' contradicts 'loss_type: dpo'"),
    ({"loss_type": ["dapo", "dpo"]}, "cannot be combined"),
    ({"loss_type": "kto", "online": True}, "'online: true' turns a paired objective"),
    ({"loss_type": "simpo", "rounds": 2}, "'rounds' trains a paired objective with a reference"),
    ({"loss_type": "dapo", "loss_terms": [{"fn": "m.f"}]}, "'loss_terms' work with the paired objectives"),
    ({"loss_type": "dpo", "beta": 0}, "invalid value for 'beta': 0"),
])
def test_rules_that_depend_on_the_method_are_one_line_errors(keys, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(["--model", "m", "--data", "d"], overrides=keys)
    assert "\n" not in str(e.value)


def test_iterative_dpo_runs_in_one_process():
    args = load_config(["--model", "m", "--data", "d"], overrides={"rounds": 2})
    with pytest.raises(ConfigError, match="runs in one process"):
        methods.choose(args, processes=2)
    assert methods.choose(args, processes=1).name == "iterative_dpo"


def test_a_method_that_samples_needs_reward_functions_found_before_loading(tmp_path):
    args = load_config(["--model", "m", "--data", "d"], overrides={"online": True})
    with pytest.raises(ConfigError, match="online: true learns from rewards: set 'reward_funcs'"):
        methods.find_reward_funcs(methods.choose(args), args)
    args = load_config(["--model", "m", "--data", "d"], overrides={"loss_type": "dpo"})
    assert methods.find_reward_funcs(methods.choose(args), args) == []


def test_user_code_is_found_beside_the_config_or_on_sys_path_and_named_before_it_runs(tmp_path, monkeypatch, capsys):
    here, elsewhere = tmp_path / "configs", tmp_path / "cwd"
    here.mkdir()
    elsewhere.mkdir()
    for folder in (here, elsewhere):
        (folder / "rw_where.py").write_text(f"def score(completions, **kw):\n    return [{str(folder)!r}] * 0\n")
    (here / "run.yaml").write_text("model: m\ndata: d\nonline: true\nreward_funcs: [rw_where.score]\n")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(elsewhere))])
    args = load_config(["--config", str(here / "run.yaml")])
    (name, fn), = methods.find_reward_funcs(methods.choose(args), args)
    assert fn.__code__.co_filename == str((here / "rw_where.py").resolve())
    assert f"[INFO] reward function 'rw_where.score': running the code of {(here / 'rw_where.py').resolve()}" in capsys.readouterr().out
    # Without a config beside it, a file in the working directory is not picked up: only sys.path is.
    args = load_config(["--model", "m", "--data", "d"], overrides={"online": True, "reward_funcs": ["rw_where.score"]})
    with pytest.raises(ConfigError, match="no module 'rw_where': not a file \\(no folders\\) nor importable"):
        methods.find_reward_funcs(methods.choose(args), args)


@pytest.mark.parametrize("pack_head, multiple, expected", [(True, 1, 1), (True, 8, 8), (False, 1, 32), (False, 64, 64)])
def test_sampled_rows_pad_to_the_longest_unless_the_step_is_compiled(pack_head, multiple, expected):
    # pack_head is on exactly when the step is not compiled (lora.cpu_plan)
    args = load_config(["--model", "m", "--data", "d"], overrides={"loss_type": "dapo", "pad_to_multiple": multiple})
    assert methods.sampled_padding(args, Forward(pack_head=pack_head)) == expected


@pytest.mark.parametrize("value, expected", [("auto", True), (True, True), (False, False)])
def test_sampling_merges_the_adapters_on_a_cpu_unless_told_not_to(value, expected):
    args = load_config(["--model", "m", "--data", "d"], overrides={"loss_type": "dapo", "fast_decode": value})
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        assert methods.sampling_params(args, Forward()).fast_decode is expected
    finally:
        mx.set_default_device(previous)
