"""Where the tools write: an output path whose place cannot be written is refused before any work."""

from __future__ import annotations

import tempfile
from pathlib import Path

from handclip.errors import HandClipError


def check_writable(path: str | Path, what: str) -> None:
    """Refuse `path` (a file or folder a tool is about to make, or an existing folder it writes into) when a
    file stands where a folder must be, or the folder it would be made in, or it itself, cannot be written."""
    path = Path(path).absolute()
    nearest = next(folder for folder in path.parents if folder.exists())
    if not nearest.is_dir():
        raise HandClipError(f"{what} {path}: {nearest} is a file, so no folder can be made there; give another path")
    for folder in (nearest, path) if path.is_dir() else (nearest,):
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise HandClipError(
                f"{what} {path}: {folder} cannot be written ({error.strerror or error}); give a folder you can write to"
            ) from None
