"""mlx-dpo against TRL's DPOTrainer and GRPOTrainer: the same model, data, LoRA and lengths, one after the other.

    python benchmarks/compare_trl.py [--model DIR] [--steps 12] [--shapes long,short] [--trl-venv DIR]
    python benchmarks/compare_trl.py --methods grpo [--grpo-steps 6]     # GRPO only
    python benchmarks/compare_trl.py --methods grpo --tools trl,mlx,mlx-lm-lora   # with mlx-lm-lora's GRPO too

Both tools train DPO (sigmoid loss, beta 0.1) with LoRA rank 8, alpha 16 (mlx-lm's ``scale``
2.0) on every linear layer of the model, in float32 on the CPU, 2 pairs a step, sequences cut at
256 tokens, the reference being the adapter-disabled base (TRL's default with PEFT, mlx-dpo's
default with LoRA), one epoch over ``2 x steps`` pairs. TRL runs in a virtual environment of
its own (``--trl-venv``, made on first use: ``torch==2.13.0`` and ``trl peft transformers
datasets accelerate`` from the package index); nothing of it is a dependency of mlx-dpo.

The pairs are real text in two shapes, from the movie-review sentences of ``vadersentiment``'s
source distribution (as ``examples/real`` fetches them):

- ``long``: hh-rlhf's shape, a dialogue prompt (``Human:``/``Assistant:`` turns, 4 sentences)
  about twice as long as each answer (2 sentences);
- ``short``: a one-line instruction and answers of 1-2 sentences.

Reported per tool and shape: the median step time and the steady throughput in non-padding
tokens per second over exactly the timed steps (those after ``--warmup``): the tokens of those
steps (the prompt counted with each answer, as TRL's batch holds it; each tool counts its own
batches, which come in different orders) over their summed time; the process's peak RSS; then
mlx-dpo's ratio. The model defaults to SmolLM2-135M-Instruct as ``examples/real/run.py``
converts it.

``--mlx-variants`` also trains mlx-dpo with other settings on the same pairs (``VARIANTS``: the
plain path without prefix sharing or streams, the compiled step with and without shape
bucketing, ``mlx-exp``: MLX's own SiLU and exp instead of ``compute/fastops.cpp``) and prints how far each one's losses are from the default run's, step by step.

``--methods grpo`` (``--methods dpo,grpo``: both) runs GRPO as the issue that asked for it set it
up: 2 prompts x 4 completions a step, up to 32 new tokens, temperature 1, beta 0 (no reference
pass), TRL's default ``dapo`` loss, one cheap reward function (the number of distinct words of a
completion over 10, the same code on both sides), LoRA as above, ``--grpo-steps`` steps. The
prompts are the first 6 words of review sentences, as plain text. Reported per tool: the median
step time, the median rollout (sampling) time inside a step (TRL: its ``_generate_single_turn``,
timed by a wrapper), the rest of the step, completion tokens per second over exactly the timed
steps (their sampled tokens over their summed step time), and peak RSS, with mlx-dpo's ratio.

``--parity`` compares the numbers instead of the speed: both tools train on the same batches in
the same order (mlx-dpo's seeded order, given to TRL in sequence), from the same LoRA
initialisation (mlx-dpo's, exported in PEFT's layout), with plain SGD at a constant rate and no
gradient clipping, and the script prints each step's loss and reward accuracy side by side with
the largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
TRL_PACKAGES = ["torch==2.13.0", "trl", "peft", "transformers", "datasets", "accelerate"]
# mlx-dpo settings compared with its defaults (compile auto, cpu_streams auto, prefix_sharing auto).
VARIANTS = {
    "default": {},
    "unshared": {"prefix_sharing": False, "cpu_streams": 1},
    "compiled": {"compile": True, "cpu_streams": 1},
    "compiled-pad32": {"compile": True, "cpu_streams": 1, "pad_to_multiple": 32},
    "one-stream": {"cpu_streams": 1},
    "mlx-exp": {},  # the default settings, with MLX's own SiLU and exp: VARIANT_ENV
}
# Variants that differ in the environment: MLX_DPO_CC=off builds no compute/fastops.cpp.
VARIANT_ENV = {"mlx-exp": {"MLX_DPO_CC": "off"}}
USE_CPU = [True]  # --device: TRL on the CPU, or on CUDA (mlx-dpo uses MLX's default device either way)
LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


# What both TRL scripts start with: settings from argv[1], the model, the data, a step timer
# (``on_begin`` runs at each step's start) and the LoRA of every linear layer.
TRL_PRELUDE = r'''
import json, resource, sys, time
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
s = json.loads(sys.argv[1])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(s["model"])
model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
data = load_dataset("json", data_files=s["data"], split="train")
times, on_begin = [], []

class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()
        for f in on_begin:
            f()
    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t)

peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
'''

TRL_SCRIPT = TRL_PRELUDE + r'''
from trl import DPOConfig, DPOTrainer
tokens = []

class Counting(DPOTrainer):
    def training_step(self, model, inputs, *a, **kw):
        tokens.append(int(inputs["attention_mask"].sum()))
        return super().training_step(model, inputs, *a, **kw)

cfg = DPOConfig(output_dir=s["out"], per_device_train_batch_size=2, max_steps=s["steps"], learning_rate=5e-6,
                beta=0.1, max_length=256, logging_steps=1, save_strategy="no", report_to=[], use_cpu=s.get("use_cpu", True),
                gradient_checkpointing=False, seed=0, bf16=False, fp16=False, dataloader_num_workers=0)
trainer = Counting(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=peft, callbacks=[Timer()])
trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print(json.dumps({"times": times, "tokens": tokens, "losses": losses,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "version": __import__("trl").__version__}))
'''

# GRPO in TRL's venv: argv[1] is a JSON of settings; prints one JSON line of results.
TRL_GRPO_SCRIPT = TRL_PRELUDE + r'''
from trl import GRPOConfig, GRPOTrainer
rollout, sampled = [], []
on_begin.append(lambda: (rollout.append(0.0), sampled.append(0)))
exec(s["reward"])  # def distinct_words(completions, **kw): the same source as mlx-dpo's side

class Timed(GRPOTrainer):
    def _generate_single_turn(self, *a, **kw):
        t = time.perf_counter()
        out = super()._generate_single_turn(*a, **kw)
        if rollout:
            rollout[-1] += time.perf_counter() - t
            sampled[-1] += sum(len(c) for c in out[0])
        return out

cfg = GRPOConfig(output_dir=s["out"], per_device_train_batch_size=s["prompts"] * s["group"], num_generations=s["group"],
                 max_completion_length=s["max_tokens"], temperature=1.0, beta=0.0, learning_rate=1e-6, max_steps=s["steps"],
                 logging_steps=1, save_strategy="no", report_to=[], use_cpu=s.get("use_cpu", True), seed=0, bf16=False, fp16=False,
                 dataloader_num_workers=0, gradient_checkpointing=False)
trainer = Timed(model=model, args=cfg, train_dataset=data, processing_class=tok, reward_funcs=[distinct_words],
                peft_config=peft, callbacks=[Timer()])
trainer.train()
print(json.dumps({"times": times, "rollout": rollout[:len(times)], "tokens": sampled[:len(times)],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "version": __import__("trl").__version__}))
'''

# GRPO with mlx-lm-lora (its own venv, --mlx-lm-lora-venv): its train_grpo on the same prompts as
# plain text, group, length, temperature 1 (top-p and top-k off), beta 0, LoRA and reward. Its
# sampling (generate_grpo) is timed by a wrapper, as TRL's is.
MLX_LM_LORA_GRPO_SCRIPT = r'''
import json, resource, sys, time
import mlx.core as mx
import mlx.optimizers as optim
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load
import mlx_lm_lora
import mlx_lm_lora.trainer.grpo_trainer as grpo
from mlx_lm_lora.trainer.datasets import GRPODataset
s = json.loads(sys.argv[1])
exec(s["reward"])  # def distinct_words(completions, **kw): the same source as the other tools
def reward(prompts, completions, answer, types=None):
    return distinct_words(completions)
mx.random.seed(0)
model, tok = load(s["model"])
model.freeze()
linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": s["keys"]})
rows = [json.loads(line) for line in open(s["data"])]
data = GRPODataset([{"prompt": r["prompt"], "answer": ""} for r in rows], tok, text_completion_key="prompt")
times, rollout, sampled = [], [], []
generate = grpo.generate_grpo
def timed(*a, **kw):
    t = time.perf_counter()
    out = generate(*a, **kw)
    rollout.append(time.perf_counter() - t)
    sampled.append(sum(len(c) for c in out[0]))
    return out
grpo.generate_grpo = timed
class Timer(TrainingCallback):
    def on_train_loss_report(self, info):
        times.append(1.0 / info["iterations_per_second"])
args = grpo.GRPOTrainingArgs(batch_size=s["prompts"], group_size=s["group"], max_completion_length=s["max_tokens"],
                             iters=s["steps"], steps_per_report=1, steps_per_eval=10**6, steps_per_save=10**6, val_batches=0,
                             beta=0.0, temperature=1.0, top_p=1.0, top_k=0, adapter_file=s["out"] + "/adapters.safetensors",
                             max_seq_length=512)
grpo.train_grpo(model=model, ref_model=None, tokenizer=tok, optimizer=optim.Adam(learning_rate=1e-6), train_dataset=data,
                val_dataset=None, reward_funcs=[reward], args=args, training_callback=Timer())
print(json.dumps({"times": times, "rollout": rollout[:len(times)], "tokens": sampled[:len(times)],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "version": mlx_lm_lora.__version__}))
'''

# The cheap reward both tools call in GRPO (its source runs in TRL's process, and as a file for mlx-dpo).
GRPO_REWARD = """
def distinct_words(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(t.split())) / 10 for t in texts]
"""

# Runs mlx_dpo.lora in a child process and reports its peak RSS the same way.
MLX_SCRIPT = r'''
import json, resource, runpy, sys
sys.argv = ["mlx_dpo.lora", "--config", sys.argv[1]]
try:
    runpy.run_module("mlx_dpo.lora", run_name="__main__")
finally:
    print("PEAK_RSS_GB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
'''


# Runs inside TRL's venv for --parity: the same steps as mlx-dpo, in order, from given LoRA weights.
TRL_PARITY_SCRIPT = r'''
import json, sys
import torch
from datasets import load_dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
s = json.loads(sys.argv[1])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(s["model"])
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32), s["init"], is_trainable=True)
data = load_dataset("json", data_files=s["data"], split="train")
tokens = []

class InOrder(DPOTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)
    def training_step(self, model, inputs, *a, **kw):
        tokens.append(int(inputs["attention_mask"].sum()))
        return super().training_step(model, inputs, *a, **kw)

cfg = DPOConfig(output_dir=s["out"], per_device_train_batch_size=2, max_steps=s["steps"], learning_rate=s["lr"], optim="sgd",
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, beta=0.1,
                max_length=256, logging_steps=1, save_strategy="no", report_to=[], use_cpu=s.get("use_cpu", True), seed=0,
                bf16=False, fp16=False, dataloader_num_workers=0)
trainer = InOrder(model=model, args=cfg, train_dataset=data, processing_class=tok)
trainer.train()
logs = [h for h in trainer.state.log_history if "loss" in h]
print(json.dumps({"losses": [h["loss"] for h in logs], "accuracies": [h["rewards/accuracies"] for h in logs],
                  "tokens": tokens, "version": __import__("trl").__version__}))
'''


def review_sentences() -> list[str]:
    """The rated movie-review sentences (downloaded once into examples/real/work)."""
    sys.path.insert(0, str(ROOT / "examples" / "real"))
    from prefixes import review_sentences as read

    return read(ROOT / "examples" / "real" / "work")


def make_pairs(sentences: list[str], shape: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/chosen/rejected records of real sentences in the given shape."""
    rng = random.Random(seed)

    def pick(k: int) -> str:
        return " ".join(rng.choice(sentences) for _ in range(k))

    pairs = []
    for _ in range(n):
        if shape == "long":
            prompt = f"\n\nHuman: {pick(2)}\n\nAssistant: {pick(1)}\n\nHuman: {pick(1)}\n\nAssistant:"
            pairs.append({"prompt": prompt, "chosen": " " + pick(2), "rejected": " " + pick(2)})
        else:
            want = rng.choice(["positive", "negative"])
            pairs.append({"prompt": f"Write a {want} movie review.", "chosen": " " + pick(rng.randint(1, 2)),
                          "rejected": " " + pick(rng.randint(1, 2))})
    return pairs


