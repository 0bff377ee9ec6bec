"""The tuned model leaving for other tools: LoRA adapters in Hugging Face PEFT's layout, both ways
(``peft``); the model card written beside it and the upload to the Hugging Face Hub (``card``)."""
