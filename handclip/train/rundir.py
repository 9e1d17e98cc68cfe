"""The run directory: which checkpoint to resume, refusing to clobber, one process at a time."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from handclip.errors import HandClipError

CHECKPOINTS = "checkpoints"
LOCK = ".lock"


class RunDirError(HandClipError):
    """The run directory cannot be used as asked."""


def _load_or_warn(path: Path) -> dict | None:
    from handclip.io import load_checkpoint_file

    try:
        return load_checkpoint_file(path)
    except HandClipError as error:
        warnings.warn(str(error), stacklevel=3)
        return None


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse a run directory, or a checkpoints/ inside it, that exists but is not a directory."""
    run_dir = Path(run_dir)
    for path in (run_dir, run_dir / CHECKPOINTS):
        if path.exists() and not path.is_dir():
            raise RunDirError(
                f"{path} is a file, where HandCLIP keeps a run's {'checkpoints' if path != run_dir else 'directory'}; "
                "move it away or choose another run_name"
            )
    for parent in run_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise RunDirError(f"{parent} is a file, not a directory: set paths.runs to a directory")
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK | os.X_OK):  # its files, the logger's included
        raise RunDirError(f"{run_dir} is not writable by this user: point paths.runs at a folder you can write")


def resolve_resume(
    run_dir: str | Path, ckpt_path: str | None, overwrite: bool = False
) -> tuple[str | None, dict | None]:
    """The checkpoint file to resume from and its contents, or (None, None) for a fresh start.

    The checkpoint is loaded here once, so the caller can check it without reading it again.

    `ckpt_path=last` means this run directory's latest checkpoint (found from any process,
    since the directory is stable); a damaged `last.ckpt` falls back to `best.ckpt`.
    Without `ckpt_path`, a directory that already holds checkpoints is refused unless
    `overwrite` is set, in which case its checkpoints are removed.
    """
    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINTS
    existing = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if not ckpt_path:
        if existing and not overwrite:
            raise RunDirError(
                f"run directory {run_dir} already holds checkpoints ({', '.join(p.name for p in existing)}). "
                "Resume it with ckpt_path=last, start it over with overwrite=true, or name a new run "
                "with run_name=NAME"
            )
        if existing:
            shutil.rmtree(folder)
            for name in ("metrics.json", "baseline.json"):
                (run_dir / name).unlink(missing_ok=True)
        return None, None
    if ckpt_path != "last":
        from handclip.io import load_checkpoint_file

        path = Path(ckpt_path)
        if not path.is_file():
            raise RunDirError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        return str(path), load_checkpoint_file(path)
    last, best = folder / "last.ckpt", folder / "best.ckpt"
    if not existing:
        raise RunDirError(
            f"ckpt_path=last: run directory {run_dir} has no checkpoint to resume. Start the run "
            "without ckpt_path, or give the run's name with run_name=NAME"
        )
    for candidate in (last, best):
        checkpoint = _load_or_warn(candidate) if candidate.is_file() else None
        if checkpoint is not None:
            if candidate == best:
                warnings.warn(f"{last} is damaged or missing: resuming from {best} instead", stacklevel=2)
            return str(candidate), checkpoint
    raise RunDirError(f"no loadable checkpoint in {folder}: last.ckpt and best.ckpt are damaged")


def finished_run(run_dir: str | Path, then: str = "it runs again") -> tuple[dict, dict] | None:
    """(config.yaml, metrics) of a run (a sweep point, a stage) that finished, or None: not finished, or a record
    of it is damaged, which is said (with `then`, what happens instead): its results are never read in part."""
    from handclip.io import DamagedFileError, read_record

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        return None
    try:
        saved = read_record(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
        metrics = read_record(run_dir / "metrics.json").get("metrics")
        if not isinstance(metrics, dict):
            raise DamagedFileError(f"{run_dir / 'metrics.json'} is damaged: it has no metrics")
    except DamagedFileError as error:
        print(f"{error}: {then}", flush=True)
        return None
    return saved, metrics


_existing: Path | None = None  # the nearest folder above the run (or sweep) directory that existed at the start


def record_existing_ancestor(target: str | Path) -> Path:
    """Remember the nearest existing folder at or above `target`, before Hydra makes `target`."""
    global _existing
    path = Path(target).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    _existing = path
    return path


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # the library without Hydra
    _HydraCallback = object


class RecordExistingDirs(_HydraCallback):
    """Hydra callback: which folders existed before Hydra made the run directory, so that a refused
    command takes back only the ones it made (a folder's ctime changes when something is added to it,
    so it cannot tell a user's empty folder from ours)."""

    def on_run_start(self, config, **kwargs) -> None:
        record_existing_ancestor(_resolved(config, "run"))

    def on_multirun_start(self, config, **kwargs) -> None:
        record_existing_ancestor(_resolved(config, "sweep"))


def _resolved(config, mode: str) -> str:
    # hydra.run.dir reads ${hydra:job.override_dirname}, which needs the Hydra config set; Hydra sets
    # the same one itself just after this callback
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(config)
    return str(config.hydra[mode].dir)


def remove_new_empty_dirs(path: str | Path, since: float) -> None:
    """Remove `path` and its parents while each is empty, was made after `since`, and lies below the
    folder that `record_existing_ancestor` found.

    A refused command takes back the directories it made (Hydra makes the run directory before
    the configuration can be checked) and never touches one that existed or holds anything.
    """
    path = Path(path).absolute()
    if _existing is not None and _existing != path and _existing not in path.parents:
        return  # not below what was recorded: nothing here is known to be ours
    lock = path / LOCK
    try:
        if lock.is_file() and lock.stat().st_ctime >= since and lock.read_text().strip() == str(os.getpid()):
            lock.unlink()  # this process's own lock of a run it was refused to start
    except OSError:
        pass
    while path != path.parent and path != _existing:
        try:
            if path.stat().st_ctime < since or any(path.iterdir()):
                return
            path.rmdir()
        except OSError:
            return
        path = path.parent


class RunLock:
    """An exclusive lock on a run directory; a second process is refused, not interleaved. The lock file
    (`.lock`, holding the owner's pid) stays in the directory; the lock goes with the process that holds it."""

    def __init__(self, run_dir: str | Path):
        from filelock import FileLock

        self.path = Path(run_dir) / LOCK
        self.lock = FileLock(str(self.path))

    def __enter__(self) -> RunLock:
        from filelock import Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = self.path.read_text().strip() if self.path.is_file() else ""  # read before trying: it stays
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise RunDirError(
                f"run directory {self.path.parent} is in use by another process (pid {owner or 'unknown'}); "
                "wait for it to finish or choose another run_name"
            ) from None
        try:
            self.path.write_text(str(os.getpid()))  # through another handle: the lock is the FileLock's
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()
