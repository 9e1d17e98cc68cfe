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
# settings of the whole run, which one stage cannot change
WHOLE_RUN = ("ckpt_path", "dry_run", "overwrite", "run_name", "name", "paths")


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
        whole = [key for key in (spec or {}) if key in WHOLE_RUN]
        if whole:
            raise ConfigError(
                f"stages.{name}.{whole[0]} cannot be set by one stage: it applies to the whole run "
                f"(give {whole[0]}=... on the command line)"
            )
        extra = (spec or {}).get("overrides", [])
        if not isinstance(extra, (list, tuple)) or not all(isinstance(o, str) and "=" in o for o in extra):
            raise ConfigError(
                f"stages.{name}.overrides={extra!r} must be a list of Hydra overrides, "
                "e.g. [loss.terms.prompts.context_tokens=8]"
            )
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
        if key == "overrides":  # raw Hydra overrides, after the rest: settings inside a group the stage picks
            continue
        if key in groups and isinstance(value, str):
            overrides.append(f"{key}={value}")
        else:
            overrides += [f"{k}={_value(v)}" for k, v in _flatten(str(key), value)]
    return overrides + list((spec or {}).get("overrides", []))


def stage_dirs(run_dir: Path, names: list[str]) -> list[Path]:
    return [run_dir / f"{index}-{name}" for index, name in enumerate(names, 1)]


def _portable(config: Mapping, run_dir: Path | None) -> dict:
    """`config` with its run directory written as `<run>` and the stage bookkeeping left out, so that a run
    folder moved elsewhere still compares equal to itself."""

    def walk(value):
        if isinstance(value, Mapping):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and run_dir is not None and value.startswith(str(run_dir)):
            return "<run>" + value[len(str(run_dir)) :]
        return value

    return {k: walk(v) for k, v in config.items() if k not in ("stage", "stages")}


def _saved_run_dir(saved: Mapping) -> Path | None:
    """The run directory a stage's saved configuration was written in (its previous stage's parent)."""
    previous = (saved.get("stage") or {}).get("previous")
    return Path(previous).parent if previous else None


def plan_stages(names: list[str], folders: list[Path], configs: list[dict], resume: str | None) -> list[str]:
    """What happens to each stage: `keep` (finished earlier with these settings), `resume` (stopped, and
    ckpt_path=last) or `start`. Once a stage runs, every later one runs anew (its inputs change). Raises,
    writing nothing, when a finished stage's settings differ."""
    from handclip.train.rundir import finished_run
    from handclip.train.sweep import changed_settings

    plan, rerun = [], False
    for name, folder, cfg in zip(names, folders, configs, strict=True):
        result = finished_run(folder, "the stage runs again")  # None also when its records are damaged
        finished = result is not None
        if finished and not cfg.get("overwrite") and not rerun:
            saved = result[0]
            changed = changed_settings(_portable(saved, _saved_run_dir(saved)), _portable(cfg, folder.parent))
            if changed:
                key, before, now = changed[0]
                raise HandClipError(
                    f"stage {name} in {folder} finished earlier with other settings ({key}: {before} -> {now}); "
                    "run it anew with overwrite=true, or name a new run with run_name=NAME"
                )
            if resume != "last":
                raise HandClipError(
                    f"stage {name} in {folder} finished earlier: continue the run with ckpt_path=last (finished "
                    "stages are kept), start it over with overwrite=true, or name a new run with run_name=NAME"
                )
            plan.append("keep")
            continue
        started = any((folder / "checkpoints").glob("*.ckpt"))
        if started and resume != "last" and not cfg.get("overwrite") and not rerun:
            raise HandClipError(
                f"stage {name} in {folder} has checkpoints: continue the run with ckpt_path=last, start it over "
                "with overwrite=true, or name a new run with run_name=NAME"
            )
        plan.append("resume" if started and resume == "last" and not rerun and not finished else "start")
        rerun = True
    return plan


