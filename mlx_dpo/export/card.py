"""A model card (``README.md``) for what leaves: a fused model or an adapter, with how it was made
and how to load it, and the upload of a folder to the Hugging Face Hub.

The card is written whether or not the folder is uploaded. It reads only what training wrote
beside the adapters: ``adapter_config.json`` (every setting), ``metrics.jsonl`` (the last train and
validation reports) and ``test_metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from ..train.metrics_log import FILE as METRICS_FILE
from ..train.metrics_log import read_metrics

SETTINGS = ("loss_type", "beta", "fine_tune_type", "lora_parameters", "num_layers", "iters", "batch_size",
            "learning_rate", "optimizer", "max_seq_length", "seed")
METRICS = ("loss", "rewards/accuracies", "rewards/margins", "reward", "ppl")


def _last(rows: list[dict], split: str) -> dict:
    return next((r for r in reversed(rows) if r.get("split") == split), {})


def _metrics_table(adapter_dir: Path) -> list[str]:
    rows = read_metrics(adapter_dir) if (adapter_dir / METRICS_FILE).is_file() else []
    train, valid = _last(rows, "train"), _last(rows, "eval")
    test_path = adapter_dir / "test_metrics.json"
    test = json.loads(test_path.read_text()) if test_path.is_file() else {}
    lines = ["| split | step | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for name, row, prefix in (("train", train, ""), ("valid", valid, "eval_"), ("test", test, "")):
        if row:
            values = [row.get(prefix + k, row.get(k)) for k in METRICS]
            cells = [f"{v:.4g}" if isinstance(v, (int, float)) else "" for v in values]
            lines.append(f"| {name} | {row.get('step', '')} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else ["No metrics were written beside the adapters."]


def model_card(adapter_dir: Path, base_model: str, method: str, kind: str, version: str) -> str:
    """The card's Markdown. ``kind``: ``fused`` (a standalone model folder), ``peft`` (a PEFT
    adapter), ``mlx`` (mlx-lm adapters) or ``gguf`` (one GGUF file, with its Ollama Modelfile)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    settings = [f"- `{k}`: `{json.dumps(config[k])}`" for k in SETTINGS if k in config]
    load = {
        "fused": ["```bash", "mlx_lm.generate --model . --prompt \"Hello\"", "```",
                  "or with transformers: `AutoModelForCausalLM.from_pretrained(\".\")` (a Hugging Face-layout folder)."],
        "peft": ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                 f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_model!r}), \".\")", "```"],
        "mlx": ["```bash", f"mlx_lm.generate --model {base_model} --adapter-path . --prompt \"Hello\"", "```"],
        "gguf": ["```bash", "llama-cli -m MODEL.gguf -p \"Hello\"          # llama.cpp",
                 "ollama create NAME -f Modelfile && ollama run NAME   # Ollama, with the Modelfile beside the file", "```",
                 "LM Studio: put the file in a folder under its models folder (`lms import MODEL.gguf`)."],
    }[kind]
    return "\n".join([
        "---", f"base_model: {base_model}", "library_name: " + ("peft" if kind == "peft" else "mlx"),
        "tags: [" + ("gguf, " if kind == "gguf" else "") + "mlx, mlx-dpo, " + method.replace("_", "-") + "]", "---", "",
        f"# {adapter_dir.resolve().name}", "",
        f"Fine-tuned from `{base_model}` with mlx-dpo {version}: method `{method}`, objective "
        f"`{config.get('loss_type')}`, data `{config.get('data')}`.", "",
        "## Settings", "", *settings, "", "## Final metrics", "", *_metrics_table(adapter_dir), "",
        "## How to load it", "", *load, "",
        "For llama.cpp, Ollama or LM Studio: `python -m mlx_dpo.fuse ... --export-gguf model.gguf` writes a GGUF.", "",
    ])


def write_card(path: Path, text: str) -> Path:
    """The card at ``path`` (a folder gets ``README.md``)."""
    path = Path(path) / "README.md" if Path(path).is_dir() else Path(path)
    path.write_text(text, encoding="utf-8")
    return path


def upload(files: dict[str, Path], repo: str, api=None) -> str:
    """Upload ``files`` (name in the repository -> local file) to the Hub model repository ``repo``,
    made if missing, in one commit; its URL. ``api`` is a ``huggingface_hub.HfApi`` (the default one
    needs network access and a token)."""
    api = api if api is not None else HfApi()
    api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in sorted(files.items())]
    api.create_commit(repo_id=repo, repo_type="model", operations=operations, commit_message="Upload from mlx-dpo")
    return f"https://huggingface.co/{repo}"


def folder_files(folder: Path, names: tuple[str, ...] = ()) -> dict[str, Path]:
    """Every file of ``folder`` (or only ``names``), by its path inside it."""
    folder = Path(folder)
    paths = [folder / n for n in names] if names else [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return {p.relative_to(folder).as_posix(): p for p in paths if p.is_file()}
