"""LLM judges: grading logic (pointwise scores, pairwise in both orders), the configuration's
one-line errors, and a real ``mlx_lm.server`` on 127.0.0.1 serving the demo model: its answers
equal the same model judging in-process, GRPO learns from it, and the run survives the server
going away (one line, after a checkpoint)."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from mlx_dpo.config import ConfigError, load_config
from mlx_dpo.lora import run
from mlx_dpo.online.judge import Judge, JudgeConfig, JudgeError, make_judge, parse_choice, parse_score
from mlx_dpo.toy import write_jsonl
from mlx_dpo.train.checkpoint import STATE, load_training_state
from mlx_dpo.train.metrics_log import read_metrics
from tests.support import REVIEW_ITEMS, ROOT, review_prompts

DEMO_MODEL = ROOT / "examples" / "demo" / "model"


def scripted(answer_of):
    """A judge whose answers come from ``answer_of(question)``, to check the grading alone."""
    def build(mode):
        cfg = JudgeConfig.from_dict({"url": "http://unused", "mode": mode})
        return Judge(cfg, answer_of)
    return build


def test_parsing():
    assert parse_score("Score: 7/10") == 7.0 and parse_score("-1.5") == -1.5 and parse_score("no idea") is None
    assert parse_choice("B.") == "B" and parse_choice("(A)") == "A" and parse_choice("The answer is B") == "B"
    assert parse_choice("Response A is better than response B") == "A" and parse_choice("Response A is better") == "A"
    for unclear in ("both", "A wonderful film.", "a", "Response A or Response B", "AB"):
        assert parse_choice(unclear) is None, unclear


def test_pointwise_reads_the_first_number_and_none_otherwise():
    judge = scripted(lambda q: "8" if "good" in q else "hmm")("pointwise")
    assert judge(prompts=["p", "p"], completions=["a good one", "a bad one"]) == [8.0, None]


def test_pairwise_asks_both_orders_so_position_bias_cancels():
    def fair(q):  # prefers the response containing "good", wherever it stands
        a = q.split("Response A:\n")[1].split("\n\nResponse B:")[0]
        return "A" if "good" in a else "B"
    prompts = ["p1", "p1", "p2", "p2", "p2"]
    completions = ["good", "bad", "bad", "good", "bad"]
    # Two "bad" answers of p2 split their mutual duels (the judge picks B between equals): a quarter each.
    assert scripted(fair)("pairwise")(prompts=prompts, completions=completions) == [1.0, 0.0, 0.25, 1.0, 0.25]
    always_a = scripted(lambda q: "A")("pairwise")
    assert always_a(prompts=prompts, completions=completions) == [0.5] * 5  # pure position bias: no preference
    assert scripted(lambda q: "?")("pairwise")(prompts=["p", "p"], completions=["x", "y"]) == [None, None]
    messages = [[{"role": "user", "content": "p"}]] * 2
    assert scripted(fair)("pairwise")(prompts=messages, completions=[[{"role": "assistant", "content": "good"}],
                                                                   [{"role": "assistant", "content": "bad"}]]) == [1.0, 0.0]


@pytest.mark.parametrize("block,message", [
    ({"mode": "pointwise"}, "give 'url'"),
    ({"url": "http://x", "mode": "ranked"}, "choose pointwise or pairwise"),
    ({"url": "http://x", "template": "Rate {completion}"}, "lacks {prompt}"),
    ({"url": "http://x", "mode": "pairwise", "template": "{prompt} {a}"}, "lacks {b}"),
    ({"url": "http://x", "timout": 3}, "unknown key 'timout'"),
    ({"url": "http://x", "retries": -1}, "retries -1"),
])
def test_bad_judge_blocks_are_one_line(tiny_model_path, tiny_data_path, tmp_path, block, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--model", str(tiny_model_path), "--data", str(tiny_data_path), "--adapter-path", str(tmp_path),
                     "--train"], overrides={"loss_type": "grpo", "judge": block})


# ----------------------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(DEMO_MODEL), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.loads(r.read()).get("status") == "ok":
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("mlx_lm.server did not start")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = start_server(port)
    yield f"http://127.0.0.1:{port}/v1"
    proc.kill()
    proc.wait()


def test_the_server_judges_as_the_same_model_in_process(server):
    prompts = ["Write a review of the film.", "Write a review of the park."]
    completions = ["A wonderful film, I loved it.", "The park was dirty and loud."]
    block = {"mode": "pointwise", "max_tokens": 8, "concurrency": 2}
    remote, local = make_judge({**block, "url": server}), make_judge({**block, "model": str(DEMO_MODEL)})
    questions = [remote.cfg.prompt_template.replace("{prompt}", p).replace("{completion}", c) for p, c in zip(prompts, completions)]
    answers = remote.answers(questions)
    assert answers == local.answers(questions) and all(a.strip() for a in answers)  # greedy on both sides: the same text
    assert remote(prompts=prompts, completions=completions) == [parse_score(a) for a in answers]


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    rows = review_prompts(REVIEW_ITEMS[:4])
    for split in ("train", "valid", "test"):
        write_jsonl(root / "data" / f"{split}.jsonl", rows)
    return root


def grpo_args(root, out, url, *extra, **judge):
    path = root / f"{out.name}.yaml"
    path.write_text(json.dumps({"loss_type": "dapo", "num_generations": 2, "max_completion_length": 6,
                                "judge": {"url": url, "max_tokens": 4, **judge},
                                "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}))
    return ["--config", str(path), "--model", str(DEMO_MODEL), "--data", str(root / "data"), "--adapter-path", str(out),
            "--train", "--batch-size", "2", "--num-layers", "-1", "--steps-per-report", "1", "--val-batches", "0",
            "--learning-rate", "1e-4", *extra]


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_grpo_trains_from_the_served_judge(server, prompt_data, tmp_path, mode):
    out = tmp_path / mode
    run(load_config(grpo_args(prompt_data, out, server, "--iters", "2", mode=mode)))
    last = [r for r in read_metrics(out) if r["split"] == "train"][-1]
    # The demo model writes reviews, not grades: whatever it answers is parsed and counted.
    assert 0.0 <= last["rewards/judge/unscored"] <= 1.0 and "rewards/judge/mean" in last
    assert np.isfinite(last["loss"]) and last["num_tokens"] > 0


def test_the_server_going_away_ends_in_one_line_after_a_checkpoint(prompt_data, tmp_path):
    port = free_port()
    proc = start_server(port)
    out = tmp_path / "gone"
    args = grpo_args(prompt_data, out, f"http://127.0.0.1:{port}/v1", "--iters", "40", "--save-every", "1",
                     timeout=5, retries=1)

    def stop_after_two_steps():
        while not (out / "0000002_adapters.safetensors").is_file() and proc.poll() is None:
            time.sleep(0.05)
        proc.kill()

    killer = threading.Thread(target=stop_after_two_steps)
    killer.start()
    res = subprocess.run([sys.executable, "-m", "mlx_dpo.lora", *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    killer.join()
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and f"the judge at http://127.0.0.1:{port}/v1 did not answer after 2 tries" in err[0], err
    assert load_training_state(out / STATE)[1] >= 2  # the steps before the server went away are kept


def test_an_unreachable_judge_raises_judge_error():
    judge = make_judge({"url": f"http://127.0.0.1:{free_port()}/v1", "timeout": 1, "retries": 0})
    with pytest.raises(JudgeError, match="did not answer after 1 tries"):
        judge(prompts=["p"], completions=["c"])
