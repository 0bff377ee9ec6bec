"""``python -m mlx_dpo.fuse``: merge trained adapters into the base weights, or export them.

The result is a standalone Hugging Face-layout model, and with ``--export-gguf`` also one GGUF file
(with ``--ollama``, an Ollama ``Modelfile`` beside it). With ``--export-peft DIR`` the adapters are
written in Hugging Face PEFT's layout instead (``export/peft.py``), and nothing is fused; with
``--upload adapters`` the mlx-lm adapters are uploaded as they are. Every output gets a model card. Fusing into a quantized
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
from .export.card import folder_files, model_card, upload, write_card
from .export.ollama import write_modelfile
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
    p.add_argument("--ollama", action="store_true", help="With --export-gguf: write an Ollama Modelfile beside the GGUF.")
    p.add_argument("--upload-repo", metavar="NAME", help="Upload an output (with its model card) to this Hub model repository.")
    p.add_argument("--upload", choices=["fused", "gguf", "peft", "adapters"],
                   help="Which output --upload-repo sends (default: the PEFT adapter with --export-peft, else the fused folder); "
                        "'adapters' sends the mlx-lm adapters as they are, without fusing.")
    return p


def _fail(message: str) -> None:
    print(f"mlx_dpo.fuse: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def _check(args: argparse.Namespace) -> None:
    if not (Path(args.adapter_path) / "adapter_config.json").is_file():
        _fail(f"no adapters in {args.adapter_path} (adapter_config.json is missing): train first, or pass --adapter-path")
    if args.ollama and not args.export_gguf:
        _fail("--ollama writes a Modelfile beside the GGUF: add --export-gguf PATH")
    needs = {"gguf": args.export_gguf, "peft": args.export_peft}
    if args.upload and not args.upload_repo:
        _fail("--upload chooses what --upload-repo sends: add --upload-repo NAME")
    if args.upload in needs and not needs[args.upload]:
        _fail(f"--upload {args.upload} sends the {args.upload.upper()} output: add --export-{args.upload}")
    if args.upload in ("fused", "gguf") and args.export_peft:
        _fail("--export-peft writes only the PEFT adapter (nothing is fused): upload it with --upload peft")


def card(args: argparse.Namespace, where: Path, kind: str) -> Path:
    """Write the model card of ``kind`` at ``where`` (a folder's README.md, or a file)."""
    config = json.loads((Path(args.adapter_path) / "adapter_config.json").read_text())
    method = method_name(config.get("loss_type", "dpo"), config.get("online", False), config.get("rounds"))
    path = write_card(where, model_card(Path(args.adapter_path), args.model, method, kind, __version__))
    print(f"Model card written to {path}")
    return path


def send(args: argparse.Namespace, files: dict[str, Path]) -> None:
    if args.upload_repo:
        print(f"Uploaded {len(files)} files to {upload(files, args.upload_repo)}")


def fuse_model(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replace every adapter layer by its fused base layer."""
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
    return model


def export_peft(args: argparse.Namespace) -> Path:
    try:
        out = to_peft(Path(args.adapter_path), Path(args.export_peft), args.model)
    except (AdapterFormatError, OSError) as e:
        _fail(str(e))
    print(f"PEFT adapter written to {out} (load it with peft.PeftModel.from_pretrained(base_model, {str(out)!r}))")
    card(args, out, "peft")
    send(args, folder_files(out))
    return out


def upload_adapters(args: argparse.Namespace) -> Path:
    """The mlx-lm adapters as they are (the final weights and their config), with a card."""
    folder = Path(args.adapter_path)
    card(args, folder, "mlx")
    send(args, folder_files(folder, ("adapters.safetensors", "adapter_config.json", "README.md")))
    return folder


def export_gguf(args: argparse.Namespace, fused: Path, tokenizer) -> None:
    """The GGUF of the fused folder, its card and, with ``--ollama``, its Modelfile."""
    try:
        path = write_gguf(fused, Path(args.export_gguf), args.gguf_type)
    except GGUFError as e:
        _fail(str(e))
    print(f"GGUF ({args.gguf_type}) written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    files = {path.name: path, "README.md": card(args, path.with_suffix(".md"), "gguf")}
    if args.ollama:
        render = (lambda m, g: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g)) \
            if tokenizer.chat_template else None
        adds_bos = tokenizer.bos_token is not None and tokenizer.encode("a")[:1] == [tokenizer.bos_token_id]
        eos = [tokenizer.convert_ids_to_tokens(i) for i in sorted(tokenizer.eos_token_ids)]
        modelfile, why = write_modelfile(path, render, eos, fused, tokenizer.bos_token if adds_bos else "")
        if why:
            print(f"[WARNING] The Modelfile has no TEMPLATE ({why}): Ollama will choose one from the GGUF's chat template.")
        print(f"Ollama Modelfile written to {modelfile}; run: ollama create NAME -f {modelfile}")
        files["Modelfile"] = modelfile
    if args.upload == "gguf":
        send(args, files)


def main(argv: Optional[list[str]] = None) -> Path:
    args = build_parser().parse_args(argv)
    _check(args)
    if args.export_peft:
        return export_peft(args)
    if args.upload == "adapters":
        return upload_adapters(args)
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
    card(args, save_path, "fused")
    if args.export_gguf:
        export_gguf(args, save_path, tokenizer)
    if args.upload in (None, "fused"):
        send(args, folder_files(save_path))
    return save_path


if __name__ == "__main__":
    main()
