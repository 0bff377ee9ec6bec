"""The tuned model leaving for other tools: LoRA adapters in Hugging Face PEFT's layout, both ways (``peft``)."""
