"""One writer per output path, and a hidden partial file that becomes the output on success.

A sink writes ``.NAME.<pid>-<token>.partial<suffix>`` beside the target and renames
it over the target when it finishes (:func:`os.replace` is atomic within a
directory), so a failed render (a full disk, an encoder error) never destroys an
earlier file at that path, and a reader never sees a half-written one. The suffix
stays the container's, because FFmpeg picks the muxer from it.

:class:`OutputLock` makes a second writer to the same path fail at once instead of
one of two outputs being silently lost. It is an advisory ``flock`` on a hidden
``.NAME.lock`` beside the target, held from ``open`` to ``close``; the kernel drops it
when the process dies (even by SIGKILL), so a crash leaves no stale lock, and the
lock file is removed again by whoever releases it.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import secrets
from pathlib import Path

from avatar.errors import SinkError

log = logging.getLogger(__name__)


def partial_path(target: Path) -> Path:
    """A fresh hidden partial-file name beside ``target`` (same suffix)."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial{target.suffix}")


def remove_stale_partials(target: Path) -> None:
    """Remove partial files of earlier writers of ``target`` that died (call with the lock held)."""
    pattern = str(target.with_name(f".{glob.escape(target.name)}.*.partial{glob.escape(target.suffix)}"))
    for stale in glob.glob(pattern):
        try:
            os.unlink(stale)
            log.info("removed %s, left by an earlier render that did not finish", stale)
        except OSError as exc:
            log.warning("cannot remove the stale partial file %s: %s", stale, exc)


class OutputLock:
    """An exclusive, non-blocking lock on writing ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.with_name(f".{target.name}.lock")
        self._fd: int | None = None

    def _busy(self) -> SinkError:
        return SinkError(
            f"another render is writing {self.target} right now; wait for it to finish or choose "
            "another output path (two writers to one file would lose one output)"
        )

    def acquire(self) -> None:
        """Take the lock or raise :class:`SinkError` naming the path."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise SinkError(f"cannot create the lock file {self.path}: {exc}; check the directory's permissions") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise self._busy() from None
                raise SinkError(f"cannot lock {self.path}: {exc}") from exc
            # The holder before us may have removed the file after we opened it: then
            # we hold a lock on an orphan inode, and must lock the current file instead.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            st = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (st.st_ino, st.st_dev):
                self._fd = fd
                return
            os.close(fd)

    def check(self) -> None:
        """Raise now if another writer holds the lock (takes and drops it)."""
        self.acquire()
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)  # still holding the lock: nobody can be between open and flock on it
        except OSError:
            pass
        os.close(fd)
