"""Hugging Face format conversion: config.json, safetensors weights, tokenizer files."""
