"""``python -m mlx_dpo.frontier --config sweep.yaml``: the reward-KL frontier of a sweep of runs.

The DPO paper's Fig. 2 (left) for your own model and reward: several runs (offline
DPO at several β, online DPO, GRPO, ...) are trained one after the other, each
checkpoint is evaluated on held-out prompts (mean reward of sampled completions,
mean sequence KL to the reference estimated from the same samples, mean length),
and the points go into one table (``frontier.md``, ``frontier.jsonl``) and one
picture (``frontier.png``: reward against KL, each method's points and its upper
envelope). A stopped sweep resumes: finished runs are not trained again, a
stopped run continues from its checkpoint, and evaluated checkpoints are read
back from ``frontier.jsonl``.

A sweep file::

    output: frontier/demo
    base: examples/quickstart.yaml        # the config every run starts from
    eval: {data: examples/demo/prompts, split: test, reward_funcs: ["demo.rewards.positive"],
           samples: 64, max_tokens: 48, temperature: 1.0, every: 25,
           proxy_reward_model: null}          # a reward model's folder: its score too (proxy vs gold)
    runs:
      - {name: dpo-b0.1, method: offline DPO, beta: 0.1}
      - {name: online, method: online DPO, config: examples/online_dpo.yaml}
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load

from . import lora
from .compute.batching import BatchSourceError, pad_batch
from .compute.forward import sequence_logps
from .config import ConfigError, load_config, read_yaml
from .data import DataError, load_prompt_splits
from .objectives.terms import LossTermError
from .online.advantages import combine_rewards
from .online.generations import RolloutError, score_rollouts
from .online.reward_model import load_reward_model
from .online.rewards import RewardError, load_reward_funcs
from .online.rollout import SamplingParams, eos_ids_of, sample_groups
from .train.checkpoint import STATE, load_training_state
from .train.trainer import NonFiniteError, TrainingInterrupted

EVAL_DEFAULTS = {"split": "test", "samples": 64, "max_tokens": 48, "temperature": 1.0, "every": 25, "reward_weights": None,
                 "proxy_reward_model": None}
RESULTS, TABLE, PICTURE = "frontier.jsonl", "frontier.md", "frontier.png"


def sequence_logps_of(model, prompts: list[list[int]], completions: list[list[int]], batch: int = 32) -> np.ndarray:
    """Summed log-probs of each completion (its real tokens, EOS included) given its prompt."""
    out = []
    for i in range(0, len(prompts), batch):
        rows = [((p + c, len(p)),) for p, c in zip(prompts[i : i + batch], completions[i : i + batch])]
        out.append(np.array(sequence_logps(model, pad_batch(rows))[0], np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_policy(model, reference, tokenizer, prompts: Sequence, reward_funcs: list, samples: int,
                    sampling: SamplingParams, *, seed: int = 0, reward_weights=None, proxy=None) -> dict:
    """Mean reward, mean sequence KL(π || π_ref) and mean length of ``samples`` completions, one per
    prompt (prompts taken in order, cycling), sampled from ``model``. The KL is the sample mean of
    ``log π(y|x) - log π_ref(y|x)`` over each completion's real tokens: an unbiased estimate.
    ``proxy`` (a reward function, e.g. a reward model) adds its mean score of the same samples."""
    chosen = [prompts[i % len(prompts)] for i in range(samples)]
    eos = eos_ids_of(tokenizer)
    mx.random.seed(seed)
    comps = sample_groups(model, [p.ids for p in chosen], 1, sampling, eos)
    rewards = combine_rewards(score_rollouts(tokenizer, reward_funcs, chosen, comps, eos), reward_weights)
    ids = [list(c.token_ids) for c in comps]
    kl = sequence_logps_of(model, [p.ids for p in chosen], ids) - sequence_logps_of(reference, [p.ids for p in chosen], ids)
    point = {"reward": float(np.nanmean(rewards)), "kl": float(kl.mean()), "length": float(np.mean([len(c) for c in ids]))}
    if proxy is not None:
        point["proxy"] = float(np.nanmean(score_rollouts(tokenizer, [("proxy", proxy)], chosen, comps, eos)))
    return point


def upper_envelope(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (kl, reward) no other point beats with less or equal KL: the best reward reachable
    at each KL budget, in order of KL."""
    best, out = -np.inf, []
    for kl, reward in sorted(points, key=lambda p: (p[0], -p[1])):
        if reward > best:
            out.append((kl, reward))
            best = reward
    return out


