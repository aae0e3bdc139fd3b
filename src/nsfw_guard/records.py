r"""The scan's record file: one JSON line (or CSV row) per input, for any file name.

A :class:`RecordFile` locks its output while a scan writes it (a second writer gets
:class:`RecordFileBusy`), first replaces the file atomically with the records to keep, then
appends and flushes batch by batch, so a kill loses at most the batch in flight.
:func:`read_records` reads a record file back for ``--resume``: a last line cut short by a kill
is skipped silently, any other line that is not a valid record is skipped with one
:class:`RecordWarning` that says how many and where.

The format follows the suffix: ``.csv`` is CSV with a header row (:data:`RECORD_FIELDS`),
``.parquet`` a parquet table (needs ``pyarrow``), anything else JSON lines. Names that are not
valid UTF-8 round-trip in JSON lines (escaped, ``ensure_ascii``) and CSV (their original bytes,
``surrogateescape``); parquet holds UTF-8 text only, so such a name is written with its bad
bytes as ``\xNN`` escapes (and scanned again by a ``--resume``). A parquet file cannot be
appended to: while a scan runs, its records go to a hidden JSON lines file beside it
(``.NAME.nsfw-guard.jsonl``), which becomes the parquet file when the scan ends and which
:func:`read_records` reads instead while it is there (a killed scan's records).

This module imports nothing heavy (no torch), so small tools can read records quickly.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .own_files import new_temporary_file

__all__ = [
    "RECORD_FIELDS",
    "RecordFile",
    "RecordFileBusy",
    "RecordWarning",
    "part_path",
    "part_paths",
    "read_records",
    "record_key",
]

_ORIGINAL_FIELDS = (
    "path",
    "level",
    "neutral",
    "low",
    "medium",
    "high",
    "flagged",
    "width",
    "height",
    "frames",
    "error",
    "bytes",
    "mtime",
)
RECORD_FIELDS: tuple[str, ...] = (
    *_ORIGINAL_FIELDS,
    "realpath",
    "frames_checked",
    "model",
    "member",
    "sampled",
)
"""One record per input, in this order. ``path`` is the input as the user gave it (for display);
``realpath`` (absolute, links resolved, at scan time), ``bytes`` and ``mtime`` identify the file
version for ``--resume`` (see :func:`record_key`). ``frames`` is how many frames the file has,
``frames_checked`` how many were checked: all of them, unless ``--max-frames`` asked for a
sample, and then ``sampled`` is true (and ``flagged`` too: the other frames were never looked
at). ``model`` names the checkpoint that scored it, so a resume with another model scans
it again. ``member`` is the image inside a shard (a tar member's name, a parquet row number);
``None`` for an image file. New fields are appended at the end (and given
a kind in ``_KINDS``); record files written before them lack them, and read as ``None``."""

_LEVELS = ("neutral", "low", "medium", "high")  # NSFWLevel's values (levels.py imports torch)
_KINDS: dict[str, tuple[Any, str]] = {  # each field's JSON type, as said in a warning
    **dict.fromkeys(("path", "realpath", "error", "model", "member"), (str, "a string")),
    **dict.fromkeys(("neutral", "low", "medium", "high", "mtime"), ((int, float), "a number")),
    **dict.fromkeys(("width", "height", "frames", "bytes", "frames_checked"), (int, "an integer")),
    **dict.fromkeys(("flagged", "sampled"), (bool, "true or false")),
    "level": (str, f"one of {', '.join(_LEVELS)}"),
}
_REQUIRED = frozenset(("path", "flagged", "bytes", "mtime"))  # never null
_OPTIONAL = frozenset(RECORD_FIELDS[len(_ORIGINAL_FIELDS) :])  # absent from older files
_SHOWN = 5  # bad lines a warning names
assert set(_KINDS) == set(RECORD_FIELDS), "a field without a kind"


class RecordWarning(UserWarning):
    """Lines of a record file that are not records were skipped."""


class RecordFileBusy(OSError):
    """Another process (its ``pid`` when known) is writing the record file at ``path``."""

    def __init__(self, path: str | os.PathLike, pid: int | None = None):
        self.path = Path(path)
        self.pid = pid
        by = f" (pid {pid})" if pid is not None else ""
        super().__init__(
            f"{path} is being written by another nsfw-guard scan{by}; "
            "wait for it or choose another --output"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.pid))


def record_key(record: Mapping[str, Any]) -> tuple[str, int, float, str | None]:
    """``(realpath, bytes, mtime, member)``: which version of which file a record is about,
    and which image inside it when the file is a shard.

    Records written before ``realpath`` existed have it ``None``; their ``path`` is then
    resolved against the current working folder, which is where a relative path pointed if
    the scan is resumed from where it started (the only case that resumed before).

    Example:
        >>> record_key({"path": "a.jpg", "realpath": "/data/a.jpg", "bytes": 10, "mtime": 1.5})
        ('/data/a.jpg', 10, 1.5, None)
        >>> record_key({"path": "a.jpg", "realpath": None, "bytes": 10, "mtime": 1})[0] == (
        ...     os.path.realpath("a.jpg"))
        True
    """
    realpath = record.get("realpath") or os.path.realpath(record["path"])
    return (realpath, int(record["bytes"]), float(record["mtime"]), record.get("member"))


def part_path(output: str | os.PathLike, rank: int) -> Path:
    """Where process ``rank`` of a multi-process scan writes its records (the output's format):
    a hidden file named after the output and this tool, so it is never a user's file.

    Example:
        >>> part_path("out/results.jsonl", 1).as_posix()
        'out/.results.jsonl.part1.nsfw-guard.jsonl'
    """
    output = Path(output)
    return output.with_name(f"{_hidden_stem(output)}.part{rank}.nsfw-guard{output.suffix}")


def part_paths(output: str | os.PathLike) -> list[Path]:
    """The part files of ``output`` there are (left by a killed multi-process scan, say).

    Example:
        >>> part_paths("no/such/folder/results.jsonl")
        []
    """
    output = Path(output)
    pattern = re.compile(
        re.escape(_hidden_stem(output)) + r"\.part\d+\.nsfw-guard" + re.escape(output.suffix)
    )
    try:
        names = os.listdir(output.parent)
    except OSError:
        return []
    return sorted(output.parent / name for name in names if pattern.fullmatch(name))


def _hidden_stem(output: Path) -> str:
    """``.NAME`` for the files nsfw-guard keeps beside ``output``, or ``.nsfw-guard-HASH``
    where ``NAME`` is too long to take a suffix on a file system (255 bytes)."""
    if len(os.fsencode(output.name)) <= 200:
        return f".{output.name}"
    return f".nsfw-guard-{hashlib.sha256(os.fsencode(output.name)).hexdigest()[:16]}"


# Checking and converting records ------------------------------------------------------------------


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _checked(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with its JSON types checked and made plain (``float``, ``int``, ``str``,
    ``bool``, ``None``), its fields in :data:`RECORD_FIELDS` order; ``ValueError`` says what
    is wrong."""
    out: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        if name not in record and name not in _OPTIONAL:
            raise ValueError(f"no {name!r}")
        value = record.get(name)
        if value is None and name not in _REQUIRED:
            out[name] = None
            continue
        kind, expected = _KINDS[name]
        if (
            not isinstance(value, kind)
            or (kind is not bool and isinstance(value, bool))
            or (name == "level" and value not in _LEVELS)
            or (name == "path" and not value)
        ):
            null = "" if name in _REQUIRED else " or null"
            raise ValueError(f"{name!r}: expected {expected}{null}, got {_shown(value)}")
        if name == "level":
            value = _LEVELS[_LEVELS.index(value)]  # a plain str, even for an NSFWLevel
        elif kind is str:
            value = str.__str__(value)
        else:  # numpy's float64 is a float, but CSV writes its repr: np.float64(0.5)
            value = float(value) if kind == (int, float) else kind(value)
        out[name] = value
    return out


def _from_csv(row: Mapping[str, str]) -> dict[str, Any]:
    """A CSV row (all strings) as the record a JSON line would give."""
    values: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        if name not in row:
            if name in _OPTIONAL:
                continue
            raise ValueError(f"no {name!r} column")
        text = row[name]
        kind = _KINDS[name][0]
        try:
            if name not in _REQUIRED and text in ("", "None"):
                values[name] = None
            elif kind is bool:
                values[name] = {"true": True, "1": True, "false": False, "0": False}[
                    text.strip().lower()
                ]
            else:  # str, int, or a number (float)
                values[name] = float(text) if kind == (int, float) else kind(text)
        except (ValueError, KeyError):
            raise ValueError(f"{name!r}: cannot read {_shown(text)}") from None
    return _checked(values)


def _for_writing(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` checked for writing: every field of :data:`RECORD_FIELDS` and no other."""
    unknown = [name for name in record if name not in RECORD_FIELDS]
    missing = [name for name in RECORD_FIELDS if name not in record]
    try:
        if unknown or missing:
            unknown_ = f"unknown field(s) {', '.join(map(repr, unknown))}" if unknown else ""
            missing_ = f"no {', '.join(map(repr, missing))}" if missing else ""
            raise ValueError("; ".join(filter(None, [unknown_, missing_])))
        return _checked(record)
    except ValueError as error:
        raise ValueError(f"record for {_shown(record.get('path'))}: {error}") from None


# Reading ------------------------------------------------------------------------------------------


def read_records(path: str | os.PathLike, *, warn: bool = True) -> list[dict[str, Any]]:
    """The records in a JSON lines or CSV record file (none if it does not exist), typed as
    JSON lines give them: numbers (``float`` scores and ``mtime``, ``int`` sizes and
    ``bytes``), ``bool`` ``flagged``, ``None`` for what is missing, ``realpath`` ``None`` in
    files written before it existed.

    A last line cut short by a kill is skipped silently. Other lines that are not records
    (invalid UTF-8, not a JSON object, a wrong type, a CSV row with missing columns) are
    skipped with one :class:`RecordWarning` (unless ``warn`` is false) naming how many and the
    first few, with what is wrong.

    Example:
        >>> import tempfile
        >>> output = Path(tempfile.mkdtemp()) / "results.jsonl"
        >>> read_records(output)
        []
        >>> with RecordFile(output) as records:
        ...     records.write([_example("a.jpg"), _example("b.jpg")])
        >>> with output.open("a") as file:
        ...     _ = file.write('[1, 2]\\n{"path": "cut sho')  # a stray line, a cut line
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     [record["path"] for record in read_records(output)]
        ['a.jpg', 'b.jpg']
        >>> print(caught[0].message)  # doctest: +ELLIPSIS
        /.../results.jsonl: skipped 1 line that is not a record: line 3 (not a JSON object)
    """
    path = Path(path)
    if _is_parquet(path) and _working_path(path).is_file():  # a scan of it was killed
        path = _working_path(path)
    if not path.is_file():
        return []
    bad: list[tuple[int, str]] = []
    if _is_parquet(path):
        records = list(_read_parquet(path, bad))
    elif _is_csv(path):
        with path.open(encoding="utf-8", errors="surrogateescape", newline="") as file:
            records = list(_read_csv(file, bad))
    else:
        with path.open("rb") as file:
            records = list(_read_jsonl(file, bad))
    if bad and warn:
        count = len(bad)
        unit = "row" if _is_parquet(path) else "line"
        shown = ", ".join(
            f"{unit} {number} ({why})" if number else why for number, why in bad[:_SHOWN]
        )
        more = f", and {count - _SHOWN} more" if count > _SHOWN else ""
        lines = f"{unit} that is not a record" if count == 1 else f"{unit}s that are not records"
        warnings.warn(
            f"{path}: skipped {count} {lines}: {shown}{more}", RecordWarning, stacklevel=2
        )
    return records


def _read_jsonl(file: IO[bytes], bad: list[tuple[int, str]]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(file, start=1):
        cut = not line.endswith(b"\n")  # only the last line can be: cut short by a kill?
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            if not cut:
                bad.append((number, "invalid UTF-8"))
            continue
        except (ValueError, RecursionError):
            if not cut:
                bad.append((number, "not JSON"))
            continue
        if not isinstance(value, dict):
            bad.append((number, "not a JSON object"))
            continue
        try:
            yield _checked(value)
        except ValueError as error:
            bad.append((number, str(error)))


def _read_csv(file: IO[str], bad: list[tuple[int, str]]) -> Iterator[dict[str, Any]]:
    raw: list[str] = []  # the text of the row being read

    def lines() -> Iterator[str]:
        for line in file:
            raw.append(line)
            yield line

    reader = csv.reader(lines())
    header: list[str] | None = None
    pending: tuple[int, list[str], str] | None = None  # checked once we know if it is the last
    while True:
        raw.clear()
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            bad.append((start, f"not CSV: {error}"))
            continue
        if not row:  # a blank line
            continue
        if header is None:
            header = [name.strip().lstrip("\ufeff") for name in row]
            continue
        if pending is not None:
            record = _csv_record(header, *pending[:2], bad)
            if record is not None:
                yield record
        pending = (start, row, "".join(raw))
    if pending is not None and header is not None:
        text = pending[2]
        # Written rows end with a line break outside quotes. A last row without one was cut by
        # a kill (or lost only its line break): it is skipped, since a cut in its last field
        # (``member``) could leave a whole-looking row about another image; --resume scans
        # that one input again.
        if text.count('"') % 2 == 0 and text.endswith("\n"):
            record = _csv_record(header, *pending[:2], bad)
            if record is not None:
                yield record


def _csv_record(
    header: list[str], number: int, row: list[str], bad: list[tuple[int, str]]
) -> dict[str, Any] | None:
    if len(row) != len(header):
        bad.append((number, f"{len(row)} columns, the header has {len(header)}"))
        return None
    try:
        return _from_csv(dict(zip(header, row, strict=True)))
    except ValueError as error:
        bad.append((number, str(error)))
        return None


def _is_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def _working_path(path: Path) -> Path:
    """Where the records of a parquet output go while a scan writes them."""
    return path.with_name(f"{_hidden_stem(path)}.nsfw-guard.jsonl")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError(
            "parquet records need pyarrow: pip install 'nsfw-guard[parquet]'"
        ) from None
    return pyarrow


def _parquet_schema() -> Any:
    pa = _pyarrow()
    types = {str: pa.string(), int: pa.int64(), (int, float): pa.float64(), bool: pa.bool_()}
    return pa.schema([(name, types[_KINDS[name][0]]) for name in RECORD_FIELDS])


def _read_parquet(path: Path, bad: list[tuple[int, str]]) -> Iterator[dict[str, Any]]:
    try:
        rows = _pyarrow().parquet.read_table(path).to_pylist()
    except ImportError:
        raise
    except Exception as error:  # not parquet, or damaged
        bad.append((0, f"not a readable parquet file: {error}"))
        return
    for number, row in enumerate(rows, start=1):
        try:
            yield _checked(row)
        except ValueError as error:
            bad.append((number, str(error)))


def _utf8(value: Any) -> Any:
    """Text parquet can hold: a name's bytes that are not UTF-8 as ``\\xNN`` escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


# Writing ------------------------------------------------------------------------------------------


class RecordFile:
    """The record file a scan writes, locked against other writers until closed.

    Opening takes the lock (a sidecar ``.NAME.nsfw-guard.lock`` holding the writer's pid;
    :class:`RecordFileBusy` if another process holds it) and replaces the file atomically
    with the records in ``keep``. With ``keep=None`` it only takes the lock, and :meth:`start`
    replaces the file: a resumed scan reads the records to keep (``read_records(path)``) in
    between, under the lock, so no other scan's are lost. :meth:`write` appends records and
    flushes them. The lock is released on :meth:`close`, or by the operating
    system when the process dies. No file but ``path``, its lock file, temporary files next to
    it (``.nsfw-guard-HASH-XXXX.tmp``, renamed over ``path``) and, for a parquet ``path``, its
    working file (``.NAME.nsfw-guard.jsonl``, written as parquet on :meth:`close`) is ever
    touched.

    Example:
        >>> import tempfile
        >>> output = Path(tempfile.mkdtemp()) / "results.csv"
        >>> with RecordFile(output) as records:
        ...     records.write([_example("a.jpg")])
        ...     RecordFile(output)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        nsfw_guard.records.RecordFileBusy: /.../results.csv is being written by another ...
        >>> with RecordFile(output, keep=None) as records:  # --resume
        ...     records.start(read_records(output))
        ...     records.write([_example("b.jpg")])
        >>> [record["path"] for record in read_records(output)]
        ['a.jpg', 'b.jpg']
    """

    def __init__(self, path: str | os.PathLike, *, keep: Sequence[Mapping[str, Any]] | None = ()):
        self.path = Path(path)
        self.csv = _is_csv(self.path)
        self.parquet = _is_parquet(self.path)
        if self.parquet:
            _pyarrow()  # before anything is written: a scan never ends without its records
        # A parquet output is written in the end; its records go to a JSON lines file till then.
        self._written = _working_path(self.path) if self.parquet else self.path
        self._file: IO[str] | None = None
        self._lock_path = self.path.with_name(f"{_hidden_stem(self.path)}.nsfw-guard.lock")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self.path.parent))
        self._lock = _lock(self._lock_path, self.path)
        self._closed = False
        if keep is not None:
            try:
                self.start(keep)
            except BaseException:
                self.close()
                raise

    def start(self, keep: Sequence[Mapping[str, Any]]) -> None:
        """Replace the file atomically with the records in ``keep``, to append to (once, when
        opened with ``keep=None``)."""
        if self._file is not None or self._closed:
            raise ValueError(f"{self.path}: the record file is already started or closed")
        self._file = self._replace([_for_writing(record) for record in keep])

    def _temporary(self, target: Path) -> tuple[int, Path]:
        """A new temporary file beside ``target``, to rename over it; those of killed writers
        of ``target`` are removed first (the lock is ours)."""
        folder = target.parent
        # Named after the target (by hash: any name fits), created anew (never through a link).
        prefix = f".nsfw-guard-{hashlib.sha256(os.fsencode(target.name)).hexdigest()[:16]}-"
        for entry in os.listdir(folder):
            if entry.startswith(prefix) and entry.endswith(".tmp"):
                (folder / entry).unlink(missing_ok=True)
        return new_temporary_file(folder, prefix)

    def _rename_over(self, temporary: Path, target: Path) -> None:
        """Rename ``temporary`` over ``target``, with the output's permissions if it exists."""
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temporary, stat.S_IMODE(os.stat(self.path).st_mode))
        os.replace(temporary, target)

    def _replace(self, records: list[dict[str, Any]]) -> IO[str]:
        """Write ``records`` to a temporary file and rename it over the output; the open
        temporary file becomes the output, to append to."""
        descriptor, temporary = self._temporary(self._written)
        file = os.fdopen(
            descriptor,
            "w",
            encoding="utf-8",
            errors="surrogateescape" if self.csv else "strict",
            newline="" if self.csv else "\n",
        )
        try:
            if self.csv:
                csv.writer(file).writerow(RECORD_FIELDS)
            self._write_to(file, records)
            os.fsync(file.fileno())  # data before rename: after a crash, the old or the new
            self._rename_over(temporary, self._written)
        except BaseException:
            file.close()
            temporary.unlink(missing_ok=True)
            raise
        return file

    def _write_parquet(self) -> None:
        """The working file's records as the parquet output (atomically), then no working
        file."""
        pa = _pyarrow()
        records = read_records(self._written, warn=False)
        table = pa.Table.from_pylist(
            [{name: _utf8(value) for name, value in record.items()} for record in records],
            schema=_parquet_schema(),
        )
        descriptor, temporary = self._temporary(self.path)
        try:
            with os.fdopen(descriptor, "wb") as file:
                pa.parquet.write_table(table, file)
                file.flush()
                os.fsync(file.fileno())
            self._rename_over(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self._written.unlink()

    def _write_to(self, file: IO[str], records: list[dict[str, Any]]) -> None:
        if self.csv:
            writer = csv.writer(file)
            writer.writerows([record[name] for name in RECORD_FIELDS] for record in records)
        else:
            file.writelines(json.dumps(record, ensure_ascii=True) + "\n" for record in records)
        file.flush()

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append ``records`` and flush them, so that a kill from now on loses none of them
        (all are checked first: a bad one writes none; no ``fsync``, which only a crash of
        the system would need)."""
        if self._file is None:
            raise ValueError(f"{self.path}: the record file is not started, or closed")
        self._write_to(self._file, [_for_writing(record) for record in records])

    def close(self) -> None:
        """Close the file, on disk (``fsync``: once, not per batch), and release the lock
        (again: nothing)."""
        try:
            if self._file is not None:
                with self._file:
                    self._file.flush()
                    os.fsync(self._file.fileno())
                if self.parquet:
                    self._write_parquet()
        finally:
            self._file = None
            self._closed = True
            if self._lock is not None:
                _unlock(self._lock, self._lock_path)
                self._lock = None

    def __enter__(self) -> RecordFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _lock(lock_path: Path, output: Path) -> int | None:
    """Take the lock on ``output``: its open lock file, or ``None`` where the file system
    cannot lock (after a warning)."""
    while True:
        try:  # never through a link: a link planted there must not get the pid written
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            raise OSError(
                errno.ELOOP, f"{lock_path} is a link; nsfw-guard does not write through it"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise RecordFileBusy(output, pid) from None
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            lock_path.unlink(missing_ok=True)
            warnings.warn(
                f"{output}: this file system cannot lock it ({error.strerror}); make sure "
                "no other nsfw-guard scan writes it at the same time",
                RecordWarning,
                stacklevel=3,
            )
            return None
        # The last holder removes the lock file on close: locking one it has just removed
        # would lock nothing, so check that the file locked is still the one at lock_path.
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _held.add(fd)
            return fd
        os.close(fd)


_held: set[int] = set()  # the lock files this process holds open


def _forget_locks() -> None:
    """In a forked child (a DataLoader worker): close its copies of the lock files, so that
    each lock ends with the process that took it, not with its last worker. (Closing a copy
    does not release the lock; only ``LOCK_UN`` or closing every copy does.)"""
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_locks)


def _holder(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _unlock(fd: int | None, lock_path: Path) -> None:
    if fd is None:
        return
    _held.discard(fd)
    try:
        if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
            os.unlink(lock_path)  # while still holding the lock
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)  # releases the lock


def _example(path: str) -> dict[str, Any]:
    """A record for the examples."""
    return {
        **dict.fromkeys(RECORD_FIELDS),
        "path": path,
        "realpath": os.path.realpath(path),
        "level": "low",
        **dict(zip(_LEVELS, (1.0, 0.75, 0.0625, 0.0), strict=True)),
        "flagged": False,
        **dict(zip(("width", "height", "frames"), (640, 480, 1), strict=True)),
        "bytes": 1234,
        "mtime": 1712345678.123456,
    }
