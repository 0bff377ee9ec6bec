"""``python -m mlx_dpo.fuse``: merge trained adapters into the base weights, or export them.

The result is a standalone Hugging Face-layout model; with ``--export-peft DIR`` the adapters are
written in Hugging Face PEFT's layout instead (``export/peft.py``), and nothing is fused. Fusing into a quantized
base and re-quantizing rounds the adapter's (small) weight delta to the
quantization grid, which can lose part of its effect; ``--dequantize`` writes
the fused model in full precision, and without it a warning says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model, load, save

from . import __version__
from .export.card import model_card, upload, write_card
from .export.peft import AdapterFormatError, to_peft
from .gguf.reader import GGUFError
from .gguf.writer import TYPES, write_gguf
from .methods import method_name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fuse trained adapters into the base model.")
    p.add_argument("--model", required=True, help="Hub id or local path of the base model.")
    p.add_argument("--adapter-path", default="adapters", help="Folder with adapters.safetensors and adapter_config.json.")
    p.add_argument("--save-path", default="fused_model", help="Where to write the fused model.")
    p.add_argument("--dequantize", action="store_true", help="Write full-precision weights (recommended for quantized bases).")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow custom code from the model repo.")
    p.add_argument("--export-peft", metavar="DIR", help="Write the LoRA adapters in Hugging Face PEFT's layout to DIR (no fusing).")
    p.add_argument("--export-gguf", metavar="PATH", help="Also write the fused model as one GGUF file (llama.cpp, Ollama, LM Studio).")
    p.add_argument("--gguf-type", default="f16", choices=sorted(TYPES), help="The GGUF's weight type (default f16).")
    p.add_argument("--upload-repo", metavar="NAME", help="Upload what was written (with its model card) to this Hub model repository.")
    return p


def finish(args: argparse.Namespace, out: Path, kind: str) -> None:
    """Write the model card into ``out`` and, with ``--upload-repo``, upload the folder."""
    config = json.loads((Path(args.adapter_path) / "adapter_config.json").read_text())
    method = method_name(config.get("loss_type", "dpo"), config.get("online", False), config.get("rounds"))
    card = write_card(out, model_card(Path(args.adapter_path), args.model, method, kind, __version__))
    print(f"Model card written to {card}")
    if args.upload_repo:
        print(f"Uploaded to {upload(out, args.upload_repo)}")


def fuse_model(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replace every adapter layer by its fused base layer."""
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
    return model


def main(argv: Optional[list[str]] = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.export_peft:
        try:
            out = to_peft(Path(args.adapter_path), Path(args.export_peft), args.model)
        except (AdapterFormatError, OSError) as e:
            print(f"mlx_dpo.fuse: error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(2)
        print(f"PEFT adapter written to {out} (load it with peft.PeftModel.from_pretrained(base_model, {str(out)!r}))")
        finish(args, out, "peft")
        return out
    model, tokenizer, config = load(
        args.model, adapter_path=args.adapter_path, return_config=True, trust_remote_code=args.trust_remote_code
    )
    quantized = "quantization" in config or "quantization_config" in config
    if args.export_gguf:  # a GGUF is written from full-precision weights, quantized by its own type
        args.dequantize = True
    if quantized and not args.dequantize:
        print(
            "[WARNING] The base model is quantized: re-quantizing the fused weights rounds the adapter's "
            "delta to the quantization grid and can lose part of its effect. Pass --dequantize to keep it exactly."
        )
    model = fuse_model(model, args.dequantize)
    if args.dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    save_path = Path(args.save_path)
    save(save_path, args.model, model, tokenizer, config, donate_model=False)
    print(f"Fused model written to {save_path}")
    if args.export_gguf:
        try:
            gguf_file = write_gguf(save_path, Path(args.export_gguf), args.gguf_type)
        except GGUFError as e:
            print(f"mlx_dpo.fuse: error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(2)
        print(f"GGUF ({args.gguf_type}) written to {gguf_file} ({gguf_file.stat().st_size / 1e6:.1f} MB)")
    finish(args, save_path, "fused")
    return save_path


if __name__ == "__main__":
    main()
