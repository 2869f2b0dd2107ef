"""Conversion to and from other ecosystems: Hugging Face names and config (hf.py), Meta's original checkpoints
in (meta.py), llama.cpp's GGUF out (gguf.py), and the lm-evaluation-harness model type (lm_eval.py). Import the
submodule you need; this package imports nothing itself."""
