"""A run in stages: each stage is the run's configuration plus its own settings, run in order.

    stages:
      prompts:                   # a stage: config-group choices and settings, as in an experiment file
        loss: clipreid_prompts
        freeze: locked
        optim: {lr: 3.5e-3}
        trainer: {max_epochs: 20}
      image: {}                  # the experiment's own settings

A stage's settings become Hydra overrides placed after the command line's (`loss=clipreid_prompts`,
`optim.lr=0.0035`), so each is changed like any setting: `stages.prompts.trainer.max_epochs=40`.
Stage i runs in `<run dir>/<i>-<name>` as an ordinary run (its own checkpoints, metrics and logs)
and reads the folder of the stage before it as `${stage.previous}`. Every stage's configuration
is composed and checked before the first one starts. With `ckpt_path=last` the same command goes
on where it stopped: finished stages (same settings) are kept, a stopped one resumes from its last
checkpoint, the rest start. The run directory's `metrics.json` is the last stage's, with each
stage's folder and times, and the times summed over stages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from handclip.errors import ConfigError, HandClipError
from handclip.io import write_json_atomic, write_text_atomic

NAME = re.compile(r"[A-Za-z0-9_]+")


def stage_names(stages: Any) -> list[str]:
    """The stages' names in order, checked: a mapping of names to mappings of settings."""
    if not isinstance(stages, Mapping) or not stages:
        raise ConfigError(f"stages={stages!r} must map stage names to their settings, e.g. {{image: {{}}}}")
    for name, spec in stages.items():
        if not NAME.fullmatch(str(name)):
            raise ConfigError(f"stages.{name}: a stage name is letters, digits and _ only")
        if spec is not None and not isinstance(spec, Mapping):
            raise ConfigError(
                f"stages.{name}={spec!r} must be a mapping of settings, such as {{trainer: {{max_epochs: 5}}}}"
            )
        inner = [key for key in (spec or {}) if key in ("stages", "stage")]
        if inner:
            raise ConfigError(f"stages.{name}.{inner[0]} cannot be set by a stage (stages run one after another)")
    return [str(name) for name in stages]


def _value(value: Any) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))  # a quoted string; ${...} interpolations inside stay interpolations


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        for key, inner in value.items():
            yield from _flatten(f"{prefix}.{key}", inner)
    else:
        yield prefix, value


def stage_overrides(spec: Mapping | None, groups: set[str]) -> list[str]:
    """Hydra overrides for a stage's settings: `group: option` picks a config group's option, everything
    else sets a value (`optim: {lr: 1e-3}` -> `optim.lr=0.001`)."""
    overrides = []
    for key, value in (spec or {}).items():
        if key in groups and isinstance(value, str):
            overrides.append(f"{key}={value}")
        else:
            overrides += [f"{k}={_value(v)}" for k, v in _flatten(str(key), value)]
    return overrides


def stage_dirs(run_dir: Path, names: list[str]) -> list[Path]:
    return [run_dir / f"{index}-{name}" for index, name in enumerate(names, 1)]


def run_stages(plain: Mapping, run_dir: Path, compose: Callable[[str, str | None], dict]) -> dict:
    """Run each stage of `plain["stages"]`; `compose(name, previous_dir)` gives a stage's resolved
    configuration. Returns the last stage's metrics, with the stages' times summed."""
    from handclip.train.config import check_config
    from handclip.train.run import run_training
    from handclip.train.rundir import RunLock, check_run_dir
    from handclip.train.sweep import changed_settings

    names = stage_names(plain["stages"])
    resume = plain.get("ckpt_path")
    if resume not in (None, "last"):
        raise ConfigError(
            f"ckpt_path={resume}: a run in stages resumes with ckpt_path=last (each stage where it stopped)"
        )
    if plain.get("init_from"):
        raise ConfigError("init_from applies to one stage: give it in that stage's overrides (stages.NAME)")
    folders = stage_dirs(run_dir, names)
    configs = []
    for name, previous in zip(names, [None, *folders[:-1]], strict=True):
        try:
            cfg = compose(name, None if previous is None else str(previous))
        except Exception as error:  # noqa: BLE001 - Hydra's composition errors, one line naming the stage
            raise ConfigError(f"stages.{name}: {str(error).splitlines()[0]}") from None
        try:
            check_config(cfg)  # every stage before the first starts
        except ConfigError as error:
            raise ConfigError(f"stages.{name}: {error}") from None
        configs.append(cfg)

    check_run_dir(run_dir)
    with RunLock(run_dir):
        import yaml

        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(dict(plain), sort_keys=False))
        summary: dict[str, dict] = {}
        for name, folder, cfg in zip(names, folders, configs, strict=True):
            finished = folder / "metrics.json"
            if finished.is_file() and not cfg.get("overwrite"):
                saved = folder / "config.yaml"
                changed = changed_settings((yaml.safe_load(saved.read_text()) if saved.is_file() else None) or {}, cfg)
                if changed:
                    key, before, now = changed[0]
                    raise HandClipError(
                        f"stage {name} in {folder} finished earlier with other settings ({key}: {before} -> {now}); "
                        "run it anew with overwrite=true, or name a new run with run_name=NAME"
                    )
                print(f"stage {name}: finished earlier, kept ({folder})", flush=True)
                metrics = json.loads(finished.read_text())["metrics"]
            else:
                started = any((folder / "checkpoints").glob("*.ckpt"))
                cfg = {**cfg, "ckpt_path": "last" if started and resume == "last" else None}
                print(f"stage {name} ({folder.name}): " + ("resuming" if cfg["ckpt_path"] else "starting"), flush=True)
                metrics = run_training(cfg, folder)
            summary[name] = {"dir": str(folder), **{k: metrics.get(k) for k in ("train_time_s", "wall_time_s")}}
        payload = json.loads((folders[-1] / "metrics.json").read_text())
        final = payload["metrics"]
        for key in ("train_time_s", "wall_time_s"):
            final[f"{names[-1]}/{key}"] = final.get(key)
            final[key] = sum(s[key] or 0.0 for s in summary.values())
        payload["stages"] = summary
        write_json_atomic(run_dir / "metrics.json", payload)
        return final
