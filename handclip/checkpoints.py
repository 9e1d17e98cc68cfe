"""Reading and writing checkpoint files safely (no pickled code, no half-written files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from handclip.errors import HandClipError


def save_atomic(payload: Any, path: str | Path) -> None:
    """torch.save to a temporary file, fsync, then rename over `path`: never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise HandClipError(
            f"could not write checkpoint {path}: {error.strerror or error}. "
            f"The previous checkpoint there, if any, is intact"
        ) from error


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True`; a damaged file is named in the error."""
    import pickle

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
