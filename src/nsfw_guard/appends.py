"""Appending one line to a JSON-lines file nsfw-guard keeps (the copies' manifest, the review's
decisions), so that a full disk or a kill never leaves a line that swallows the next one."""

from __future__ import annotations

import errno
import fcntl
import os

__all__ = ["append_line"]


def append_line(path: str | os.PathLike, line: bytes) -> None:
    """Append ``line`` (ending in a line break) to ``path``: one ``write`` to the file opened
    for appending (created if missing, never through a link), then ``fsync``.

    A last line without its line break (cut short by a crash) is ended first, so the new line
    never joins it. A write that fails or is cut short (a full disk) is undone, the file cut
    back to its size before, and raises :class:`OSError` (``ENOSPC`` for a short write): the
    file never ends in part of ``line``, and the next append starts on a line of its own.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> log = Path(tempfile.mkdtemp()) / "log.jsonl"
        >>> _ = log.write_bytes(b'{"cut')
        >>> append_line(log, b'{"whole": 1}\\n')
        >>> log.read_bytes()
        b'{"cut\\n{"whole": 1}\\n'
    """
    if not line.endswith(b"\n"):
        raise ValueError(f"{line[-20:]!r}: a line to append must end in a line break")
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(path, flags, 0o644)
    try:
        # Locked, so that cutting the file back never cuts another writer's line.
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        size = os.fstat(descriptor).st_size
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            line = b"\n" + line
        try:
            written = os.write(descriptor, line)
            if written != len(line):
                message = f"only {written} of {len(line)} bytes of a line could be appended"
                raise OSError(errno.ENOSPC, f"{message} (is the disk full?)", str(path))
            os.fsync(descriptor)
        except OSError:
            os.ftruncate(descriptor, size)
            raise
    finally:
        os.close(descriptor)
