"""What a scan reads: image files, and the images inside dataset shards, one input each.

:func:`find_images` turns the paths a user gives (files, folders, brace patterns such as
``shards/{00000..00099}.tar``) into :class:`ScanInput` items, and :func:`read_input` reads one
input's bytes. Besides image files (by extension) it opens two kinds of shards:

- **webdataset tar shards** (``.tar``, uncompressed): each member whose name ends in an image
  extension is an input, read in place at its offset. A shard cut short (a truncated download)
  keeps the members that are whole; the rest of it becomes one error input.
- **parquet files** (``.parquet``, needs ``pyarrow``): each row of the image column is an input:
  encoded bytes (img2dataset's ``jpg``) or a Hugging Face image struct ``{"bytes": ...}``.

An input is identified by its file's real path, size and mtime and, inside a shard, its
``member`` (the tar member's name, or the parquet row number), so ``--resume`` redoes exactly
the inputs without a record of their current version.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .decode import file_kind, open_regular

if TYPE_CHECKING:
    from .copies import CopyFolder

__all__ = [
    "BYTES_COLUMNS",
    "IMAGE_EXTENSIONS",
    "SHARD_EXTENSIONS",
    "Member",
    "ScanInput",
    "expand_paths",
    "find_images",
    "is_shard",
    "read_input",
]

IMAGE_EXTENSIONS = frozenset(
    [
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".apng",
        ".webp",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".ico",
        ".avif",
    ]
)
SHARD_EXTENSIONS = frozenset([".tar", ".parquet"])
BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif")
"""Columns taken as encoded images when no image column is named (webdataset's and
img2dataset's extensions), after ``image``."""
_TAR_BLOCK = 512


@dataclass(frozen=True)
class Member:
    """Where one image inside a shard is: a tar member's data, or a cell of a parquet row."""

    name: str
    """The tar member's name, or the parquet row number (as text); unique in its shard."""
    kind: Literal["tar", "parquet"]
    offset: int
    """Tar: where the member's data starts. Parquet: the row number."""
    size: int = -1
    """Tar: the member's size in bytes."""
    column: str | None = None
    """Parquet: the image column."""


@dataclass(frozen=True)
class ScanInput:
    """One input: where it is, where its copy goes, its version, or why it cannot be scanned."""

    path: Path
    relative: Path
    realpath: str
    bytes: int
    mtime: float
    error: str | None = None
    member: Member | None = None
    """The image inside the shard at ``path``; ``None`` for an image file (or a whole shard
    that cannot be read, with its ``error``)."""

    @property
    def key(self) -> tuple[str, int, float, str | None]:
        return (self.realpath, self.bytes, self.mtime, self.member and self.member.name)

    @property
    def shown(self) -> str:
        """The path as the user gave it, and the member inside a shard (``a.tar:0001.jpg``)."""
        return f"{self.path}:{self.member.name}" if self.member else str(self.path)


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """``paths`` with brace patterns expanded (``{00000..00099}``, ``{a,b}``), as shells and
    webdataset do; a path that exists is taken as it is, braces and all.

    Example:
        >>> [p.name for p in expand_paths(["shards/{00..02}.tar", "tests/data"])]
        ['00.tar', '01.tar', '02.tar', 'data']
    """
    from braceexpand import braceexpand

    expanded: list[Path] = []
    for path in paths:
        text = os.fspath(path)
        if "{" in text and not os.path.lexists(text):
            expanded.extend(Path(item) for item in braceexpand(text))
        else:
            expanded.append(Path(text))
    return expanded


def find_images(
    paths: Sequence[str | os.PathLike],
    recursive: bool = True,
    copies: CopyFolder | None = None,
    folders: bool = True,
    image_column: str | None = None,
) -> list[ScanInput]:
    """The images under ``paths`` (files by extension, a file given directly always; the images
    in tar and parquet shards; brace patterns expanded), sorted, each with its version. Links
    to folders are followed, each folder once (so link loops end); a file reached by several
    paths is one input, under the first path found (the walk goes in sorted order, a folder's
    files before its sub-folders). The copies this tool wrote in ``copies`` are left out of the
    folders walked.

    What cannot be scanned is an input too, with its ``error``: a path that does not exist, a
    folder that cannot be read (or any folder given when ``folders`` is false), a FIFO, socket
    or device (never opened), a shard that cannot be read, the cut-off end of a truncated tar.
    Each input's ``relative`` path, which its copy keeps, is relative to its folder when one
    folder is given, else to the folder that holds all the paths. ``image_column`` names a
    parquet file's image column (default: ``image``, else the first of
    :data:`BYTES_COLUMNS` there is).

    Example:
        >>> [i.relative.name for i in find_images(["tests/data"])][:2]
        ['astronaut.jpg', 'camera_gray.jpg']
    """
    roots = expand_paths(paths)
    if len(roots) == 1:
        base = os.path.abspath(roots[0] if roots[0].is_dir() else roots[0].parent)
    else:
        base = os.path.commonpath([os.path.abspath(r.parent) for r in roots])

    found: dict[str, list[ScanInput]] = {}  # by real path: one file is one input, or a shard's
    walked: set[str] = set()

    def add(path: Path, error: str | None = None, in_folder: bool = False) -> None:
        relative = Path(os.path.relpath(os.path.abspath(path), base))
        item = _scan_input(path, relative, error)
        if item.realpath in found:
            return
        shard = path.suffix.lower() in SHARD_EXTENSIONS and item.bytes >= 0
        if item.error is None and shard:
            found[item.realpath] = list(_shard_inputs(item, image_column, in_folder))
        else:
            found[item.realpath] = [item]

    def walk(root: Path) -> None:
        def unreadable(error: OSError) -> None:
            add(Path(error.filename), f"{type(error).__name__}: {error.strerror}")

        for folder, subfolders, names in os.walk(root, onerror=unreadable, followlinks=True):
            real = os.path.realpath(folder)
            if real in walked:  # reached again, through a link: its files are found already
                subfolders.clear()
                continue
            walked.add(real)
            subfolders.sort()  # a file reached by several paths keeps the first, sorted
            for name in sorted(names):
                path = Path(folder) / name
                suffix = path.suffix.lower()
                wanted = suffix in IMAGE_EXTENSIONS or suffix in SHARD_EXTENSIONS
                if wanted and not (copies and copies.owns(path)):
                    add(path, in_folder=True)
            if not recursive:
                subfolders.clear()

    for root in roots:
        if not (root.exists() or root.is_symlink()):
            add(root, "FileNotFoundError: no such file or folder")
        elif not root.is_dir():
            add(root)
        elif not folders:
            add(root, "IsADirectoryError: a folder, not an image (scan it with nsfw-guard scan)")
        else:
            walk(root)
    items = [item for group in found.values() for item in group]
    # A stable sort: a shard's members stay in shard order, its own error (the cut-off end)
    # after them.
    return sorted(items, key=lambda item: (str(item.path), item.member is None))


def _scan_input(path: Path, relative: Path, error: str | None) -> ScanInput:
    realpath = os.path.realpath(path)
    try:
        info = os.stat(path)
    except OSError:  # a broken link or a loop: reading it will say what is wrong
        return ScanInput(path, relative, realpath, -1, -1.0, error)
    if error is None and not stat.S_ISREG(info.st_mode):
        error = f"NotARegularFile: {file_kind(info.st_mode)}, not a regular file: skipped"
    return ScanInput(path, relative, realpath, info.st_size, info.st_mtime, error)


def is_shard(item: ScanInput) -> bool:
    """Whether ``item`` is in a shard (or is a shard that could not be read)."""
    return item.member is not None or item.path.suffix.lower() in SHARD_EXTENSIONS


# Shards ------------------------------------------------------------------------------------------


def _shard_inputs(
    shard: ScanInput, image_column: str | None, in_folder: bool = False
) -> Iterator[ScanInput]:
    """The inputs inside ``shard``, each with its error if it cannot be read; what cannot be
    read of the shard itself, as one error input. A shard found in a folder that holds no
    images (a tar without image members, a parquet file without an image column: the
    metadata img2dataset writes beside its shards, say) is no input, as any other file that
    is not an image; given by name, it is an error."""
    lister = _tar_members if shard.path.suffix.lower() == ".tar" else _parquet_members
    try:
        for member, error in lister(shard, image_column):
            yield ScanInput(
                shard.path, shard.relative, shard.realpath, shard.bytes, shard.mtime, error, member
            )
    except Exception as error:
        if in_folder and isinstance(error, NoImages):
            return
        yield ScanInput(
            shard.path,
            shard.relative,
            shard.realpath,
            shard.bytes,
            shard.mtime,
            f"{type(error).__name__}: {error}".strip(),
        )


class ShardError(ValueError):
    """A shard, or part of one, cannot be read."""


class NoImages(ShardError):
    """A readable file that holds no images: a tar without image members, a parquet file
    without an image column."""


def _tar_members(shard: ScanInput, image_column: str | None) -> Iterator[tuple[Member, str | None]]:
    """The image members of an uncompressed tar, in order, each with its error if it cannot
    be read. A link member (hard or symbolic) is read from the file member it names, as
    ``tar -x`` would write it; a link to anything else, or a device or FIFO entry, is an
    error. Members cut short, and an archive that breaks off before its end marker, raise
    :class:`ShardError` after the whole ones."""
    with open_regular(shard.path) as file:
        size = os.fstat(file.fileno()).st_size
        try:
            archive = tarfile.open(fileobj=file, mode="r:")  # noqa: SIM115 - file is closed
        except tarfile.ReadError as error:
            raise ShardError(f"not an uncompressed tar archive ({error})") from None
        names: Counter[str] = Counter()
        files: dict[str, tarfile.TarInfo] = {}  # the file members so far, by normalized name
        images = last = 0
        for info in _members(archive):  # tarfile stops quietly at a cut or a broken header
            last = info.offset_data + info.size
            if info.isfile():
                files[posixpath.normpath(info.name)] = info
            if Path(info.name).suffix.lower() not in IMAGE_EXTENSIONS or info.isdir():
                continue
            data, error = info, None
            if info.islnk() or info.issym():
                data = files.get(_link_target(info))
                if data is None:
                    kind = "hard" if info.islnk() else "symbolic"
                    error = (
                        f"ShardError: a {kind} link to {info.linkname!r}, which is not a file "
                        "member before it in this archive"
                    )
            elif not info.isfile():  # a device or FIFO entry: it has no data
                data = None
                kind = "FIFO" if info.isfifo() else "device"
                error = f"NotARegularFile: a {kind} entry in the archive, not a file"
            if data is not None and data.offset_data + data.size > size:
                raise ShardError(
                    f"truncated: member {info.name!r} needs bytes up to "
                    f"{data.offset_data + data.size}, the file has {size}; the members before "
                    "it were read"
                )
            names[info.name] += 1
            count = names[info.name]  # a name used again (tar allows it): a member of its own
            name = info.name if count == 1 else f"{info.name}#{count}"
            images += 1
            if data is None:
                yield Member(name, "tar", info.offset_data, 0), error
            else:
                yield Member(name, "tar", data.offset_data, data.size), None
        end = archive.offset  # where tarfile stopped: the end marker, if the archive is whole
        file.seek(end)
        if file.read(_TAR_BLOCK) != bytes(_TAR_BLOCK):
            where = f"after {images} image member(s)" if last else "at its start"
            raise ShardError(
                f"truncated or damaged at byte {end} {where}: no tar end marker there; the "
                "members before it were read"
            )
        if not images:
            raise NoImages(
                "no image members (names ending .jpg, .png, .webp, ...) in this tar archive"
            )


def _link_target(info: tarfile.TarInfo) -> str:
    """The member name a link member points to: a hard link names it, a symbolic link's
    target is relative to the link's folder."""
    if info.islnk():
        return posixpath.normpath(info.linkname)
    return posixpath.normpath(posixpath.join(posixpath.dirname(info.name), info.linkname))


def _members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            info = archive.next()
        except tarfile.TarError as error:  # the previous member's data is cut short
            raise ShardError(f"truncated: {error}; the members before it were read") from None
        if info is None:
            return
        yield info


def _parquet_members(shard: ScanInput, image_column: str | None) -> Iterator[tuple[Member, None]]:
    """One member per row of the parquet file's image column."""
    parquet = _parquet_file(shard.path)
    schema = parquet.schema_arrow
    column = _image_column(schema, image_column)
    for row in range(parquet.metadata.num_rows):
        yield Member(str(row), "parquet", row, column=column), None


def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ShardError(
            "reading parquet needs pyarrow: pip install 'nsfw-guard[parquet]'"
        ) from None
    with open_regular(path):  # special files are never opened by pyarrow
        pass
    try:
        return pq.ParquetFile(path)
    except Exception as error:
        raise ShardError(f"not a readable parquet file ({error})") from None


def _image_column(schema: Any, wanted: str | None) -> str:
    """The image column of a parquet schema: ``wanted``, else ``image`` or a known one, else
    the one column a Hugging Face dataset declares an ``Image`` (as ``img`` in CIFAR-10); it
    must hold bytes or ``{"bytes": ...}`` structs."""
    import pyarrow as pa

    names = schema.names
    if wanted is not None and wanted not in names:
        raise NoImages(f"no column {wanted!r}; the columns are {', '.join(names)}")
    column = wanted or next((n for n in ("image", *BYTES_COLUMNS) if n in names), None)
    if column is None:
        declared = _declared_images(schema)
        if len(declared) > 1:
            raise ShardError(
                f"several image columns ({', '.join(declared)}); name one with --image-column"
            )
        column = declared[0] if declared else None
    if column is None:
        raise NoImages(f"no image column among {', '.join(names)}; name it with --image-column")
    kind = schema.field(column).type
    is_struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or is_struct):
        raise ShardError(
            f"column {column!r} holds {kind}, not image bytes (binary, or a struct with a "
            "'bytes' field); nsfw-guard reads no paths or URLs from a column"
        )
    return column


