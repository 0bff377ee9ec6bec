"""``python -m mlx_dpo.convert``: turn a llama.cpp GGUF into a folder ``mlx_lm.load`` reads.

GGUF files are how many small models are shipped; training needs mlx-lm's
Hugging Face layout. By default Q4_0/Q4_1/Q8_0 weights stay packed (MLX's
affine quantization holds them exactly) for QLoRA; ``--dequantize`` writes
full precision. Unsupported files end in one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.utils import load_model, save_config

from .gguf.reader import GGUFError, convert_weights, model_config, read
from .gguf.tokenizer import build_tokenizer, tokenizer_config

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_dpo.convert", description="Convert a llama/qwen2 GGUF into an mlx-lm (Hugging Face layout) folder."
    )
    p.add_argument("--gguf", required=True, help="The .gguf file.")
    p.add_argument("--save-path", required=True, help="Folder to write (must not exist or be empty).")
    p.add_argument("--dequantize", action="store_true", help="Write full-precision weights instead of packed 4/8-bit.")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="Floating-point type of the written tensors (default: float32 with --dequantize, else as stored).",
    )
    return p


def convert(gguf: str | Path, save_path: str | Path, dequantize: bool = False, dtype: Optional[str] = None) -> Path:
    """Write config, weights and tokenizer of ``gguf`` into ``save_path``; return it."""
    save_path = Path(save_path)
    if save_path.exists() and (not save_path.is_dir() or any(save_path.iterdir())):
        raise GGUFError(f"{save_path} already exists and is not an empty folder")
    tensors, metadata = read(gguf)
    config = model_config(metadata, tensors)
    tokenizer = build_tokenizer(metadata)  # before writing anything: it may be unsupported
    cast = DTYPES[dtype or "float32"] if dequantize or dtype else None
    weights, quantization = convert_weights(tensors, config, dequantize, cast)
    if quantization is not None:
        config["quantization"] = quantization

    save_path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(save_path / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(config, save_path / "config.json")
    tokenizer.save(str(save_path / "tokenizer.json"))
    tokenizer_json = json.dumps(tokenizer_config(metadata), indent=2, ensure_ascii=False)
    (save_path / "tokenizer_config.json").write_text(tokenizer_json, encoding="utf-8")
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (save_path / "generation_config.json").write_text(json.dumps(ids, indent=2))
    load_model(save_path, lazy=True)  # mlx-lm must accept every name and shape
    return save_path


def main(argv: Optional[list[str]] = None) -> Path:
    """Run; an unsupported or unreadable file ends in one line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        path = convert(args.gguf, args.save_path, args.dequantize, args.dtype)
    except GGUFError as e:
        print(f"mlx_dpo.convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"Wrote {path} ({'full precision' if args.dequantize else 'packed weights kept where the file has them'})")
    return path


if __name__ == "__main__":
    main()
