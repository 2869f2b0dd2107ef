"""Conversion to and from other ecosystems: Hugging Face names and config (hf.py); GGUF export and Meta import
come beside it. Import the submodule you need; this package imports nothing itself."""