@contextmanager
def work_folder(records: list[dict]) -> Iterator[Path]:
    """A temporary folder for one comparison, holding ``data/train.jsonl`` with ``records``."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        (work / "data" / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
        yield work


def trl_python(venv: Path) -> Path:
    """The venv's python, the venv made (with TRL and its stack) if it is not there yet."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making TRL's venv in {venv} (once; a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    return python


def steady(times: list[float], tokens: list[float], warmup: int) -> dict:
    """Median step time and tokens/s over exactly the steps after the warm-up: their tokens over their time."""
    kept, counted = (times[warmup:], tokens[warmup:]) if len(times) > warmup else (times, tokens)
    return {"median_step_s": statistics.median(kept), "tokens_per_s": sum(counted) / sum(kept),
            "tokens_per_step": statistics.mean(counted), "steps_timed": len(kept)}


def run_trl(python: Path, model: str, data: Path, steps: int, warmup: int, work: Path) -> dict:
    settings = {"model": model, "data": str(data), "steps": steps, "out": str(work / "trl"), "use_cpu": USE_CPU[0]}
    done = subprocess.run([str(python), "-c", TRL_SCRIPT, json.dumps(settings)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"TRL failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {**steady(out["times"], out["tokens"], warmup), "peak_rss_gb": out["peak_rss_gb"],
            "losses": out["losses"], "tool": f"TRL {out['version']}"}


def run_mlx(model: str, data_dir: Path, steps: int, warmup: int, work: Path, variant: str = "default") -> dict:
    config = {
        "model": model, "data": str(data_dir), "train": True, "test": False, "loss_type": "dpo", "beta": 0.1,
        "fine_tune_type": "lora", "num_layers": -1,
        "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": LORA_KEYS},
        "optimizer": "adam", "learning_rate": 5e-6, "batch_size": 2, "iters": steps, "max_seq_length": 256,
        "steps_per_report": 1, "steps_per_eval": 10**6, "val_batches": 0, "save_every": 10**6,
        "adapter_path": str(work / f"mlx-{variant}"), "seed": 0, **VARIANTS[variant],
    }
    path = work / "mlx.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, **VARIANT_ENV.get(variant, {})}
    done = subprocess.run([sys.executable, "-c", MLX_SCRIPT, str(path)], capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode:
        raise SystemExit(f"mlx-dpo failed:\n{done.stderr[-3000:]}")
    rss = float(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_GB")))
    rows = [json.loads(x) for x in (work / f"mlx-{variant}" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    times = [1.0 / r["iterations_per_second"] for r in train]
    tokens = [r["tokens_per_second"] * t for r, t in zip(train, times)]  # one report a step: that step's real tokens
    tool = "mlx-dpo" if variant == "default" else f"mlx-dpo {variant}"
    return {**steady(times, tokens, warmup), "peak_rss_gb": rss, "losses": [r["loss"] for r in train], "tool": tool}


def grpo_prompts(sentences: list[str], n: int, seed: int = 0) -> list[dict]:
    """``n`` plain-text prompts: the first 6 words of review sentences of at least 10 words."""
    rng = random.Random(seed)
    long = [x for x in sentences if len(x.split()) >= 10]
    return [{"prompt": " ".join(rng.choice(long).split()[:6])} for _ in range(n)]


GRPO_SHAPE = {"prompts": 2, "group": 4, "max_tokens": 32}


def run_trl_grpo(python: Path, model: str, data: Path, steps: int, warmup: int, work: Path) -> dict:
    settings = {"model": model, "data": str(data), "steps": steps, "out": str(work / "trl-grpo"), "reward": GRPO_REWARD,
                "use_cpu": USE_CPU[0], **GRPO_SHAPE}
    return run_grpo_script(python, TRL_GRPO_SCRIPT, settings, "TRL", warmup)


def run_mlx_lm_lora_grpo(python: Path, model: str, data: Path, steps: int, warmup: int, work: Path) -> dict:
    (work / "mlx-lm-lora").mkdir(exist_ok=True)
    settings = {"model": model, "data": str(data), "steps": steps, "out": str(work / "mlx-lm-lora"), "reward": GRPO_REWARD,
                "keys": LORA_KEYS, **GRPO_SHAPE}
    return run_grpo_script(python, MLX_LM_LORA_GRPO_SCRIPT, settings, "mlx-lm-lora", warmup)


def run_grpo_script(python: Path, script: str, settings: dict, name: str, warmup: int) -> dict:
    """Another tool's GRPO script in its own venv; its last line is a JSON of per-step times."""
    done = subprocess.run([str(python), "-c", script, json.dumps(settings)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} GRPO failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {**grpo_steady(out["times"], out["rollout"], out["tokens"], warmup), "peak_rss_gb": out["peak_rss_gb"],
            "tool": f"{name} {out['version']}"}


def grpo_steady(times: list[float], rollout: list[float], tokens: list[float], warmup: int) -> dict:
    """Medians of step, rollout and the rest over the steps after the warm-up; completion tokens over their time."""
    k = warmup if len(times) > warmup else 0
    t, r, n = times[k:], rollout[k:], tokens[k:]
    return {"median_step_s": statistics.median(t), "median_rollout_s": statistics.median(r),
            "median_rest_s": statistics.median(a - b for a, b in zip(t, r)), "tokens_per_s": sum(n) / sum(t),
            "tokens_per_step": statistics.mean(n), "steps_timed": len(t)}


def run_mlx_grpo(model: str, data_dir: Path, steps: int, warmup: int, work: Path) -> dict:
    (work / "grpo_rewards.py").write_text(GRPO_REWARD)
    config = {
        "model": model, "data": str(data_dir), "train": True, "test": False, "loss_type": "dapo", "beta": 0.0,
        "reward_funcs": ["grpo_rewards.distinct_words"], "num_generations": GRPO_SHAPE["group"],
        "batch_size": GRPO_SHAPE["prompts"], "max_completion_length": GRPO_SHAPE["max_tokens"], "temperature": 1.0,
        "fine_tune_type": "lora", "num_layers": -1,
        "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": LORA_KEYS},
        "optimizer": "adam", "learning_rate": 1e-6, "iters": steps, "steps_per_report": 1, "steps_per_eval": 10**6,
        "val_batches": 0, "save_every": 10**6, "adapter_path": str(work / "mlx-grpo"), "seed": 0,
    }
    path = work / "mlx_grpo.json"  # beside grpo_rewards.py: reward functions are found beside the config
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-c", MLX_SCRIPT, str(path)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"mlx-dpo GRPO failed:\n{done.stderr[-3000:]}")
    rss = float(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_GB")))
    rows = [json.loads(x) for x in (work / "mlx-grpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    times = [1.0 / r["iterations_per_second"] for r in train]
    tokens = [r["rollout_tokens_per_second"] * r["rollout_seconds"] for r in train]
    rollout = [r["rollout_seconds"] for r in train]
    return {**grpo_steady(times, rollout, tokens, warmup), "peak_rss_gb": rss, "tool": "mlx-dpo"}


def compare_grpo(args, sentences: list[str], python: Optional[Path]) -> None:
    prompts = grpo_prompts(sentences, GRPO_SHAPE["prompts"] * args.grpo_steps * 2)
    table = []
    with work_folder(prompts) as work:
        for tool in args.tools.split(","):
            print(f"[compare_trl] GRPO: {tool}, {args.grpo_steps} steps", flush=True)
            if tool == "trl":
                table.append(run_trl_grpo(python, args.model, work / "data" / "train.jsonl", args.grpo_steps, args.warmup, work))
            elif tool == "mlx-lm-lora":
                lora_python = Path(args.mlx_lm_lora_venv) / "bin" / "python"
                if not lora_python.exists():
                    print(f"[compare_trl] no {lora_python}: mlx-lm-lora left out (make it: python -m venv {args.mlx_lm_lora_venv} && "
                          f"{args.mlx_lm_lora_venv}/bin/pip install mlx-lm-lora 'mlx[cpu]')", flush=True)
                    continue
                table.append(run_mlx_lm_lora_grpo(lora_python, args.model, work / "data" / "train.jsonl", args.grpo_steps,
                                                  args.warmup, work))
            else:
                table.append(run_mlx_grpo(args.model, work / "data", args.grpo_steps, args.warmup, work))
    print("\n| GRPO | steps timed | completion tokens a step | median step (s) | median rollout (s) | median rest (s) | "
          "completion tokens/s | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['tool']} | {r['steps_timed']} | {r['tokens_per_step']:.0f} | {r['median_step_s']:.2f} | "
              f"{r['median_rollout_s']:.2f} | {r['median_rest_s']:.2f} | {r['tokens_per_s']:.1f} | {r['peak_rss_gb']:.2f} |")
    mine = next((r for r in table if r["tool"] == "mlx-dpo"), None)
    for other in (r for r in table if r["tool"] != "mlx-dpo" and mine is not None):
        print(f"GRPO: mlx-dpo / {other['tool']} completion tokens/s {mine['tokens_per_s'] / other['tokens_per_s']:.2f}x, "
              f"peak RSS {mine['peak_rss_gb'] / other['peak_rss_gb']:.2f}x")


def mlx_order_and_init(model: str, data_dir: Path, steps: int, work: Path) -> tuple[list[int], Path, Path]:
    """mlx-dpo's first ``steps`` batches (pair indices, in its seeded order) and its LoRA initialisation,
    saved in mlx-lm's layout (to resume from) and in PEFT's (for TRL)."""
    import mlx_dpo  # noqa: F401  (the BLAS before mlx)
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from mlx_dpo.compute.batching import iterate_batches
    from mlx_dpo.data import load_datasets
    from mlx_dpo.export.peft import to_peft

    policy, tokenizer = load(model)
    pairs = load_datasets(str(data_dir), tokenizer, "pairs", 256, splits=("train",))["train"]
    order = [int(i) for b in iterate_batches(pairs, 2, seed=0) for i in b["index"].tolist()][: 2 * steps]
    mx.random.seed(0)
    policy.freeze()
    linear_to_lora_layers(policy, -1, {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": LORA_KEYS})
    init = work / "init"
    init.mkdir()
    mx.save_safetensors(str(init / "adapters.safetensors"), dict(tree_flatten(policy.trainable_parameters())))
    (init / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": -1,
                                                          "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}}))
    return order, init / "adapters.safetensors", to_peft(init, work / "init-peft", model)


def parity(args, sentences: list[str], python: Path) -> None:
    """``--parity``: per-step loss and reward accuracy of both tools on the same batches, init and optimizer."""
    pairs = make_pairs(sentences, "long", 2 * args.steps)
    with work_folder(pairs) as work:
        order, init, peft = mlx_order_and_init(args.model, work / "data", args.steps, work)
        (work / "trl.jsonl").write_text("".join(json.dumps(pairs[i]) + "\n" for i in order))
        config = {
            "model": args.model, "data": str(work / "data"), "train": True, "test": False, "loss_type": "dpo", "beta": 0.1,
            "fine_tune_type": "lora", "num_layers": -1, "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": LORA_KEYS},
            "optimizer": "sgd", "learning_rate": args.parity_lr, "batch_size": 2, "iters": args.steps, "max_seq_length": 256,
            "steps_per_report": 1, "steps_per_eval": 10**6, "val_batches": 0, "save_every": 10**6, "seed": 0,
            "adapter_path": str(work / "mlx"), "resume_adapter_file": str(init),
        }
        (work / "mlx.json").write_text(json.dumps(config))
        done = subprocess.run([sys.executable, "-c", MLX_SCRIPT, str(work / "mlx.json")], capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"mlx-dpo failed:\n{done.stderr[-3000:]}")
        rows = [json.loads(x) for x in (work / "mlx" / "metrics.jsonl").read_text().splitlines()]
        ours = [r for r in rows if r.get("split") == "train"]
        settings = {"model": args.model, "data": str(work / "trl.jsonl"), "steps": args.steps, "out": str(work / "trl"),
                    "init": str(peft), "lr": args.parity_lr}
        done = subprocess.run([str(python), "-c", TRL_PARITY_SCRIPT, json.dumps(settings)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"TRL failed:\n{done.stderr[-3000:]}")
        trl = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nDPO on the same batches, SGD {args.parity_lr} constant, LoRA r8 from one initialisation; TRL {trl['version']}")
    print("\n| step | mlx-dpo loss | TRL loss | difference | mlx-dpo reward acc. | TRL reward acc. | tokens (mlx-dpo / TRL) |")
    print("|---|---|---|---|---|---|---|")
    for k, (m, t_loss, t_acc, t_tok) in enumerate(zip(ours, trl["losses"], trl["accuracies"], trl["tokens"]), 1):
        m_tok = m["tokens_per_second"] / m["iterations_per_second"]
        print(f"| {k} | {m['loss']:.6f} | {t_loss:.6f} | {m['loss'] - t_loss:+.1e} | {m['rewards/accuracies']:.2f} | {t_acc:.2f} | {m_tok:.0f} / {t_tok} |")
    gap = max(abs(m["loss"] - t) for m, t in zip(ours, trl["losses"]))
    same_acc = all(abs(m["rewards/accuracies"] - t) < 1e-6 for m, t in zip(ours, trl["accuracies"]))
    print(f"\nlargest loss difference over {len(ours)} steps: {gap:.1e}; reward accuracies {'equal' if same_acc else 'DIFFER'} at every step; "
          f"last loss {ours[-1]['loss']:.4f} (from {ours[0]['loss']:.4f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "examples" / "real" / "work" / "smollm2-135m-instruct"))
    p.add_argument("--steps", type=int, default=12, help="Steps per tool and shape (2 pairs each: one epoch).")
    p.add_argument("--warmup", type=int, default=2, help="Steps left out of the steady figures.")
    p.add_argument("--shapes", default="long,short")
    p.add_argument("--trl-venv", default=str(ROOT / "benchmarks" / ".trl-venv"))
    p.add_argument("--tools", default="trl,mlx", help="Which tools to run: trl, mlx, and for GRPO mlx-lm-lora.")
    p.add_argument("--mlx-lm-lora-venv", default=str(ROOT / "benchmarks" / ".mlx-lm-lora-venv"),
                   help="A venv with mlx-lm-lora installed (for --tools ...,mlx-lm-lora).")
    p.add_argument("--mlx-variants", default="default", help="mlx-dpo settings to run: " + ", ".join(VARIANTS))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="Where TRL runs (cuda: torch's GPU; mlx-dpo takes MLX's default device, the GPU with mlx[cuda12]).")
    p.add_argument("--methods", default="dpo", help="dpo, grpo or both (dpo,grpo).")
    p.add_argument("--grpo-steps", type=int, default=6, help="GRPO steps per tool.")
    p.add_argument("--parity", action="store_true", help="Compare per-step losses on the same batches instead of speed.")
    p.add_argument("--parity-lr", type=float, default=1.0, help="SGD learning rate of --parity.")
    args = p.parse_args()
    if unknown := set(args.mlx_variants.split(",")) - set(VARIANTS):
        p.error(f"unknown --mlx-variants {', '.join(sorted(unknown))} (choose from {', '.join(VARIANTS)})")
    USE_CPU[0] = args.device == "cpu"
    sentences = review_sentences()
    python = trl_python(Path(args.trl_venv)) if "trl" in args.tools else None
    if args.parity:
        return parity(args, sentences, python)
    if "grpo" in args.methods.split(","):
        compare_grpo(args, sentences, python)
    if "dpo" in args.methods.split(","):
        compare_dpo(args, sentences, python)


def compare_dpo(args, sentences: list[str], python: Optional[Path]) -> None:
    table = []
    for shape in args.shapes.split(","):
        pairs = make_pairs(sentences, shape, 2 * args.steps)
        with work_folder(pairs) as work:
            for tool in args.tools.split(","):
                if tool not in ("trl", "mlx"):  # mlx-lm-lora is compared on GRPO only
                    continue
                print(f"[compare_trl] {shape} prompts: {tool}, {args.steps} steps", flush=True)
                if tool == "trl":
                    row = run_trl(python, args.model, work / "data" / "train.jsonl", args.steps, args.warmup, work)
                    table.append({"shape": shape, **row})
                    continue
                for variant in args.mlx_variants.split(","):
                    if variant != "default":
                        print(f"[compare_trl] {shape} prompts: mlx-dpo {variant}", flush=True)
                    row = run_mlx(args.model, work / "data", args.steps, args.warmup, work, variant)
                    table.append({"shape": shape, **row})
    print("\n| shape | tool | steps timed | tokens a timed step | median step (s) | non-padding tokens/s | peak RSS (GB) | first loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['shape']} | {r['tool']} | {r['steps_timed']} | {r['tokens_per_step']:.0f} | {r['median_step_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['losses'][0]:.4f} |")
    for shape in args.shapes.split(","):
        rows = {("TRL" if r["tool"].startswith("TRL") else r["tool"]): r for r in table if r["shape"] == shape}
        if "TRL" in rows and "mlx-dpo" in rows:
            t, m = rows["TRL"], rows["mlx-dpo"]
            print(f"{shape}: mlx-dpo / TRL tokens/s {m['tokens_per_s'] / t['tokens_per_s']:.2f}x, "
                  f"peak RSS {m['peak_rss_gb'] / t['peak_rss_gb']:.2f}x")
        base = next((r for r in table if r["shape"] == shape and r["tool"] == "mlx-dpo"), None)
        for r in table:
            if base is not None and r["shape"] == shape and r["tool"].startswith("mlx-dpo ") and len(r["losses"]) == len(base["losses"]):
                gap = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
                print(f"{shape}: {r['tool']}: tokens/s {r['tokens_per_s'] / base['tokens_per_s']:.2f}x the default's, "
                      f"largest loss difference from it over {len(base['losses'])} steps {gap:.1e}")


if __name__ == "__main__":
    main()
