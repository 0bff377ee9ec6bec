"""GGUF files: reading tensors and metadata (``reader``), rebuilding the tokenizer (``tokenizer``)."""