def _declared_images(schema: Any) -> list[str]:
    """The columns a Hugging Face dataset's parquet file declares ``Image`` features (in its
    ``huggingface`` schema metadata), else the columns of its image structs (``bytes`` and
    ``path``)."""
    import pyarrow as pa

    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
        declared = [
            name
            for name, feature in features.items()
            if isinstance(feature, dict) and feature.get("_type") == "Image"
        ]
    except (KeyError, TypeError, ValueError, AttributeError):
        declared = []
    if declared:
        return [name for name in declared if name in schema.names]
    return [
        field.name
        for field in schema
        if pa.types.is_struct(field.type)
        and {field.type.field(i).name for i in range(field.type.num_fields)} == {"bytes", "path"}
    ]


# Reading -----------------------------------------------------------------------------------------


def read_input(item: ScanInput) -> bytes:
    """The encoded image of ``item``: the whole file, or its member inside a shard (checked to
    be the version that was listed: a shard changed since raises ``ShardError``).

    Example:
        >>> item = find_images(["tests/data/rocket.jpg"])[0]
        >>> read_input(item)[:2]
        b'\\xff\\xd8'
    """
    if item.member is None:
        from .decode import read_file

        return read_file(item.path)
    with open_regular(item.path) as file:
        info = os.fstat(file.fileno())
        if (info.st_size, info.st_mtime) != (item.bytes, item.mtime):
            raise ShardError("the shard changed since it was listed; scan it again")
        if item.member.kind == "tar":
            data = os.pread(file.fileno(), item.member.size, item.member.offset)
            if len(data) != item.member.size:
                raise ShardError(f"truncated: {len(data)} of {item.member.size} bytes")
            return data
    return _parquet_cell(item)