def read_results(path: Path) -> list[dict]:
    """The points evaluated so far; a last line cut short by a stop mid-write is dropped (it is evaluated again)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ConfigError(f"{path}: line {i + 1} is not JSON; delete the line (or the file) to evaluate it again") from None
            tmp = path.with_suffix(".tmp")  # rewritten without it, atomically: a second stop here loses nothing
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, path)
    return rows


def _append(results: list[dict], path: Path, row: dict) -> None:
    """One evaluated point, kept in memory and appended to ``frontier.jsonl`` at once (a stop loses nothing)."""
    results.append(row)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def write_table(rows: list[dict], path: Path) -> None:
    proxy = any("proxy" in r for r in rows)
    head = "| run | method | step | mean reward |" + (" mean proxy reward |" if proxy else "") + " sequence KL (nats) | mean length |"
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["run"], r["step"])):
        extra = f" {r['proxy']:.3f} |" if proxy and "proxy" in r else " |" if proxy else ""
        lines.append(f"| {r['run']} | {r['method']} | {r['step']} | {r['reward']:.3f} |{extra} {r['kl']:.3f} | {r['length']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def draw(rows: list[dict], path: Path, title: str = "Reward against KL from the reference") -> bool:
    """Each method's points and upper envelope; False (nothing drawn) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [("reward", "mean reward of samples")] + ([("proxy", "mean proxy (reward model) score")] if any("proxy" in r for r in rows) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), dpi=120, squeeze=False)
    methods = sorted({r["method"] for r in rows})
    for ax, (key, label) in zip(axes[0], panels):
        for i, method in enumerate(methods):
            pts = [(r["kl"], r[key]) for r in rows if r["method"] == method and key in r]
            colour = f"C{i}"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, alpha=0.6, color=colour)
            env = upper_envelope(pts)
            ax.plot([p[0] for p in env], [p[1] for p in env], color=colour, label=method, linewidth=1.8)
        ax.set_xscale("symlog", linthresh=0.1)  # a drifting run's KL spans orders of magnitude (and an estimate can dip below 0)
        ax.set_xlabel("sequence KL(π || π_ref), nats (sampled; linear below 0.1, log above)")
        ax.set_ylabel(label)
        ax.set_title(title if key == "reward" else "The learned reward the runs optimised")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run_config(sweep_file: Path, base: Optional[str], run: dict, out: Path, every: int, resume: bool):
    """The mlx_dpo.lora arguments of one run: its config (or the base), its keys, its folder."""
    argv = ["--config", str(run.get("config") or base)] if (run.get("config") or base) else []
    overrides = {k: v for k, v in run.items() if k not in ("name", "method", "config")}
    overrides.update(adapter_path=str(out), save_every=every, train=True, test=False)
    if resume:
        overrides["resume"] = True
    args = load_config(argv, overrides=overrides)
    if args.config is None:  # reward functions and loss terms are looked up beside the sweep file
        args.config = str(sweep_file)
    return args


def read_sweep(sweep_file: Path) -> tuple[dict, list[dict], dict]:
    """The sweep file's mapping, its runs and its evaluation settings, checked."""
    spec = read_yaml(sweep_file)
    unknown = set(spec) - {"output", "base", "eval", "runs"}
    if unknown:
        raise ConfigError(f"{sweep_file}: unknown key(s) {sorted(unknown)} (expected output, base, eval, runs)")
    runs, ev = spec.get("runs"), {**EVAL_DEFAULTS, **(spec.get("eval") or {})}
    if not runs or not all(isinstance(r, dict) and r.get("name") for r in runs):
        raise ConfigError(f"{sweep_file}: 'runs' must be a list of mappings, each with a name")
    if len({r["name"] for r in runs}) != len(runs):
        raise ConfigError(f"{sweep_file}: run names must be distinct")
    for key in ("data", "reward_funcs"):
        if not ev.get(key):
            raise ConfigError(f"{sweep_file}: eval.{key} is required")
    return spec, runs, ev


def train_run(sweep_file: Path, spec: dict, r: dict, out: Path, every: int, train: Callable):
    """Train run ``r`` unless it has finished (a stopped one resumes); its configuration."""
    args = run_config(sweep_file, spec.get("base"), r, out, every, resume=False)
    state = out / STATE
    if state.is_file() and load_training_state(state)[1] >= args.iters:
        return args
    if state.is_file():
        args = run_config(sweep_file, spec.get("base"), r, out, every, resume=True)
    print(f"[frontier] training {r['name']} ({args.iters} steps) in {out}", flush=True)
    try:
        train(args)
    except (BatchSourceError, LossTermError) as e:  # a reward function or loss term failed: name the run
        raise type(e)(f"training {r['name']}: {e}") from None
    return args


