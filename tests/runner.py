"""`python train.py ...` for tests: in this process (the default), or in a subprocess where the process itself is
the subject (signals, kills, exit status as the shell sees it, several processes).

In this process, `train.main()` runs under Hydra exactly as from the command line (sys.argv, Hydra's job and
callbacks, its error handling), with its environment, working directory and standard streams swapped in for
the call and restored after; the result looks like `subprocess.run`'s.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_ENTRY = None


def _entry():
    """The repository's train.py as the module `train` (imported once; Hydra finds conf/ beside it)."""
    global _ENTRY
    if _ENTRY is None:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        _ENTRY = importlib.import_module("train")
    return _ENTRY


def _show_on_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_in_process(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Run `command` (`[python, -u, train.py, args...]`) in this process; (returncode, stdout, stderr) as a
    subprocess would give them."""
    from hydra.core.global_hydra import GlobalHydra

    from handclip.train import cli

    script = command.index(str(ROOT / "train.py"))
    argv = ["train.py", *command[script + 1 :]]
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    root_logger = logging.getLogger()
    saved_handlers, saved_level = list(root_logger.handlers), root_logger.level
    out, err = io.StringIO(), io.StringIO()
    code = 0
    os.environ.clear()
    os.environ.update(env)
    added = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[:0] = added  # what a new process would import from
    sys.argv = argv
    os.chdir(cwd)
    cli.STARTED = time.time()  # what a new process would have read at its start
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # warnings as a new process shows them (pytest records them and its settings ignore some)
            warnings.resetwarnings()
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.showwarning = _show_on_stderr
            try:
                _entry().main()
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            except BaseException:  # noqa: BLE001 - what the interpreter would print before exiting with 1
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        for path in added:
            sys.path.remove(path)
        os.chdir(saved_cwd)
        GlobalHydra.instance().clear()
        root_logger.handlers[:] = saved_handlers  # Hydra's job logging points at this call's streams
        root_logger.setLevel(saved_level)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
