"""``python -m mlx_dpo.fuse``: merge trained adapters into the base weights, or export them.

The result is a standalone Hugging Face-layout model; with ``--export-peft DIR`` the adapters are
written in Hugging Face PEFT's layout instead (``export/peft.py``), and nothing is fused. Fusing into a quantized
base and re-quantizing rounds the adapter's (small) weight delta to the
quantization grid, which can lose part of its effect; ``--dequantize`` writes
the fused model in full precision, and without it a warning says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model, load, save

from .export.peft import AdapterFormatError, to_peft


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fuse trained adapters into the base model.")
    p.add_argument("--model", required=True, help="Hub id or local path of the base model.")
    p.add_argument("--adapter-path", default="adapters", help="Folder with adapters.safetensors and adapter_config.json.")
    p.add_argument("--save-path", default="fused_model", help="Where to write the fused model.")
    p.add_argument("--dequantize", action="store_true", help="Write full-precision weights (recommended for quantized bases).")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow custom code from the model repo.")
    p.add_argument("--export-peft", metavar="DIR", help="Write the LoRA adapters in Hugging Face PEFT's layout to DIR (no fusing).")
    return p


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
        return out
    model, tokenizer, config = load(
        args.model, adapter_path=args.adapter_path, return_config=True, trust_remote_code=args.trust_remote_code
    )
    quantized = "quantization" in config or "quantization_config" in config
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
    return save_path


if __name__ == "__main__":
    main()
