"""The atomic file writers every file the project writes goes through.

Crash consistency (a process killed at any instant): a write goes to a file of the same name in a private temporary
directory beside its destination, ``.<name>.saga-<host>-<pid>-<random>.tmp/``, is flushed to the disk (``fsync``) and
put in place by ``os.replace``, then the directory is synced, so a reader sees the old file or the new one, never a
half-written one. The private directory also catches whatever temporaries the writing library makes of its own
(safetensors >= 0.7 writes ``.tmp`` + six random characters and renames it). What a kill leaves behind is that one
directory: the next write of the same file on the same host removes those of processes that no longer run, and a
training start removes every one in its run directory (``remove_stale_temporaries``). Names that do not follow the
pattern (a user's own ``.notes.tmp``) are never touched.

A destination that is a symbolic link is written through to its target. A write that fails for a reason the user
can fix (no such directory, no permission, no space left, a directory in the way) raises ``WriteError`` naming the
file asked for.
"""
import contextlib
import os
import re
import shutil
import socket
import tempfile

from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import WriteError

_HOST = re.sub(r"[^A-Za-z0-9]", "-", socket.gethostname())[:32] or "host"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.saga-(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-[a-z0-9_]{8}\.(?:tmp|old)$")


@contextlib.contextmanager
def _write_errors_name(shown: str):
    """Turn an I/O failure inside the block (an OSError, or what safetensors' Rust writer raises for one:
    ``... (os error 28)``) into ``WriteError`` naming ``shown``; anything else passes through unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        if isinstance(e, OSError) or (isinstance(e, SafetensorError) and "os error" in str(e).lower()):
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise WriteError(f"cannot write {shown}: {reason}") from e
        raise


def _temporary_dir(directory: str, name: str, suffix: str) -> str:
    """A fresh private directory ``.<name>.saga-<host>-<pid>-<random><suffix>`` in ``directory``."""
    return tempfile.mkdtemp(dir=directory, prefix=f".{name}.saga-{_HOST}-{os.getpid()}-", suffix=suffix)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _sync_dir(directory: str) -> None:
    """fsync a directory (the renames in it), where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(directory: str, name: str | None = None, dead_only: bool = False) -> list:
    """Remove the private temporary directories (``.<name>.saga-<host>-<pid>-<random>.tmp`` / ``.old``) that killed
    writers left in ``directory``: all of them, or those of destination ``name`` only; with ``dead_only``, only those
    of this host's processes that no longer run. Returns the paths removed (sorted)."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = _TEMPORARY.match(entry)
        if not m or (name is not None and m["name"] != name):
            continue
        if dead_only and (m["host"] != _HOST or _alive(int(m["pid"]))):
            continue
        path = os.path.join(directory, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path, previous: str | None = None):
    """Yield a path to write ``path``'s new content to (the same file name, so writers that go by the extension work,
    in a private temporary directory beside ``path``); when the block returns, fsync it and ``os.replace`` it onto
    ``path`` (the file it replaces first renamed to ``previous`` when given). On an exception nothing is put in place
    and the temporary directory is removed; an I/O failure (in the block or in the rename) raises ``WriteError``
    naming ``path``."""
    shown = os.fspath(path)
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    remove_stale_temporaries(directory, name=name, dead_only=True)
    with _write_errors_name(shown):
        scratch = _temporary_dir(directory, name, ".tmp")
    try:
        tmp = os.path.join(scratch, name)
        with _write_errors_name(shown):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if previous and os.path.exists(target):
                os.replace(target, previous)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _sync_dir(directory)


def atomic_save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors ``save_file`` of ``tensors`` (and ``metadata``) to ``path`` through ``atomic_path``."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def atomic_write_text(path, text: str) -> None:
    """``text`` into ``path`` (UTF-8) through ``atomic_path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_replace_dir(path, write) -> None:
    """``write(directory)`` fills a fresh temporary directory beside ``path``, which then replaces ``path``: the old
    directory is renamed away, the new one renamed in, the old one removed. A kill between the two renames leaves
    no ``path`` (never a mixed one); the trainer writes it again on resume. The new directory gets the mode a plain
    ``mkdir`` would (the umask's). An I/O failure raises ``WriteError`` naming ``path``."""
    shown = os.fspath(path)
    target = os.path.realpath(path)
    parent, name = os.path.split(target)
    with _write_errors_name(shown):
        os.makedirs(parent, exist_ok=True)
        remove_stale_temporaries(parent, name=name, dead_only=True)
        tmp = _temporary_dir(parent, name, ".tmp")
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            write(tmp)
            for root, _, files in os.walk(tmp):
                for file in files:
                    with open(os.path.join(root, file), "rb") as f:
                        os.fsync(f.fileno())
            old = None
            if os.path.exists(target):
                old = _temporary_dir(parent, name, ".old")
                os.replace(target, os.path.join(old, name))
            os.replace(tmp, target)
            _sync_dir(parent)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

__all__ = ["atomic_path", "atomic_replace_dir", "atomic_save_file", "atomic_write_text", "remove_stale_temporaries"]
