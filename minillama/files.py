"""Files that a crash never leaves half-written, and the directory where minillama keeps its caches.

Every file or directory minillama writes for later reading goes through here: checkpoints and prepared data
through `atomic_directory`, manifests, run records and caches through `atomic_write_text` / `atomic_write_json`.
The recipe is the same for both: write a temporary sibling, fsync it, rename it over the target (rename is atomic
within a filesystem, POSIX rename(2)), and fsync the parent directory, which is what makes the new name itself
durable (a file's own fsync does not cover its directory entry).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from minillama.errors import MinillamaError


def cache_dir() -> Path:
    """~/.cache/minillama, or $MINILLAMA_CACHE, or $XDG_CACHE_HOME/minillama (XDG Base Directory spec)."""
    if os.environ.get("MINILLAMA_CACHE"):
        return Path(os.environ["MINILLAMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "minillama"


def make_dir(directory: str | Path) -> Path:
    """`directory` and its parents, created if missing; a path that cannot be a directory (a file is there, no
    permission) is a MinillamaError naming it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MinillamaError(f"cannot create directory {directory}: {exc.strerror}") from None
    return directory


def fsync_directory(path: str | Path) -> None:
    """fsync a directory, which makes the names created or renamed in it durable (files alone are not)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------------------------------
def read_json(path: str | Path, missing: str | None = None) -> Any:
    """The JSON value in `path`; text that is not JSON (or not UTF-8) is a MinillamaError naming the file. A
    missing file (or a file where one of the path's directories should be) raises MinillamaError(`missing`) when
    `missing` says what its absence means, else FileNotFoundError (NotADirectoryError)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # the latter: a file where a directory of the path should be
        if missing is None:
            raise
        raise MinillamaError(missing) from None
    except UnicodeDecodeError as exc:
        raise MinillamaError(f"{path}: invalid JSON (not UTF-8: {exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MinillamaError(f"{path}: invalid JSON ({exc})") from None


def _create_sibling(path: Path, prefix: str, create: Callable[[Path], Any]) -> tuple[Path, Any]:
    """A new, uniquely named sibling of `path`, made by `create` (which raises FileExistsError on a clash).
    Not tempfile.mkstemp/mkdtemp: those make files 0600 and directories 0700, and a checkpoint or data directory
    should get the permissions the user's umask gives everything else."""
    while True:
        candidate = path.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            return candidate, create(candidate)
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write by any means (a library that takes a file name); when the block ends
    without an error it is fsynced and renamed over `path`, otherwise deleted. Readers see the old file or the
    new one, never a stub."""
    path = Path(path)
    tmp, fd = _create_sibling(path, f".{path.name}.tmp-",
                              lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8): readers see the old content or the new, never a mix or a stub."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, value: Any, *, indent: int = 2) -> None:
    """`value` as JSON (and a final newline) into `path`, atomically (see `atomic_write_text`)."""
    atomic_write_text(path, json.dumps(value, indent=indent) + "\n")


# --------------------------------------------------------------------------------------------------------------
# A directory
# --------------------------------------------------------------------------------------------------------------
def aside_path(directory: Path) -> Path:
    """Where the previous directory waits during an `atomic_directory` swap. Hidden (a leading dot) so a trainer
    listing its `step-*` directories never mistakes it for a checkpoint."""
    return directory.parent / f".{directory.name}.old"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(dirpath)


def _temp_prefix(directory: Path) -> str:
    return f".{directory.name}.tmp-"


def _owner_tag() -> str:
    """Host and process id, written into a temporary directory's name so that another process saving to the
    same place (every rank of a torchrun job prepares the same cached data) can tell a live save from debris."""
    return f"{socket.gethostname()}.{os.getpid()}."


def _is_debris(name: str, prefix: str) -> bool:
    """Whether the temporary directory `name` was left by a crashed save: it names no live process of this
    host. One from another host is never judged debris (its process cannot be checked from here)."""
    parts = name[len(prefix):].rsplit(".", 2)  # host (may hold dots) . pid . random suffix
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    host, pid = parts[0], int(parts[1])
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def _recover_interrupted_swap(directory: Path) -> None:
    """Undo what a crash inside `atomic_directory` left behind.

    The aside copy exists only between renaming the old directory away and deleting it. If `directory` is
    missing, the crash came before the new one was renamed in, so the old one goes back; if present, the new
    one is complete and the old is garbage. Temporary directories from crashed saves are incomplete by
    construction and are removed (those of saves still running are left alone).
    """
    aside = aside_path(directory)
    if aside.exists():
        if directory.exists():
            shutil.rmtree(aside)
        else:
            os.rename(aside, directory)
            fsync_directory(directory.parent)
    prefix = _temp_prefix(directory)
    for stale in directory.parent.glob(f"{glob.escape(prefix)}*"):
        if _is_debris(stale.name, prefix):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `directory`; when the block ends without an exception, fsync
    everything in it and swap it into place. On an exception the temporary directory is removed and an
    existing `directory` is left untouched.

    The swap is rename old -> `.NAME.old`, rename new -> NAME, fsync the parent, delete the old. Every rename is
    atomic, so at any instant a complete directory exists as NAME or, for the moment between the two
    renames, as `.NAME.old`; the next `atomic_directory` on NAME puts it back. (Linux's
    renameat2(RENAME_EXCHANGE) would close that gap, but Python does not expose it and macOS lacks it.)
    """
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise MinillamaError(f"{directory} exists and is not a directory; refusing to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_swap(directory)
    tmp, _ = _create_sibling(directory, _temp_prefix(directory) + _owner_tag(), lambda p: p.mkdir())
    try:
        yield tmp
        _fsync_tree(tmp)
        if directory.exists():
            aside = aside_path(directory)
            os.rename(directory, aside)
            try:
                os.rename(tmp, directory)
            except BaseException:
                os.rename(aside, directory)
                raise
            fsync_directory(directory.parent)
            shutil.rmtree(aside)
        else:
            os.rename(tmp, directory)
            fsync_directory(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["cache_dir", "make_dir", "read_json", "atomic_write_text", "atomic_write_json", "atomic_directory",
           "aside_path", "fsync_directory"]
