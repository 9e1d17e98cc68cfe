"""Build a component from a plain mapping with `_target_`, as `config.yaml` stores it, without Hydra.

Training builds components with `hydra.utils.instantiate`; a run directory's `config.yaml` keeps
each one's `_target_`, so tools such as export rebuild the same backbone and projection here,
in a process that has neither Hydra nor Lightning.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from handclip.errors import ConfigError


def locate(target: str) -> Any:
    """The object a dotted `_target_` names (`package.module.Name` or `package.module.Class.method`)."""
    parts = str(target).split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attribute in parts[cut:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"_target_={target!r}: no such importable object")


def check_keywords(key: str, made: Any) -> None:
    """For a partial (`_partial_: true`), refuse now the keywords its function does not take."""
    import difflib
    import functools
    import inspect

    if not isinstance(made, functools.partial):
        return
    try:
        parameters = inspect.signature(made.func).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    for name in made.keywords:
        if name not in parameters:
            near = difflib.get_close_matches(name, list(parameters), n=1)
            raise ConfigError(
                f"{key}.{name} is not a setting of {getattr(made.func, '__qualname__', made.func)}"
                + (f" (did you mean {key}.{near[0]}?)" if near else "")
                + f"; its settings are {', '.join(p for p in parameters if p != 'self')}"
            )


def build(spec: Mapping, key: str) -> Any:
    """Call `spec['_target_']` with the other (non-underscore) entries of `spec` as keyword arguments."""
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ConfigError(f"{key} must be a mapping with a _target_ (see conf/{key}/)")
    kwargs = {k: v for k, v in spec.items() if not (k.startswith("_") and k.endswith("_"))}
    try:
        return locate(spec["_target_"])(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{key}: {error}") from None
