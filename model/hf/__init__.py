"""Hugging Face transformers interop: a checkpoint artifact ⇄ a `nanochat` model directory (config.json,
model.safetensors in transformers' names, tokenizer files, chat template). Needs safetensors and tokenizers
only; transformers itself is used by the tests and by users loading the result."""
