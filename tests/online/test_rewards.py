"""Reward functions: finding the user's (axolotl's module.function), calling them, built-ins."""

import math
import sys
import textwrap

import numpy as np
import pytest

from mlx_dpo.online.rewards import (
    RewardError,
    completion_length,
    load_reward_funcs,
    score_completions,
    soft_overlong_reward,
)


def write(path, code):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(code))
    return path


def one_line_error(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    return message


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """A config folder and a separate working directory (the cwd)."""
    config, cwd = tmp_path / "config", tmp_path / "cwd"
    config.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return config, cwd


# ----------------------------------------------------------------- loading


def test_config_folder_wins_over_cwd(dirs):
    config, cwd = dirs
    write(config / "rw_order.py", "def score(completions, **kw):\n    return [1.0] * len(completions)\n")
    write(cwd / "rw_order.py", "def score(completions, **kw):\n    return [2.0] * len(completions)\n")
    [(name, fn)] = load_reward_funcs(["rw_order.score"], [config, cwd])
    assert name == "score"
    assert fn(completions=["a"]) == [1.0]


def test_cwd_is_searched_after_config_folder(dirs):
    config, cwd = dirs
    write(cwd / "rw_cwd_only.py", "def score(completions, **kw):\n    return [3.0] * len(completions)\n")
    [(_, fn)] = load_reward_funcs(["rw_cwd_only.score"], [config, cwd])
    assert fn(completions=["a", "b"]) == [3.0, 3.0]


def test_dotted_module_is_a_path_in_folders(dirs):
    config, cwd = dirs
    write(config / "pkg_a" / "mod_a.py", "def fn(completions, **kw):\n    return [7] * len(completions)\n")
    [(name, fn)] = load_reward_funcs(["pkg_a.mod_a.fn"], [config, cwd])
    assert name == "fn" and fn(completions=["x"]) == [7]


def test_importable_module_is_the_fallback(dirs, monkeypatch):
    config, cwd = dirs
    elsewhere = config.parent / "site"
    write(elsewhere / "rw_installed.py", "def score(completions, **kw):\n    return [5.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(elsewhere))
    [(_, fn)] = load_reward_funcs(["rw_installed.score"], [config, cwd])
    assert fn(completions=["a"]) == [5.0]


def test_sibling_import_works(dirs):
    config, cwd = dirs
    write(config / "rw_helpers_sib.py", "BONUS = 4.5\n")
    write(
        config / "rw_sib.py",
        """
        import rw_helpers_sib

        def score(completions, **kw):
            return [rw_helpers_sib.BONUS] * len(completions)
        """,
    )
    [(_, fn)] = load_reward_funcs(["rw_sib.score"], [config, cwd])
    assert fn(completions=["a"]) == [4.5]
    assert str(config) not in sys.path  # only while the module runs


def test_module_file_runs_once(dirs):
    config, cwd = dirs
    log = config / "runs.log"
    write(
        config / "rw_once.py",
        f"""
        with open({str(log)!r}, "a") as f:
            f.write("x")

        def a(completions, **kw):
            return [1.0] * len(completions)

        def b(completions, **kw):
            return [2.0] * len(completions)
        """,
    )
    funcs = load_reward_funcs(["rw_once.a", "rw_once.b"], [config, cwd])
    load_reward_funcs(["rw_once.a"], [config, cwd])
    assert [name for name, _ in funcs] == ["a", "b"]
    assert log.read_text() == "x"


def test_same_name_in_two_modules_is_named_by_entry(dirs):
    config, cwd = dirs
    write(config / "rw_dup1.py", "def score(**kw):\n    return []\n")
    write(config / "rw_dup2.py", "def score(**kw):\n    return []\n")
    funcs = load_reward_funcs(["rw_dup1.score", "rw_dup2.score", completion_length], [config, cwd])
    assert [name for name, _ in funcs] == ["rw_dup1.score", "rw_dup2.score", "completion_length"]


def test_callables_are_kept():
    def my_reward(completions, **kw):
        return [0.0] * len(completions)

    assert load_reward_funcs([my_reward], []) == [("my_reward", my_reward)]


def test_not_found_names_entry_and_places(dirs):
    config, cwd = dirs
    with pytest.raises(RewardError) as e:
        load_reward_funcs(["rw_missing_xyz.score"], [config, cwd])
    one_line_error(e, "'rw_missing_xyz.score'", str(config / "rw_missing_xyz.py"), str(cwd / "rw_missing_xyz.py"))


def test_syntax_error(dirs):
    config, cwd = dirs
    write(config / "rw_syntax.py", "def score(:\n    pass\n")
    with pytest.raises(RewardError) as e:
        load_reward_funcs(["rw_syntax.score"], [config, cwd])
    one_line_error(e, "'rw_syntax.score'", "syntax error", "line 1", "rw_syntax.py")


def test_import_error_inside_module(dirs):
    config, cwd = dirs
    write(config / "rw_badimport.py", "import no_such_module_qq\n")
    with pytest.raises(RewardError) as e:
        load_reward_funcs(["rw_badimport.score"], [config, cwd])
    one_line_error(e, "'rw_badimport.score'", "ModuleNotFoundError", "no_such_module_qq")
    # A failed module is not cached: fixed, it loads.
    write(config / "rw_badimport.py", "def score(**kw):\n    return []\n")
    assert load_reward_funcs(["rw_badimport.score"], [config, cwd])[0][0] == "score"


def test_missing_attribute_lists_functions(dirs):
    config, cwd = dirs
    write(config / "rw_attr.py", "def positive(**kw):\n    return []\n")
    with pytest.raises(RewardError) as e:
        load_reward_funcs(["rw_attr.positiv"], [config, cwd])
    one_line_error(e, "'rw_attr.positiv'", "no 'positiv'", "positive")


def test_not_callable(dirs):
    config, cwd = dirs
    write(config / "rw_const.py", "THRESHOLD = 3\n")
    with pytest.raises(RewardError) as e:
        load_reward_funcs(["rw_const.THRESHOLD"], [config, cwd])
    one_line_error(e, "'rw_const.THRESHOLD'", "int", "not a function")


@pytest.mark.parametrize("entry", ["no_such_builtin", "rewards.", ".score", 3])
def test_bad_entries(entry):
    with pytest.raises(RewardError) as e:
        load_reward_funcs([entry], [])
    one_line_error(e, repr(entry))


# ----------------------------------------------------------------- scoring


def batch(n=3):
    prompts = [f"p{i}" for i in range(n)]
    completions = [f"c{i}" for i in range(n)]
    ids = [[1] * (i + 1) for i in range(n)]
    return prompts, completions, ids


def test_each_function_called_once_per_batch_with_columns():
    calls = []

    def first(prompts, completions, completion_ids, answer, **kw):
        calls.append(("first", list(prompts), list(completions), answer, kw))
        return [1, 2.5, np.float32(3)]

    def second(completions, **kw):
        calls.append(("second",))
        return np.array([None, -1.0, 0], dtype=object)

    prompts, completions, ids = batch()
    out = score_completions(
        [("first", first), ("second", second)], prompts, completions, ids, {"answer": ["a", "b", "c"], "level": [1, 2, 3]}
    )
    assert out.dtype == np.float64 and out.shape == (3, 2)
    assert out[:, 0].tolist() == [1.0, 2.5, 3.0]
    assert math.isnan(out[0, 1]) and out[1:, 1].tolist() == [-1.0, 0.0]
    assert [c[0] for c in calls] == ["first", "second"]
    assert calls[0][1:4] == (prompts, completions, ["a", "b", "c"])
    assert calls[0][4] == {"level": [1, 2, 3]}


def test_bools_count_one_or_zero():
    out = score_completions([("ok", lambda completions, **kw: [True, np.bool_(False)])], ["p", "p"], ["a", "b"], [[1], [2]], {})
    assert out[:, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "result, parts",
    [
        ("nope", ["returned a str", "expected a list of 3"]),
        ({1: 1}, ["returned a dict"]),
        ([1.0, 2.0], ["returned 2 rewards for 3 completions"]),
        (np.ones((3, 1)), ["shape (3, 1)"]),
        ([1.0, "high", 2.0], ["returned a str at index 1", "'high'"]),
        ([1.0, 2.0, float("nan")], ["returned nan at index 2", "finite"]),
        ([np.inf, 2.0, 1.0], ["returned inf at index 0"]),
    ],
)
def test_bad_results_are_one_line_naming_the_function(result, parts):
    prompts, completions, ids = batch()
    with pytest.raises(RewardError) as e:
        score_completions([("my_reward", lambda **kw: result)], prompts, completions, ids, {})
    one_line_error(e, "'my_reward'", *parts)


def test_exception_in_function_is_one_line():
    def broken(**kw):
        raise ValueError("answer\nmissing")

    prompts, completions, ids = batch()
    with pytest.raises(RewardError) as e:
        score_completions([("broken", broken)], prompts, completions, ids, {})
    one_line_error(e, "'broken'", "raised ValueError", "answer missing")
    assert isinstance(e.value.__cause__, ValueError)  # the traceback stays reachable


# ----------------------------------------------------------------- built-ins


def test_completion_length_counts_tokens():
    [(name, fn)] = load_reward_funcs(["completion_length"], [])
    prompts, completions, ids = batch(3)
    out = score_completions([(name, fn)], prompts, completions, ids, {})
    assert name == "completion_length" and out[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_soft_overlong_boundaries():
    # L_max = 10, L_cache = 4: free up to 6 tokens, linear to -1 at 10, -1 beyond.
    [(name, fn)] = load_reward_funcs(["soft_overlong"], [], {"max_completion_length": 10, "overlong_buffer": 4})
    lengths = [0, 5, 6, 7, 8, 9, 10, 11, 50]
    ids = [[0] * n for n in lengths]
    out = score_completions([(name, fn)], ["p"] * len(ids), ["c"] * len(ids), ids, {})
    assert name == "soft_overlong"
    assert out[:, 0].tolist() == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert soft_overlong_reward([6, 7, 10, 11], 10, 4) == [0.0, -0.25, -1.0, -1.0]


@pytest.mark.parametrize(
    "options, part",
    [
        ({}, "max_completion_length"),
        ({"max_completion_length": 10}, "overlong_buffer"),
        ({"max_completion_length": 10, "overlong_buffer": 0}, "overlong_buffer"),
        ({"max_completion_length": 10, "overlong_buffer": 11}, "must not exceed"),
    ],
)
def test_soft_overlong_needs_valid_options(options, part):
    with pytest.raises(RewardError) as e:
        load_reward_funcs(["soft_overlong"], [], options)
    one_line_error(e, "'soft_overlong'", part)