def run_stages(plain: Mapping, run_dir: Path, compose: Callable[[str, str | None], dict]) -> dict:
    """Run each stage of `plain["stages"]`; `compose(name, previous_dir)` gives a stage's resolved
    configuration. Returns the last stage's metrics, with the stages' times summed. Every stage is
    composed and checked, and what happens to each decided, before anything is written."""
    import yaml

    from handclip.train.config import check_config
    from handclip.train.run import run_training
    from handclip.train.rundir import RunLock, check_run_dir, finished_run

    names = stage_names(plain["stages"])
    resume = plain.get("ckpt_path")
    if resume not in (None, "last"):
        raise ConfigError(
            f"ckpt_path={resume}: a run in stages resumes with ckpt_path=last (each stage where it stopped)"
        )
    if plain.get("init_from"):
        raise ConfigError("init_from applies to one stage: give it in that stage's settings (stages.NAME.init_from)")
    folders = stage_dirs(run_dir, names)
    previous = [None, *folders[:-1]]
    configs = [compose_stage(compose, name, before) for name, before in zip(names, previous, strict=True)]
    check_run_dir(run_dir)
    with RunLock(run_dir):
        plan = plan_stages(names, folders, configs, resume)
        asked = []  # each stage as asked for, what its config.yaml records
        for index, (name, action) in enumerate(zip(names, plan, strict=True)):
            cfg = configs[index]
            # a stage that goes on from its checkpoint already holds its init_from weights; one that runs
            # after an earlier stage ran again starts over (its inputs changed)
            cfg["ckpt_path"] = "last" if action == "resume" else None
            asked.append(dict(cfg))
            if action == "resume":
                cfg["init_from"] = None
            if action == "start" and index > plan.index("start"):
                cfg["overwrite"] = True
            try:
                check_config(cfg)  # every stage before the first starts
            except ConfigError as error:
                raise ConfigError(f"stages.{name}: {error}") from None
        if any(action != "keep" for action in plan):  # the run's results so far describe the stages as they were
            (run_dir / "metrics.json").unlink(missing_ok=True)
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(dict(plain), sort_keys=False))
        summary: dict[str, dict] = {}
        for name, folder, cfg, action, original in zip(names, folders, configs, plan, asked, strict=True):
            if action == "keep":
                print(f"stage {name}: finished earlier, kept (same settings; {folder})", flush=True)
                metrics = finished_run(folder)[1]
            else:
                print(f"stage {name} ({folder.name}): " + ("resuming" if action == "resume" else "starting"),
                      flush=True)  # fmt: skip
                metrics = run_training(cfg, folder, record_as=original)
            summary[name] = {"dir": str(folder), **{k: metrics.get(k) for k in ("train_time_s", "wall_time_s")}}
        payload = json.loads((folders[-1] / "metrics.json").read_text())
        final = payload["metrics"]
        for key in ("train_time_s", "wall_time_s"):
            final[f"{names[-1]}/{key}"] = final.get(key)
            final[key] = sum(s[key] or 0.0 for s in summary.values())
        payload["stages"] = summary
        write_json_atomic(run_dir / "metrics.json", payload)
        return final


def stage_composer(cfg, hydra_cfg, plain: dict) -> Callable[[str, str | None], dict]:
    """compose(name, previous) for `run_stages`: this run's configuration (its command-line overrides) with the
    stage's settings after them, the stage's name and the previous stage's folder filled in, resolved."""
    from hydra import compose
    from omegaconf import OmegaConf

    task = list(hydra_cfg.overrides.task)
    groups = config_groups(hydra_cfg)
    specs = OmegaConf.to_container(cfg.stages, resolve=False)  # ${stage.previous} is resolved per stage

    def composed(name: str, previous: str | None) -> dict:
        stage = compose(config_name="train", overrides=[*task, *stage_overrides(specs[name], groups)])
        stage.stages, stage.stage.name, stage.stage.previous = None, name, previous
        resolved = OmegaConf.to_container(stage, resolve=True)
        for key in ("sweep", "logger"):  # what a sweep point adds (its folder, the logger's group)
            if key in plain:
                resolved[key] = plain[key]
        return resolved

    return composed


def config_groups(hydra_cfg) -> set[str]:
    """The config groups (folders) of every folder Hydra composes from: conf/ and any `hydra.searchpath`."""
    groups = set()
    for source in hydra_cfg.runtime.config_sources:
        if str(source.path).startswith("file://"):
            folder = Path(str(source.path).removeprefix("file://"))
            groups |= {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
    return groups


def compose_stage(compose: Callable[[str, str | None], dict], name: str, previous: Path | None) -> dict:
    """A stage's resolved configuration; Hydra's composition errors become one line naming the stage."""
    try:
        return compose(name, None if previous is None else str(previous))
    except Exception as error:  # noqa: BLE001 - re-raised as a configuration error
        raise ConfigError(f"stages.{name}: {_composition_error(error)}") from None


def _composition_error(error: Exception) -> str:
    """Hydra's composition error on one line: what is wrong, and the options it lists (not its search path)."""
    text = str(error).split("Config search path:")[0]
    head, _, options = text.partition("Available options in")
    head = " ".join(head.split())
    if not options:
        return head or repr(error)
    group, _, names = options.partition(":")
    return f"{head}; available options in{group}: {', '.join(names.split())}"