class Points:
    """The evaluated points, in memory and in ``frontier.jsonl``; each base model, its prompts and
    its step-0 point computed once per sweep."""

    def __init__(self, output: Path, ev: dict, funcs: list, proxy=None):
        self.output, self.ev, self.funcs, self.proxy = output, ev, funcs, proxy
        self.path = output / RESULTS
        self.rows = read_results(self.path)
        self.done = {(r["run"], r["step"]) for r in self.rows}
        self.bases: dict = {}  # model path -> (model, tokenizer, prompts)
        self.starts: dict = {}  # (model, max_prompt_length, seed) -> the base model's point
        self.sampling = SamplingParams(temperature=ev["temperature"], max_tokens=ev["max_tokens"])

    def add(self, r: dict, step: int, point: dict) -> None:
        _append(self.rows, self.path, {"run": r["name"], "method": r.get("method", r["name"]), "step": step, **point})
        self.done.add((r["name"], step))

    def base(self, args):
        if args.model not in self.bases:
            model, tokenizer = load(args.model)
            split = self.ev["split"]
            prompts = load_prompt_splits(self.ev["data"], tokenizer, args.max_prompt_length, splits=(split,))[split]
            self.bases[args.model] = model, tokenizer, prompts
        return self.bases[args.model]

    def evaluate_run(self, r: dict, out: Path, args) -> None:
        """Every checkpoint of run ``r`` not evaluated yet (step 0: the base model)."""
        steps = [0] + sorted(int(p.name[:7]) for p in out.glob("[0-9]" * 7 + "_adapters.safetensors"))
        for step in [s for s in steps if (r["name"], s) not in self.done]:
            start_key = (args.model, args.max_prompt_length, args.seed)
            if step == 0 and start_key in self.starts:  # the same base, prompts and seed: the same point
                print(f"[frontier] {r['name']} step 0: the base model's point, as evaluated above", flush=True)
                self.add(r, 0, self.starts[start_key])
                continue
            base_model, tokenizer, prompts = self.base(args)
            model = base_model if step == 0 else self.checkpoint_model(args, out, step)
            try:
                point = evaluate_policy(model, base_model, tokenizer, prompts, self.funcs, self.ev["samples"], self.sampling,
                                        seed=args.seed, reward_weights=self.ev["reward_weights"], proxy=self.proxy)
            except RolloutError as e:
                raise RolloutError(f"evaluating {r['name']} at step {step}: {e}") from None
            if step == 0:
                self.starts[start_key] = point
            print(f"[frontier] {r['name']} step {step}: reward {point['reward']:.3f}, KL {point['kl']:.3f}, length {point['length']:.1f}", flush=True)
            self.add(r, step, point)

    def checkpoint_model(self, args, out: Path, step: int):
        ck = self.output / ".eval_adapter"
        ck.mkdir(exist_ok=True)
        (ck / "adapters.safetensors").write_bytes((out / f"{step:07d}_adapters.safetensors").read_bytes())
        (ck / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
        return load(args.model, adapter_path=str(ck))[0]


def sweep(sweep_file: Path, train: Optional[Callable] = None) -> list[dict]:
    """Train every run not finished yet (with ``train``, by default ``lora.run``), evaluate every
    checkpoint not evaluated yet; the results."""
    spec, runs, ev = read_sweep(sweep_file)
    output = Path(spec.get("output") or sweep_file.with_suffix(""))
    output.mkdir(parents=True, exist_ok=True)
    try:
        funcs = load_reward_funcs(ev["reward_funcs"], [sweep_file.resolve().parent])
        proxy = load_reward_model(ev["proxy_reward_model"]) if ev["proxy_reward_model"] else None
    except RewardError as e:
        raise ConfigError(str(e)) from None
    points = Points(output, ev, funcs, proxy)
    for r in runs:
        out = output / r["name"]
        args = train_run(sweep_file, spec, r, out, ev["every"], train or lora.run)
        points.evaluate_run(r, out, args)
    write_table(points.rows, output / TABLE)
    drawn = draw(points.rows, output / PICTURE)
    print(f"[frontier] {len(points.rows)} points: {output / TABLE}" + (f", {output / PICTURE}" if drawn else " (no matplotlib: no picture)"))
    return points.rows


def main(argv: Optional[list[str]] = None) -> None:
    """Run the sweep; errors and stops end in one line (exit 2, 3 or 128 + signal), never a traceback."""
    p = argparse.ArgumentParser(prog="mlx_dpo.frontier", description="Train a sweep of runs and draw their reward-KL frontier.")
    p.add_argument("--config", required=True, help="The sweep file (YAML).")
    args = p.parse_args(argv)
    again = f"run the same command to resume: {sys.executable} -m mlx_dpo.frontier --config {shlex.quote(args.config)}"
    try:
        sweep(Path(args.config))
    except (ConfigError, DataError, BatchSourceError, LossTermError) as e:
        print(f"mlx_dpo.frontier: error: {lora.one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"mlx_dpo.frontier: error: {lora.one_line(e)}", file=sys.stderr)
        sys.exit(3)
    except TrainingInterrupted as e:  # the trainer saved a checkpoint before stopping
        print(f"mlx_dpo.frontier: stopped by signal {e.signum} after step {e.step} (checkpoint in {e.checkpoint.parent}); {again}",
              file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt as e:  # loading, sampling or evaluating: checkpoints and every point evaluated so far are kept
        signum = getattr(e, "signum", signal.SIGINT)
        what = "Ctrl-C" if signum == signal.SIGINT else f"signal {signum}"
        print(f"mlx_dpo.frontier: stopped ({what}); the points evaluated so far are kept; {again}", file=sys.stderr)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
