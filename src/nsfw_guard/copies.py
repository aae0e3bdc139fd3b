"""``scan --censor-to DIR``: censored (and clean) copies, written only where they harm nothing.

A copy goes to ``DIR/<its input's relative path>``. The folder keeps a manifest of the copies this
tool wrote (``DIR/.nsfw-guard-copies.jsonl``: relative path, size, modification time and whether
it is censored), so that a later run may replace its own copies but never a file it did not
write: a target that exists and is not one of its copies is a conflict, found before any work
and checked again before each copy. Nothing is written through a link: not the manifest, not a
copy outside ``DIR``. Copies are written to a temporary file, listed in the manifest, then
renamed into place, so a kill never leaves a half copy or a copy the manifest does not know (it
can leave a hidden ``.nsfw-guard-*.tmp`` file, never read). Every version of a copy the
manifest lists counts as this tool's, not only the last, so a kill between a new version's line
and its rename leaves the older copy replaceable. A manifest line is appended whole or not at
all (:func:`~nsfw_guard.own_files.append_line`): a full disk fails that copy alone.

Copies are made from the bytes that were decoded and checked (never by reading the file again):
clean ones byte for byte, flagged ones censored frame by frame with the check step's action, in
the same format where Pillow can write it in color (else PNG, under the same name), with the
verdict in their metadata (:mod:`nsfw_guard.verdict_metadata`).
"""

from __future__ import annotations

import functools
import io
import json
import os
import stat
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image

from .check import CheckStep
from .decode import iter_frames
from .inputs import to_image_batches
from .own_files import append_line, glued_lines, new_temporary_file
from .preprocess import seen_rgb
from .verdict_metadata import validate_verdict, verdict_save_options

__all__ = ["MANIFEST_NAME", "CopyConflict", "CopyFolder", "save_censored"]

MANIFEST_NAME = ".nsfw-guard-copies.jsonl"


class CopyConflict(ValueError):
    """A copy would replace a file this tool did not write (or two inputs one copy)."""


_LINE_START = b'{"path": '
"""How every manifest line starts (``path`` is its first key)."""


@dataclass(frozen=True)
class _Entry:
    size: int
    mtime_ns: int
    censored: bool


