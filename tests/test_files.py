import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from minillama.errors import MinillamaError
from minillama.files import atomic_directory, atomic_write_json, atomic_write_text, cache_dir


def test_cache_dir_prefers_minillama_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MINILLAMA_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "minillama"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # set but empty counts as unset (XDG Base Directory spec)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "minillama"


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    atomic_write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and path.read_text().endswith("\n")
    atomic_write_text(path, "plain")
    assert path.read_text() == "plain"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not tempfile's 0600


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"not json": object()})
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_atomic_directory_swaps_in_and_rolls_back(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not tempfile.mkdtemp's 0700
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("crash")
    assert (target / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(MinillamaError, match="not a directory"), atomic_directory(tmp_path / "file"):
        pass


def test_atomic_directory_removes_debris_but_not_a_save_in_progress(tmp_path):
    """Every rank of a torchrun job prepares the same cached data directory: one rank's start must not delete the
    temporary directory another rank is still writing, while a crashed process's leftovers go."""
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = tmp_path / f".out.tmp-{host}.{os.getpid()}.abcd"  # this process: alive
    crashed = tmp_path / f".out.tmp-{host}.{int(dead.stdout)}.abcd"
    foreign = tmp_path / ".out.tmp-some-other-host.example.1.abcd"  # cannot be checked from here: kept
    unnamed = tmp_path / ".out.tmp-crashed"  # no owner in the name (older minillama): debris
    for d in (live, crashed, foreign, unnamed):
        d.mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out", live.name, foreign.name}


def test_prepared_data_and_checkpoints_share_the_one_atomic_directory():
    """No module writes its own temp-and-rename: the one implementation is minillama.files."""
    package = Path(__file__).resolve().parents[1] / "minillama"
    calls = ("os.replace(", "os.rename(", "mkdtemp(")
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.name != "files.py" and any(call in p.read_text() for call in calls)]
    assert offenders == []


def test_read_json_names_the_file(tmp_path):
    from minillama.files import read_json

    path = tmp_path / "x.json"
    path.write_text('{"a": 1}')
    assert read_json(path) == {"a": 1}
    path.write_text("{nope")
    with pytest.raises(MinillamaError, match=r"x\.json: invalid JSON \(Expecting property name"):
        read_json(path)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(MinillamaError, match=r"x\.json: invalid JSON \(not UTF-8"):
        read_json(path)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "none.json")
    with pytest.raises(MinillamaError, match="^no run here$"):
        read_json(tmp_path / "none.json", missing="no run here")
