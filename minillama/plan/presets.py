"""The presets as `minillama presets` lists them: each one's shape and exact parameter count."""

from __future__ import annotations

from typing import Any

from minillama.config import PRESETS, ModelConfig
from minillama.plan.planner import parameter_counts
from minillama.tables import format_columns

PRESET_COLUMNS = ("name", "params", "layers", "dim", "heads", "kv_heads", "ffn", "vocab", "context")


def preset_table() -> list[dict[str, Any]]:
    """One row per preset, in table order: name, exact parameter count (the model built on the meta device),
    layers, dim, heads, kv_heads, ffn (SwiGLU hidden size), vocab and context (max_seq_len)."""
    rows = []
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        rows.append(dict(name=name, params=parameter_counts(cfg)[0], layers=cfg.n_layers, dim=cfg.dim,
                         heads=cfg.n_heads, kv_heads=cfg.n_kv_heads, ffn=cfg.ffn_hidden_dim, vocab=cfg.vocab_size,
                         context=cfg.max_seq_len))
    return rows


def format_preset_table(rows: list[dict[str, Any]]) -> str:
    """`preset_table()` as aligned text, parameter counts with thousands separators."""
    cells = [[f"{row[c]:,}" if c == "params" else str(row[c]) for c in PRESET_COLUMNS] for row in rows]
    return "\n".join(format_columns(PRESET_COLUMNS, cells))


__all__ = ["PRESET_COLUMNS", "preset_table", "format_preset_table"]
