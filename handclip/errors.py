"""Errors a user should see as one clear line, not a traceback."""

import sys
from typing import NoReturn


class HandClipError(Exception):
    """Base class: the message names the problem and what to do about it."""


def first_line(error: BaseException) -> str:
    """An error's first line of text, or its type's name when it has none (for one-line messages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def exit_with(error: BaseException) -> NoReturn:
    """A command's refusal: one `error:` line on stderr and exit status 2 (as train.py does)."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


class ConfigError(HandClipError, ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


class DataError(HandClipError, ValueError):
    """The dataset on disk is missing, malformed or unusable; the message names the file."""


class BackboneError(HandClipError, OSError):
    """The backbone's weights or files could not be had."""


class NonFiniteError(HandClipError):
    """A loss, a weight or a feature became NaN or infinite; the message says where (step, epoch, parameter)."""
