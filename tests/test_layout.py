"""The package's layering: imports only point down (../shared/STYLE.md, README "How the code is laid out").

    foundations (errors, files, tables, config, kernels, runtime)  <-  model  <-  checkpoint, quantize, tokenizer,
    data, interop.hf  <-  eval, plan, interop converters  <-  train, infer  <-  serve  <-  cli

A module may import its own layer or any below it, at module level or inside a function alike.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minillama"

# Lowest first. A module is placed by its longest matching prefix.
LAYERS = [
    ["minillama", "minillama.errors", "minillama.files", "minillama.tables", "minillama.config",
     "minillama.kernels", "minillama.runtime"],
    ["minillama.model"],
    ["minillama.interop", "minillama.interop.hf", "minillama.checkpoint", "minillama.quantize", "minillama.tokenizer",
     "minillama.data"],
    ["minillama.eval", "minillama.tasks", "minillama.plan", "minillama.interop.gguf", "minillama.interop.meta"],
    ["minillama.train", "minillama.infer"],
    ["minillama.serve", "minillama.interop.lm_eval"],
    ["minillama.cli", "minillama.__main__"],
]
RANK = {prefix: rank for rank, prefixes in enumerate(LAYERS) for prefix in prefixes}


def _rank(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in RANK:
            return RANK[prefix]
    raise AssertionError(f"{module} is in no layer: add it to tests/test_layout.py's LAYERS")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minillama"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("minillama"))
    return names


def test_imports_only_point_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if module == "minillama":  # the package's own __init__ re-exports the public API from above
            continue
        for imported in _imports(path):
            if _rank(imported) > _rank(module):
                upward.append(f"{module} (layer {_rank(module)}) imports {imported} (layer {_rank(imported)})")
    assert not upward, "\n".join(upward)


def test_the_model_file_imports_nothing_about_training_or_parallelism():
    imported = _imports(PACKAGE / "model.py")
    assert imported <= {"minillama.config", "minillama.kernels"}, imported
    assert "distributed" not in (PACKAGE / "model.py").read_text()
