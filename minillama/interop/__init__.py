"""Other formats in and out: Meta's original checkpoints (import) and llama.cpp's GGUF (export)."""