class CopyFolder:
    """The folder censored copies go to, and the copies this tool has written there.

    Example:
        >>> import tempfile
        >>> folder = CopyFolder(Path(tempfile.mkdtemp()) / "copies")
        >>> folder.write_bytes(Path("a/b.png"), b"not really a png")
        >>> folder.kind(folder.folder / "a/b.png"), folder.kind(folder.folder / "a/c.png")
        ('clean', None)
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            info = os.stat(self.folder)
        except FileNotFoundError:
            info = None
        except OSError as error:  # a file where a parent folder should be, ...
            raise CopyConflict(f"--censor-to {self.folder}: {error.strerror}") from None
        if info is not None and not stat.S_ISDIR(info.st_mode):
            raise CopyConflict(f"--censor-to {self.folder}: a file, not a folder")
        self.manifest = self.folder / MANIFEST_NAME
        if os.path.lexists(self.manifest) and not self.manifest.is_file():
            raise CopyConflict(f"--censor-to {self.folder}: {MANIFEST_NAME} is not a file")
        if self.manifest.is_symlink():
            raise CopyConflict(f"--censor-to {self.folder}: {MANIFEST_NAME} is a link")
        # Every version of each copy the manifest lists: (size, mtime_ns) -> censored.
        self._versions: dict[str, dict[tuple[int, int], bool]] = {}
        self._read_manifest()

    def owns(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is a copy this tool wrote in this folder and nobody changed since."""
        return self.kind(path) is not None

    def kind(self, path: str | os.PathLike) -> str | None:
        """``"censored"`` or ``"clean"`` for a copy this tool wrote at ``path`` (unchanged
        since), else ``None``."""
        relative = self._inside(path)
        if relative is None:
            return None
        try:
            info = os.stat(path, follow_symlinks=False)
        except OSError:
            return None
        censored = self._versions.get(relative, {}).get((info.st_size, info.st_mtime_ns))
        if censored is None:
            return None
        return "censored" if censored else "clean"

    def check(self, inputs: Sequence[Any]) -> None:
        """Raise :class:`CopyConflict` (one line) if a copy of ``inputs`` (each with ``path``,
        ``relative`` and ``error``) would replace a file this tool did not write, an input,
        another copy, or land outside the folder (through a link in it)."""
        originals = {os.path.realpath(item.path): item.path for item in inputs}
        targets: dict[str, Path] = {}
        for item in inputs:
            if item.error is not None:
                continue  # nothing to copy
            target = self.folder / item.relative
            real = os.path.realpath(target)
            if self._inside(real) is None:
                raise CopyConflict(
                    f"--censor-to {self.folder}: the copy of {item.path} would go to {real}, "
                    "outside the folder (through a link in it)"
                )
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
        self._write(relative, lambda path: path.write_bytes(data), censored=False)

    def write_censored(
        self, relative: Path, data: bytes, step: CheckStep, verdict: Mapping[str, Any]
    ) -> None:
        """Write the censored copy of the image in ``data`` (every frame) to ``folder/relative``,
        with ``verdict`` (:func:`~nsfw_guard.verdict_metadata.make_verdict`) in its metadata."""
        save = functools.partial(save_censored, data, step=step, verdict=verdict)
        self._write(relative, save, censored=True)

    def _write(self, relative: Path, save: Callable[[Path], Any], censored: bool) -> None:
        destination = self.folder / relative
        if self._inside(os.path.realpath(destination)) is None:
            raise CopyConflict(f"{destination} is outside {self.folder} (through a link in it)")
        destination.parent.mkdir(parents=True, exist_ok=True)
        # A new file of its own (never through a link), with a short name any name fits.
        descriptor, temporary = new_temporary_file(destination.parent, ".nsfw-guard-")
        os.close(descriptor)
        try:
            save(temporary)
            info = temporary.stat()
            # Checked again now, not only before the scan: a file may have appeared since.
            if os.path.lexists(destination) and not self.owns(destination):
                raise CopyConflict(
                    f"{destination} appeared during the scan and nsfw-guard did not write it: "
                    "its copy is not written"
                )
            self._remember(relative, _Entry(info.st_size, info.st_mtime_ns, censored))
            os.replace(temporary, destination)
        finally:
            temporary.unlink(missing_ok=True)

    def _inside(self, path: str | os.PathLike) -> str | None:
        """``path`` relative to the folder (POSIX), or ``None`` when it is not inside it."""
        try:
            relative = os.path.relpath(os.path.realpath(path), os.path.realpath(self.folder))
        except ValueError:  # another drive
            return None
        if relative == os.curdir or relative.split(os.sep)[0] == os.pardir:
            return None
        return Path(relative).as_posix()

    def _remember(self, relative: Path, entry: _Entry) -> None:
        """List ``entry`` in the manifest (a whole line or, raising :class:`OSError`, none)."""
        key = relative.as_posix()
        line = {"path": key, "size": entry.size, "mtime_ns": entry.mtime_ns}
        line["censored"] = entry.censored
        append_line(self.manifest, (json.dumps(line) + "\n").encode())
        self._add(key, entry)

    def _add(self, key: str, entry: _Entry) -> None:
        self._versions.setdefault(key, {})[(entry.size, entry.mtime_ns)] = entry.censored

    def _read_manifest(self) -> None:
        """Read every version the manifest lists. A line that cannot be read (cut short by a
        kill or a full disk) is ignored, with a warning; a whole line appended to a cut one (as
        nsfw-guard did before it ended cut lines) is read."""
        if not self.manifest.is_file():
            return
        bad = 0
        with self.manifest.open("rb") as file:
            lines = [piece for line in file for piece in glued_lines(line, _LINE_START)]
        for line in lines:  # a line cut short is one of its own: unreadable
            try:
                item = json.loads(line)
                key = str(item["path"])
                if Path(key).is_absolute() or os.pardir in Path(key).parts:
                    raise ValueError(f"{key}: not a path inside the folder")
                entry = _Entry(int(item["size"]), int(item["mtime_ns"]), item["censored"])
                if not isinstance(entry.censored, bool):
                    raise TypeError("censored: not true or false")
            except (ValueError, TypeError, KeyError):
                bad += 1
                continue
            self._add(key, entry)
        if bad:
            warnings.warn(
                f"{self.manifest}: {bad} unreadable line(s) ignored; the copies they listed "
                "count as files nsfw-guard did not write",
                stacklevel=3,
            )


