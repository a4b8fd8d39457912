"""Atomic file writes: every file the toolkit writes (checkpoints, traces, summaries, figures)
goes to a temporary file in the same folder, is flushed to disk, then renamed over the target, so
a crash or a kill leaves either the old file or the new one, never a truncated mix.

:func:`exclusive` keeps two training runs from writing one output folder at once."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; runs are not guarded against each other
    fcntl = None


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask  # mkstemp creates 0600; give new files the usual permissions


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error
    (or KeyboardInterrupt) it is removed and ``path`` is left untouched.

    ``suffix`` lets writers that pick their format from the file name (matplotlib) see the real
    extension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file that guards ``path``: a hidden file beside it (the folder itself may be
    replaced whole, as a teacher's is when it is saved)."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on output ``path`` for as long as the block runs; a second process
    asking for it meanwhile gets a :class:`~spikingbert_sim.errors.ConfigError` naming the process
    that holds it (two runs interleaving their checkpoints in one folder would each resume from
    the other's state). The lock is the kernel's (``flock``), so a killed run leaves no stale lock;
    its file is removed when the block ends."""
    from .errors import ConfigError

    path = Path(path)
    lock = lock_path(path)
    if fcntl is None:
        yield
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the folder for {path}: {e.strerror or e}") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, _default_mode())
        except OSError as e:
            raise ConfigError(f"cannot write {lock}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{path} is in use by another run (process {holder}); wait for it to end "
                              "or choose another --out") from None
        except OSError:  # a file system without flock (some network mounts): run unguarded, as before
            os.close(fd)
            yield
            return
        try:  # the holder before us may have removed the file between our open and our lock
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)
