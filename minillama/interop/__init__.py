"""Conversion to and from other ecosystems: Hugging Face names and config (hf.py), the lm-evaluation-harness
model type (lm_eval.py); GGUF export and Meta import beside them. Import the submodule you need; this package
imports nothing itself."""