def save_censored(
    data: bytes, path: Path | BinaryIO, step: CheckStep, verdict: Mapping[str, Any]
) -> str:
    """Censor every frame of the image in ``data`` with ``step``'s action and save it to
    ``path`` (a file name or a binary file), one frame in memory as floats at a time, in the
    image's own format where Pillow can write RGB in it (else PNG: an XBM, MSP or BLP image, a
    format Pillow only reads), with ``verdict`` (:func:`~nsfw_guard.verdict_metadata.make_verdict`)
    in its metadata where the format can carry it. A frame with NaN or Inf pixels is blanked,
    whatever the action; an animation's frames are censored whole (``action="regions"``: with
    its ``censor`` action), as regions would cost some 50 forwards a frame. Returns the format
    written."""
    verdict = validate_verdict(verdict)  # a bad verdict fails here, not as a format Pillow lacks
    with Image.open(io.BytesIO(data)) as original:
        fmt, duration = original.format, original.info.get("duration", 100)
        animated = getattr(original, "n_frames", 1) > 1
    # Regions cost some 50 forwards a frame: an animation's frames are censored whole.
    step = step.whole_frames() if animated else step
    frames = []
    flagged = torch.ones(1, dtype=torch.bool)
    for frame in iter_frames(data):
        batch = to_image_batches(frame)[0]
        verifiable = torch.isfinite(batch.pixels).all().view(1)  # else blanked, whatever the action
        unit = seen_rgb(batch)  # what the detector saw; then censored
        censored = step.censor(unit, flagged, verifiable, "0,1")
        array = (censored[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        frames.append(Image.fromarray(array.numpy()))
        del batch, unit, censored
    fmt = "JPEG" if fmt == "MPO" else fmt if fmt in Image.SAVE else "PNG"
    try:
        encoded = _encode(frames, fmt, verdict, duration)
    except (OSError, ValueError):  # Pillow cannot write RGB in this format (XBM: 1-bit only)
        fmt = "PNG"
        encoded = _encode(frames, fmt, verdict, duration)
    if isinstance(path, (str, os.PathLike)):
        Path(path).write_bytes(encoded)
    else:
        path.write(encoded)
    return fmt


def _encode(frames: list[Image.Image], fmt: str, verdict: dict[str, Any], duration: float) -> bytes:
    """``frames`` (RGB) as a file in ``fmt``, with ``verdict`` in its metadata where ``fmt``
    can carry it."""
    options = verdict_save_options(fmt, verdict, {"format": fmt}) or {"format": fmt}
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = 95
    first, rest = frames[0], frames[1:]
    if fmt in ("ICO", "ICNS"):  # every size, each picture censored
        options["sizes"] = [frame.size for frame in frames]
        first, options["append_images"] = frames[-1], frames[:-1]
    elif rest and fmt in ("GIF", "PNG", "WEBP", "TIFF"):
        options.update(save_all=True, append_images=rest, loop=0, duration=duration)
    buffer = io.BytesIO()
    first.save(buffer, **options)
    return buffer.getvalue()
