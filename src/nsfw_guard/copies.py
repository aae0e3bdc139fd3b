"""``scan --censor-to DIR``: censored (and clean) copies, written only where they harm nothing.

A copy goes to ``DIR/<its input's relative path>``. The folder keeps a manifest of the copies this
tool wrote (``DIR/.nsfw-guard-copies.jsonl``: relative path, size and modification time of each),
so that a later run may replace its own copies but never a file it did not write: a target that
exists and is not one of its copies is a conflict, found before any work. Copies are written to a
temporary file, listed in the manifest, then renamed into place, so a kill never leaves a half
copy or a copy the manifest does not know.

Copies are made from the bytes that were decoded and checked (never by reading the file again):
clean ones byte for byte, flagged ones censored frame by frame with the check step's action, in
the same format where Pillow can write it, with the verdict in their metadata.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .check import CheckStep
from .decode import decode_image
from .preprocess import WHITE, composite_alpha, to_unit_range

__all__ = ["MANIFEST_NAME", "CopyConflict", "CopyFolder"]

MANIFEST_NAME = ".nsfw-guard-copies.jsonl"


class CopyConflict(ValueError):
    """A copy would replace a file this tool did not write (or two inputs one copy)."""


@dataclass(frozen=True)
class _Entry:
    size: int
    mtime_ns: int


class CopyFolder:
    """The folder censored copies go to, and the copies this tool has written there.

    Example:
        >>> import tempfile
        >>> folder = CopyFolder(Path(tempfile.mkdtemp()) / "copies")
        >>> folder.write_bytes(Path("a/b.png"), b"not really a png")
        >>> folder.owns(folder.folder / "a/b.png"), folder.owns(folder.folder / "a/c.png")
        (True, False)
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise CopyConflict(f"--censor-to {self.folder}: a file, not a folder")
        self.manifest = self.folder / MANIFEST_NAME
        self._entries = self._read_manifest()

    def owns(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is a copy this tool wrote and nobody has changed since."""
        try:
            relative = Path(os.path.relpath(os.path.realpath(path), os.path.realpath(self.folder)))
            stat = os.stat(path, follow_symlinks=False)
        except (OSError, ValueError):
            return False
        entry = self._entries.get(relative.as_posix())
        return entry is not None and entry == _Entry(stat.st_size, stat.st_mtime_ns)

    def check(self, inputs: Sequence[Any]) -> None:
        """Raise :class:`CopyConflict` (one line) if a copy of ``inputs`` (each with ``path`` and
        ``relative``) would replace a file this tool did not write, an input, or another copy."""
        originals = {os.path.realpath(item.path): item.path for item in inputs}
        targets: dict[str, Path] = {}
        for item in inputs:
            target = self.folder / item.relative
            real = os.path.realpath(target)
            if real in originals:
                raise CopyConflict(
                    f"--censor-to {self.folder} would replace {originals[real]}, a file it "
                    "scans: originals are never touched; choose another folder"
                )
            if targets.setdefault(real, item.path) != item.path:
                raise CopyConflict(
                    f"--censor-to {self.folder}: {targets[real]} and {item.path} would both be "
                    f"copied to {target}"
                )
            if os.path.lexists(target) and not self.owns(target):
                raise CopyConflict(
                    f"--censor-to {self.folder} would replace {target}, which nsfw-guard did "
                    "not write: choose an empty or new folder"
                )

    def write_bytes(self, relative: Path, data: bytes) -> None:
        """Write ``data`` to ``folder/relative``: temporary file, manifest entry, rename."""
        self._write(relative, lambda file: file.write(data))

    def write_censored(
        self, relative: Path, data: bytes, step: CheckStep, verdict: dict[str, Any]
    ) -> None:
        """Write the censored copy of the image in ``data`` (every frame) to ``folder/relative``,
        with ``verdict`` in its metadata."""
        self._write(relative, lambda file: _save_censored(data, file, step, json.dumps(verdict)))

    def _write(self, relative: Path, save) -> None:
        destination = self.folder / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(f".{destination.name}.{os.getpid()}.nsfw-guard.tmp")
        try:
            with temporary.open("wb") as file:
                save(file)
            stat = temporary.stat()
            self._remember(relative, _Entry(stat.st_size, stat.st_mtime_ns))
            os.replace(temporary, destination)
        finally:
            temporary.unlink(missing_ok=True)

    def _remember(self, relative: Path, entry: _Entry) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        key = relative.as_posix()
        line = {"path": key, "size": entry.size, "mtime_ns": entry.mtime_ns}
        with self.manifest.open("a", encoding="utf-8", errors="surrogateescape") as file:
            file.write(json.dumps(line) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self._entries[key] = entry

    def _read_manifest(self) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        if not self.manifest.is_file():
            return entries
        bad = 0
        with self.manifest.open(encoding="utf-8", errors="surrogateescape") as file:
            for line in file:
                try:
                    item = json.loads(line)
                    entries[str(item["path"])] = _Entry(int(item["size"]), int(item["mtime_ns"]))
                except (ValueError, TypeError, KeyError):
                    bad += 1
        if bad:
            warnings.warn(
                f"{self.manifest}: {bad} unreadable line(s) ignored; the copies they listed "
                "count as files nsfw-guard did not write",
                stacklevel=3,
            )
        return entries


def _save_censored(data: bytes, file: io.BufferedWriter, step: CheckStep, verdict: str) -> None:
    """Censor every frame of the image in ``data`` with ``step``'s action and save it."""
    decoded = decode_image(data)
    frames = []
    for frame in decoded.frames:
        # What the detector saw: alpha composited over white, gray as RGB; then censored.
        unit = composite_alpha(to_unit_range(frame.pixels, frame.value_range), WHITE)
        unit = unit.expand(-1, 3, -1, -1)
        flagged = torch.ones(1, dtype=torch.bool)  # to_unit_range made NaN pixels 0: verifiable
        censored = step.censor(unit, flagged, flagged, "0,1")
        array = (censored[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        frames.append(Image.fromarray(array.numpy()))
    fmt = decoded.format if decoded.format in Image.SAVE else "PNG"
    fmt = "JPEG" if fmt == "MPO" else fmt
    options: dict[str, Any] = {"format": fmt}
    if fmt == "PNG":
        options["pnginfo"] = PngInfo()
        options["pnginfo"].add_text("nsfw-guard", verdict)
    elif fmt == "GIF":
        options["comment"] = verdict.encode()
    else:
        exif = Image.Exif()
        exif[0x010E] = verdict  # ImageDescription
        options["exif"] = exif
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = 95
    if len(frames) > 1 and fmt in ("GIF", "PNG", "WEBP", "TIFF"):
        with Image.open(io.BytesIO(data)) as original:
            duration = original.info.get("duration", 100)
        options.update(save_all=True, append_images=frames[1:], loop=0, duration=duration)
    frames[0].save(file, **options)
