"""Files written so that a crash never leaves half of one behind, and checkpoints read safely.

Every file HandCLIP writes goes through `atomic_write`: a temporary file beside the target,
flushed and synced, then renamed over it. A reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from handclip.errors import HandClipError, first_line


def temporary_path(path: str | Path) -> Path:
    """The name this process writes `path` under before putting it in place: `NAME.tmpPID` beside it
    (what `remove_dead_leftovers` recognises once the process is gone)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write a file or fill a folder at; on success it takes `path`'s
    place (a folder already there is moved aside first and removed after), on any error it is removed
    and `path` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    _remove(tmp)  # a leftover of an earlier process with this id
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            retired = path.with_name(f"{tmp.name}-old")
            os.replace(path, retired)
            os.replace(tmp, path)
            _remove(retired)
        else:
            os.replace(tmp, path)
    except OSError as error:
        _remove(tmp)
        if error.filename is None:  # a write through a handle: say which file could not be written
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", sync: bool = True) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it replaces `path`.

    On any error the temporary file is removed and `path` keeps its previous content. `sync=False`
    skips the fsync, for many small files that a later run can rebuild (the image cache).
    """
    text = "b" not in mode
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({"encoding": "utf-8", "newline": ""} if text else {})) as handle:
            yield handle
            handle.flush()
            if sync:
                os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path) as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write `payload` as indented JSON to `path` atomically (numbers that are tensors become floats)."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=float))


class DamagedFileError(HandClipError):
    """A record HandCLIP wrote (config.yaml, metrics.json, ...) that can no longer be read as one."""


def read_record(path: str | Path, kind: type = dict) -> Any:
    """The JSON (or, for `.yaml`, YAML) record in `path`, a `kind` (a mapping unless said otherwise). One cut
    short, edited into something else or unreadable is a DamagedFileError naming the file: a caller that can make
    the record again does so, any other refuses in one line, and none goes on with part of it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        value = _parse_yaml(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON or not YAML
        raise DamagedFileError(f"{path} is damaged or unreadable ({first_line(error)})") from None
    if not isinstance(value, kind):
        held = "nothing" if value is None else f"a {type(value).__name__}"
        raise DamagedFileError(f"{path} is damaged: it holds {held}, not the "
                               f"{'mapping' if kind is dict else kind.__name__} HandCLIP writes there")  # fmt: skip
    return value


def _parse_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(first_line(error)) from None


def save_atomic(payload: Any, path: str | Path) -> None:
    """`torch.save` to `path` atomically: a checkpoint is never half written over a good one."""
    import torch

    try:
        with atomic_write(path, "wb") as handle:
            torch.save(payload, handle)
    except (OSError, RuntimeError) as error:  # torch's writer turns a failed write into a RuntimeError of its own
        reason = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
        raise HandClipError(
            f"could not write checkpoint {path}: {reason} (is the disk full? {_room(Path(path).parent)}). The previous "
            "checkpoint there, if any, is intact; free space and resume with ckpt_path=last"
        ) from None


def _room(folder: Path) -> str:
    """The free space under `folder` and this process's file size limit, in words."""
    import resource

    free = shutil.disk_usage(folder).free if folder.exists() else None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    words = [f"{free / 2**20:,.0f} MB free there" if free is not None else "the folder is gone"]
    if limit != resource.RLIM_INFINITY:
        words.append(f"files are limited to {limit / 2**20:,.1f} MB (ulimit -f)")
    return ", ".join(words)


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
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):  # the lock file stays, as the caches' own locks do
        yield


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_leftovers(folder: Path, name: str = "*") -> None:
    """Remove `folder/NAME.tmpPID*` left by builder processes that were killed (call it under the build lock)."""
    for leftover in Path(folder).glob(f"{name}.tmp*"):
        pid = leftover.name.rsplit(".tmp", 1)[-1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(leftover)
