"""Partial files that never outlive their writer, and writes that fail with one line.

An import or a face-cache build writes into a temporary (*partial*) file or
directory and renames it into place when complete. A writer killed by SIGKILL,
a power cut or the OOM killer cannot remove its partial, so every partial is
*claimed*: its writer holds an exclusive ``flock`` on it for as long as it
lives, and the kernel drops that lock when the process dies, however it dies.
:func:`sweep` removes exactly the partials nobody holds, so the next import or
render cleans up after a dead one without ever touching a live one's.
Creating and sweeping happen under :func:`dir_lock` of the folder, so a partial
is never swept between its creation and its claim.

:class:`NpyWriter` writes an ``.npy`` array row by row with ordinary writes.
(A memory map turns a full disk into SIGBUS, a crash with no message.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import AvatarPackageError

MB = 1 << 20


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))


@contextmanager
def dir_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (short critical sections: create/claim, sweep, rename)."""
    fd = _open(folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim(path: Path) -> int:
    """Lock the partial ``path`` for this process; returns the descriptor that holds the lock."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def claim_fd(fd: int) -> None:
    """Lock an open partial file (e.g. from ``mkstemp``) for this process."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def make_partial_dir(parent: Path, prefix: str) -> tuple[Path, int]:
    """A new claimed directory ``parent/prefixXXXX``; call under :func:`dir_lock` of ``parent``."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    return path, claim(path)


def sweep(folder: Path, pattern: str) -> list[Path]:
    """Remove the partials ``folder/pattern`` that no living process holds; returns them.

    Call under :func:`dir_lock` of ``folder``. Best effort: what cannot be
    removed (permissions) stays, and the caller carries on.
    """
    removed: list[Path] = []
    for p in sorted(folder.glob(pattern)):
        try:
            fd = claim(p)
        except OSError:
            continue  # held by a living writer (or unreadable): not ours to remove
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def no_space_message(path: Path, exc: OSError, need: int | None = None) -> str:
    """One line for a failed write: the path, the system's reason and what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        more = f" (it needs about {need / MB:.0f} MB)" if need else ""
        return f"cannot write {path}: {reason}; free disk space{more} or choose another output directory"
    return f"cannot write {path}: {reason}; choose a writable output directory"


def check_space(folder: Path, need: int, what: Path) -> None:
    """Refuse before writing ``need`` bytes into ``folder`` when the file system has less free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknown: the writes themselves will tell
    if free < need:
        raise AvatarPackageError(
            f"not enough disk space for {what}: it needs about {need / MB:.0f} MB, "
            f"{free / MB:.0f} MB are free in {folder}; free disk space or choose another output directory"
        )


class NpyWriter:
    """Write a C-ordered ``.npy`` array of ``shape``/``dtype`` row by row to an open file.

    ``path`` is the name errors give (the file's final name, not a temporary one).

    No memory map: a full disk is an ``OSError`` here, turned into one
    :class:`AvatarPackageError` line, never a SIGBUS.
    """

    def __init__(
        self, fd: int, path: Path, shape: tuple[int, ...], dtype: np.dtype | type = np.uint8, *, closefd: bool = False
    ) -> None:
        self.path = path
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        # closefd=False: a caller that holds a lock on the file keeps its descriptor open until it is done
        self._f = os.fdopen(fd, "wb", buffering=1 << 20, closefd=closefd)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        self._guard(lambda: np.lib.format.write_array_header_1_0(self._f, header))

    def _guard(self, op: Callable[[], object]) -> None:
        try:
            op()
        except OSError as exc:
            raise AvatarPackageError(no_space_message(self.path, exc, self.nbytes)) from None

    def write(self, row: np.ndarray) -> None:
        if self.rows >= self.shape[0]:
            raise AvatarPackageError(f"{self.path}: more than the {self.shape[0]} rows declared")
        a = np.ascontiguousarray(row, dtype=self.dtype)
        if a.shape != self.shape[1:]:
            raise AvatarPackageError(f"{self.path}: a row of shape {list(a.shape)}, expected {list(self.shape[1:])}")
        self._guard(lambda: self._f.write(memoryview(a).cast("B")))
        self.rows += 1

    def finish(self) -> None:
        """Flush everything to the file; refuses a short array."""
        if self.rows != self.shape[0]:
            raise AvatarPackageError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")
        self._guard(self._f.flush)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass  # only reached after a failed write, which has already been reported


def npy_complete(path: Path) -> tuple[int, ...] | None:
    """The shape of the ``.npy`` file ``path`` if its header is readable and its data complete, else None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, EOFError):
        return None
    if dtype.hasobject or size != offset + int(np.prod(shape)) * dtype.itemsize:
        return None
    return tuple(shape)
