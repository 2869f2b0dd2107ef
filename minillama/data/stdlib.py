"""The embedded default corpus: the running Python installation's own documentation and library source.

Every machine that runs minillama has it, it needs no download, and it is real English prose (the language
reference and library docstrings) next to real code. Two sources, used in TOML as `path = "python:docs"` and
`path = "python:source"`:

- docs: the topics of `pydoc_data/topics.py` (the text `help("with")` shows: the language reference and library
  chapters) plus, per stdlib module, its module docstring and the docstrings of its public classes and functions.
  Docstrings are read with `ast`, never by importing: importing every module would run `antigravity`, `this`
  and platform code.
- source: the stdlib `.py` files, capped at `max_mb` (DEFAULT_SOURCE_MB unless the source sets max_mb).

Both leave out what is not the library proper: site-packages, tests, idlelib, turtledemo, lib2to3 (whose test
data is deliberately broken Python), ensurepip, and generated tables (charmap codecs, _sysconfigdata). The order
is sorted by path, so the corpus is the same on every run of the same installation. On CPython 3.11 here: docs
~2.1 MB (0.47 MB of topics, 1.6 MB of docstrings), source ~9 MB in ~560 files.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from pathlib import Path

DEFAULT_SOURCE_MB = 16.0  # above a CPython 3.11-3.13 stdlib (~9-11 MB), so it only bounds unusual installations
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3",
                           "ensurepip", "pydoc_data", "__pycache__", "__phello__"})


def stdlib_dir() -> Path:
    """The running interpreter's standard library (in a venv: the base installation's)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_generated(path: Path) -> bool:
    if path.name.startswith("_sysconfigdata"):
        return True
    with open(path, "rb") as f:
        head = f.read(400)
    return b"gencodec.py" in head  # the ~100 charmap codecs in encodings/: lookup tables, not prose or code


@functools.lru_cache(maxsize=4)
def _stdlib_files(root: Path) -> tuple[Path, ...]:
    files = []
    for directory, subdirs, names in os.walk(root):
        # Prune while walking: site-packages alone can hold tens of thousands of files.
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS and not d.startswith(("config-", "plat-", "."))]
        files.extend(Path(directory) / name for name in names if name.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return tuple(p for p in files if p.is_file() and not _is_generated(p))


def stdlib_files() -> list[Path]:
    """The library's own `.py` files, sorted by path relative to the stdlib directory."""
    return list(_stdlib_files(stdlib_dir()))


def python_source_files(max_mb: float | None = DEFAULT_SOURCE_MB) -> list[Path]:
    """Stdlib files in order while their total stays within max_mb (whole files only)."""
    files, total = [], 0
    cap = None if max_mb is None else int(max_mb * 1e6)
    for path in stdlib_files():
        size = path.stat().st_size
        if cap is not None and total + size > cap:
            break
        files.append(path)
        total += size
    return files


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def pydoc_topic(name: str) -> str:
    return f"{name}\n\n{pydoc_topics()[name].strip()}\n"


def python_docs_inputs() -> list[tuple[str, str, int, int, str]]:
    """(kind, path, size_bytes, mtime_ns, key) for every docs document: topics first, then modules."""
    import pydoc_data.topics

    topics_path = Path(pydoc_data.topics.__file__)
    mtime = topics_path.stat().st_mtime_ns
    inputs = [("topic", str(topics_path), len(text.encode("utf-8")), mtime, name)
              for name, text in sorted(pydoc_topics().items())]
    for path in stdlib_files():
        st = path.stat()
        inputs.append(("docstrings", str(path), st.st_size, st.st_mtime_ns, ""))
    return inputs


def module_name(path: Path) -> str:
    parts = list(path.relative_to(stdlib_dir()).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"{node.name}({ast.unparse(node.args)})"
    except Exception:  # pragma: no cover - unparse handles all valid syntax; stay robust anyway
        return f"{node.name}(...)"


def _indent(text: str) -> str:
    return "\n".join("    " + line if line else "" for line in text.splitlines())


def module_documentation(path: Path) -> str:
    """A module's docstrings as one `help()`-like text; "" when it has none or does not parse."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return ""
    name = module_name(path)
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            if doc := ast.get_docstring(node):
                parts.append(f"def {name}.{_signature(node)}\n{_indent(doc)}")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            if doc := ast.get_docstring(node):
                parts.append(f"class {name}.{node.name}({bases})\n{_indent(doc)}")
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    if doc := ast.get_docstring(item):
                        parts.append(f"def {name}.{node.name}.{_signature(item)}\n{_indent(doc)}")
    if not parts:
        return ""
    return f"Module {name}\n\n" + "\n\n".join(parts) + "\n"


def python_docs_texts() -> list[str]:
    """The docs source as a list of documents (empty ones dropped), for tests and quick looks."""
    texts = [pydoc_topic(name) for name in sorted(pydoc_topics())]
    texts += [module_documentation(p) for p in stdlib_files()]
    return [t for t in texts if t]


def python_source_texts(max_mb: float | None = DEFAULT_SOURCE_MB) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in python_source_files(max_mb)]


__all__ = ["DEFAULT_SOURCE_MB", "stdlib_dir", "stdlib_files", "python_source_files", "python_docs_inputs",
           "module_documentation", "pydoc_topic", "pydoc_topics", "python_docs_texts", "python_source_texts"]
