"""Files written so that a crash never leaves half of one behind, and checkpoints read safely.

Every file HandCLIP writes goes through `atomic_write`: a temporary file beside the target,
flushed and synced, then renamed over it. A reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from handclip.errors import HandClipError


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", sync: bool = True) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it replaces `path`.

    On any error the temporary file is removed and `path` keeps its previous content. `sync=False`
    skips the fsync, for many small files that a later run can rebuild (the image cache).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = "b" not in mode
    try:
        with open(tmp, mode, **({"encoding": "utf-8", "newline": ""} if text else {})) as handle:
            yield handle
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path) as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write `payload` as indented JSON to `path` atomically (numbers that are tensors become floats)."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=float))


def save_atomic(payload: Any, path: str | Path) -> None:
    """`torch.save` to `path` atomically: a checkpoint is never half written over a good one."""
    import torch

    try:
        with atomic_write(path, "wb") as handle:
            torch.save(payload, handle)
    except OSError as error:
        raise HandClipError(
            f"could not write checkpoint {path}: {error.strerror or error}. "
            f"The previous checkpoint there, if any, is intact"
        ) from error


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True`; a damaged file is named in the error."""
    import pickle
    import zipfile

    import torch

    # PyTorch writes zip archives (older versions, a bare pickle stream, which starts with 0x80)
    if Path(path).is_file() and not zipfile.is_zipfile(path) and Path(path).open("rb").read(1) != b"\x80":
        raise HandClipError(
            f"checkpoint {path} is damaged or not a checkpoint (not a complete zip archive, as PyTorch writes)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        raise HandClipError(
            f"checkpoint {path} was refused: it holds pickled objects other than tensors and plain data, "
            "which could run code when loaded. Only load checkpoints written by HandCLIP or Lightning"
        ) from None
    except Exception as error:  # noqa: BLE001 - any other failure means a damaged file
        reason = str(error).split(". ")[0].strip()
        raise HandClipError(
            f"checkpoint {path} is damaged or not a checkpoint ({type(error).__name__}: {reason})"
        ) from None


@contextmanager
def waiting_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing), waiting for whoever holds it.

    For things built once on first use: a second process waits here, then finds the thing built.
    The lock goes with the process, so a killed builder never leaves it held.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
