"""Errors a user should see as one clear line, not a traceback."""


class HandClipError(Exception):
    """Base class: the message names the problem and what to do about it."""


class ConfigError(HandClipError, ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


class DataError(HandClipError, ValueError):
    """The dataset on disk is missing, malformed or unusable; the message names the file."""


class BackboneError(HandClipError, OSError):
    """The backbone's weights or files could not be had."""