# The row group read last, per process: rows come in order, so most cells are found in it
# without opening the file again. Keyed by the file's version and the column.
_last_group: dict[tuple[str, int, float, str | None], tuple[int, Any]] = {}


def _parquet_cell(item: ScanInput) -> bytes:
    member = item.member
    key = (item.realpath, item.bytes, item.mtime, member.column)
    cached = _last_group.get(key)
    if cached is None or not cached[0] <= member.offset < cached[0] + len(cached[1]):
        cached = _row_group(item.path, member.offset, member.column)
        _last_group.clear()
        _last_group[key] = cached
    start, values = cached
    value = values[member.offset - start].as_py()
    if isinstance(value, dict):  # a Hugging Face image struct
        if value.get("bytes") is None and value.get("path"):
            raise ShardError(
                f"the image struct names a path ({value['path']!r}) but holds no bytes; "
                "nsfw-guard reads no paths or URLs from a column"
            )
        value = value.get("bytes")
    if not isinstance(value, bytes):
        what = "nothing" if value is None else f"a {type(value).__name__}"
        raise ShardError(f"{what} where the image's bytes were expected")
    return value


def _row_group(path: Path, row: int, column: str | None) -> tuple[int, Any]:
    """``(its first row, its values)``: the row group of ``column`` that holds ``row``."""
    parquet = _parquet_file(path)
    start = 0
    for group in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if row < start + rows:
            return start, parquet.read_row_group(group, columns=[column]).column(0)
        start += rows
    raise ShardError(f"no row {row}: the file has {start} rows")
