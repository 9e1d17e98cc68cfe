"""Build a component from a plain mapping with `_target_`, as `config.yaml` stores it, without Hydra.

Training builds components with `hydra.utils.instantiate`; a run directory's `config.yaml` keeps
each one's `_target_`, so tools such as export rebuild the same backbone and projection here,
in a process that has neither Hydra nor Lightning.

A `config.yaml` may come from someone else, and building a `_target_` runs its code: `build` (and
`check_targets`, for a whole config that is about to be built elsewhere) accept only HandCLIP's
own components and the libraries its `conf/` names (`ALLOWED`), checked before anything is
imported; `trust` adds modules the user vouches for (`--trust my_parts` for a policy of their own).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from handclip.errors import ConfigError

# what a config may build: HandCLIP, and the libraries conf/ builds from (optimisers, Lightning's trainer,
# callbacks and loggers); open_clip and transformers, which backbones load through
ALLOWED = (
    "handclip", "torch.optim", "lightning.pytorch.callbacks", "lightning.pytorch.loggers", "lightning.pytorch.trainer",
    "open_clip", "transformers",
)  # fmt: skip
ALIASES = ("lightning.Trainer", "lightning.pytorch.Trainer")  # the trainer, under the names Lightning exports it


def _within(name: str, namespaces: Sequence[str]) -> bool:
    return any(name == space or name.startswith(f"{space}.") for space in namespaces)


def check_target(target: Any, key: str, trust: Sequence[str] = ()) -> None:
    """Refuse a `_target_` outside HandCLIP's components and the libraries it builds from (`ALLOWED`) and the
    modules in `trust`: by its name before anything is imported, then by the module that defines what it names
    (so `handclip.io.os.system` is refused too)."""
    namespaces = (*ALLOWED, *trust)
    name = str(target)
    allowed = (
        isinstance(target, str)
        and (_within(name, namespaces) or name in ALIASES)
        and not any(part.startswith("_") for part in name.split("."))
    )
    if allowed:
        allowed = _within(getattr(locate(name), "__module__", None) or "", namespaces)
    if not allowed:
        # a name inside an allowed namespace that reaches outside it is no one's own module to trust
        root = name.split(".")[0]
        hint = "" if _within(name, namespaces) else f"; if you trust this config, allow its module: --trust {root}"
        raise ConfigError(
            f"{key}._target_={name} is refused: building it would run code from outside HandCLIP and the libraries "
            f"it builds from ({', '.join(ALLOWED)}){hint}"
        )


def check_targets(tree: Any, key: str, trust: Sequence[str] = ()) -> None:
    """`check_target` on every `_target_` in a nested config (mappings, lists), before any of it is built."""
    if isinstance(tree, Mapping):
        if "_target_" in tree:
            check_target(tree["_target_"], key, trust)
        for name, value in tree.items():
            check_targets(value, f"{key}.{name}" if key else str(name), trust)
    elif isinstance(tree, (list, tuple)):
        for number, value in enumerate(tree):
            check_targets(value, f"{key}.{number}" if key else str(number), trust)


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


def build(spec: Mapping, key: str, trust: Sequence[str] = ()) -> Any:
    """Call `spec['_target_']` with the other (non-underscore) entries of `spec` as keyword arguments; a target
    outside HandCLIP, the libraries it builds from and the modules in `trust` is refused (`check_target`)."""
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ConfigError(f"{key} must be a mapping with a _target_ (see conf/{key}/)")
    check_target(spec["_target_"], key, trust)
    kwargs = {k: v for k, v in spec.items() if not (k.startswith("_") and k.endswith("_"))}
    try:
        return locate(spec["_target_"])(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{key}: {error}") from None
