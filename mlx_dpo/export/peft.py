"""mlx-lm LoRA adapters to Hugging Face PEFT's layout, and back.

mlx-lm keeps, for each adapted linear layer ``X``, ``X.lora_a`` (in, r) and ``X.lora_b`` (r, out)
and computes ``x W^T + scale * (x lora_a) lora_b``; PEFT keeps
``base_model.model.X.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r) and computes
``x W^T + (lora_alpha / r) * B(A(x))``: the same adapter, transposed, with
``lora_alpha = scale * r``. ``target_modules`` lists the full module names, so PEFT adapts exactly
the layers mlx-lm did. DoRA's magnitude is not converted: a DoRA adapter is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from ..train.checkpoint import ADAPTERS

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"  # mlx-lm's and PEFT's alike
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", CONFIG


class AdapterFormatError(ValueError):
    """An adapter that cannot be converted; the message is one line."""


def to_peft(adapter_dir: Path, out: Path, base_model: str) -> Path:
    """Write ``out/adapter_model.safetensors`` and ``out/adapter_config.json`` for the mlx-lm
    adapter in ``adapter_dir``; returns ``out``."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    config = json.loads((adapter_dir / CONFIG).read_text())
    if config.get("fine_tune_type", "lora") != "lora":
        raise AdapterFormatError(f"{adapter_dir} holds a {config.get('fine_tune_type')} adapter; only LoRA converts to PEFT")
    params = config.get("lora_parameters") or {}
    weights = mx.load(str(adapter_dir / ADAPTERS))
    modules = sorted({k.rsplit(".", 1)[0] for k in weights if k.endswith((".lora_a", ".lora_b"))})
    if not modules or len(weights) != 2 * len(modules):
        raise AdapterFormatError(f"{adapter_dir / ADAPTERS} holds weights other than LoRA's lora_a/lora_b pairs")
    rank = int(weights[f"{modules[0]}.lora_a"].shape[1])
    peft = {}
    for m in modules:
        peft[f"{PREFIX}{m}.lora_A.weight"] = weights[f"{m}.lora_a"].T
        peft[f"{PREFIX}{m}.lora_B.weight"] = weights[f"{m}.lora_b"].T
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / PEFT_WEIGHTS), peft, metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": float(params.get("scale", 20.0)) * rank, "lora_dropout": float(params.get("dropout", 0.0)),
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "use_dora": False, "use_rslora": False,
    }, indent=2) + "\n")
    return out


def from_peft(peft_dir: Path, out: Path, num_layers: int) -> Path:
    """Write an mlx-lm adapter folder (``adapters.safetensors``, ``adapter_config.json``) for the PEFT
    LoRA adapter in ``peft_dir``, on a model of ``num_layers`` layers; returns ``out``."""
    peft_dir, out = Path(peft_dir), Path(out)
    config = json.loads((peft_dir / PEFT_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise AdapterFormatError(f"{peft_dir} is not a plain PEFT LoRA adapter (peft_type {config.get('peft_type')!r}, use_dora {config.get('use_dora')})")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    weights = mx.load(str(peft_dir / PEFT_WEIGHTS))
    ours = {}
    for key, value in weights.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for theirs, mine in ((".lora_A.weight", ".lora_a"), (".lora_B.weight", ".lora_b")):
            if name.endswith(theirs):
                ours[name[: -len(theirs)] + mine] = value.T
    if len(ours) != len(weights) or not ours:
        raise AdapterFormatError(f"{peft_dir / PEFT_WEIGHTS} holds weights other than lora_A/lora_B (a bias, embeddings or another adapter kind)")
    layers = sorted({int(k.split("layers.")[1].split(".")[0]) for k in ours if "layers." in k})
    if not layers or layers != list(range(layers[0], num_layers)):
        raise AdapterFormatError(f"{peft_dir} adapts layers {layers[:3]}...; mlx-lm adapts the last N of {num_layers} layers only")
    keys = sorted({k.split(f"layers.{layers[0]}.", 1)[1].rsplit(".", 1)[0] for k in ours if f"layers.{layers[0]}." in k})
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / ADAPTERS), ours)
    (out / CONFIG).write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": len(layers),
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(config.get("lora_dropout", 0.0)), "keys": keys},
    }, indent=4) + "\n")
    return out
