"""GGUF files: reading tensors and metadata (``reader``), rebuilding the tokenizer (``tokenizer``),
writing a model folder as one file (``writer``)."""
