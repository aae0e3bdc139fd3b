"""The files nsfw-guard writes beside a user's: lines appended to its own JSON-lines files (the
copies' manifest, the review's decisions) so that a full disk or a kill never leaves a line that
swallows the next one, and new temporary files (renamed into place) with the permissions any
new file of the user's gets."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
from pathlib import Path

__all__ = ["append_line", "glued_lines", "new_temporary_file"]


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


def glued_lines(line: bytes, start: bytes) -> list[bytes]:
    """The lines one line of a file holds when appends went on after a line cut short (a full
    disk, before :func:`append_line` ended cut lines): ``line`` split before each ``start``,
    how every line of the file begins (a JSON object's first key, which JSON strings, escaping
    their quotes, cannot hold).

    Example:
        >>> glued_lines(b'{"path": "a.j{"path": "b.jpg"}\\n', b'{"path": ')
        [b'{"path": "a.j', b'{"path": "b.jpg"}\\n']
    """
    return [piece for piece in re.split(b"(?=" + re.escape(start) + b")", line) if piece]


def new_temporary_file(folder: str | os.PathLike, prefix: str) -> tuple[int, Path]:
    """A new empty file ``folder/PREFIX<random>.tmp`` opened for writing: ``(descriptor, path)``.

    Created anew, never through a link, with mode ``0o666`` less the umask, as the file it will
    be renamed over would be (``tempfile.mkstemp`` makes ``0o600``: a copy or record file other
    users and programs could not read).

    Example:
        >>> import tempfile
        >>> descriptor, path = new_temporary_file(tempfile.mkdtemp(), ".nsfw-guard-")
        >>> os.close(descriptor)
        >>> path.name.startswith(".nsfw-guard-") and path.suffix == ".tmp"
        True
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        path = Path(folder, f"{prefix}{secrets.token_hex(6)}.tmp")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
