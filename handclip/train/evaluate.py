"""Score a model without training it: an export, a checkpoint, a run folder, a soup or a hub model.

    python -m handclip.evaluate MODEL [KEY=VALUE ...] [--out DIR] [--weights ema|raw] [--greedy] [--trust MODULE]
    python -m handclip.evaluate backbone=NAME [KEY=VALUE ...] [--out DIR]

MODEL is what was trained or downloaded, recognised by what it holds:

    run          a run folder (runs/NAME: config.yaml and checkpoints/; best.ckpt, else last.ckpt)
    checkpoint   a checkpoint file of a run (runs/NAME/checkpoints/last.ckpt; its run's config.yaml is read)
    export       a folder `python -m handclip.export` wrote (a Hugging Face or an open_clip model)
    soup         a soup export (`python -m handclip.export --soup`), or a sweep folder (runs/sweeps/NAME),
                 whose finished points are averaged here as `--soup` would (`--greedy` too)
    hub          a folder `CLIPModel.save_pretrained` wrote (with tokenizer and image processor), a hub id
                 (openai/clip-vit-base-patch32), or, with no MODEL, a backbone config: backbone=vit_b16

The data and the evaluation settings are train.py's config groups, given as it takes them: `data=captions
data.source.root=DIR`, `eval.flip_tta=true`, `data.runs=10` (`experiment=NAME` takes an experiment's data
and evaluation settings). A run, a checkpoint and a sweep start from the run's own settings (its config.yaml:
the same data, split and protocol, so the numbers compare with its metrics.json), an export or a hub model from
conf/'s defaults (data=hands11k, eval=default); `GROUP=NAME` replaces a section with conf/GROUP/NAME.yaml and
`key=value` sets one value. Only data.*, eval.* and paths.* may be set (and backbone=, with no MODEL).
The model is scored once, by the run's own evaluator (validation and the test runs, text retrieval where the
data has captions); eval.baseline, eval.wise_ft, eval.select and eval.curve concern training and are not used.

The output folder (`--out DIR`, default `${paths.runs}/evaluate/<model>-<data>`) gets what a run's end writes:
metrics.json (its `evaluated` field says what was loaded: kind, path or id, weights, and the data protocol),
cmc.png, embeddings.png and ranked.png (ranked_text.png with captions), and the tables are printed, each model
labelled as what was loaded. It is written in a temporary folder and moved into place when complete; a previous
evaluation there is replaced whole; a run, the model's own folder and a folder of other files are refused
(`--overwrite` writes the files into the last). Every refusal is one `error:` line, exit status 2, before the
weights load and with nothing written.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handclip.errors import ConfigError, HandClipError, exit_with
from handclip.tools.export import WEIGHTS
from handclip.tools.outputs import check_writable

KINDS = ("run", "checkpoint", "export", "soup", "hub")
# the sections an evaluation reads from a configuration; `backbone` only where it names the model
SECTIONS = ("data", "eval", "paths")
CONF = Path(__file__).resolve().parents[2] / "conf"  # train.py's config groups, beside the package
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    """What MODEL is, found from its files alone (no weights read)."""

    kind: str  # one of KINDS
    given: str  # as the user gave it: a path, a hub id, or backbone=NAME
    name: str  # short, for labels and the default output folder
    config: dict | None = None  # a run's (or a sweep's first point's) config.yaml: its data and eval settings
    spec: Any = None  # export and hub: the BackboneSpec that loads it
    folders: list[Path] = field(default_factory=list)  # the model's own folders: never written into
    facts: dict = field(default_factory=dict)  # recorded in metrics.json: checkpoint, soup points, ...

    @property
    def label(self) -> str:
        """How tables, figures and metrics.json name the model: what was loaded."""
        return f"{self.kind} {self.given}"


def _run_config(run_dir: Path, given: str) -> dict:
    from handclip.io import read_record

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise HandClipError(f"{given}: no config.yaml in {run_dir}: a checkpoint is evaluated beside its run's "
                            "config.yaml (runs/NAME/checkpoints/*.ckpt)")  # fmt: skip
    return read_record(path)


def find_source(model: str | None, backbone: Mapping | None) -> Source:
    """What `model` is (or, with no model, the backbone config `backbone`): a `Source`, or a HandClipError in one
    line. Reads configs and markers only."""
    from handclip.model.exports import export_spec
    from handclip.tools.export import MARKER, find_checkpoint

    if model is None:
        if backbone is None:
            raise HandClipError("give the model to evaluate: a run folder, a checkpoint, an export, a sweep, a hub id "
                                "or a model folder, or a backbone config (backbone=vit_b32)")  # fmt: skip
        from handclip.build import build

        spec = build(backbone, "backbone")
        source = getattr(spec, "source", None)  # a hub id or a folder; a model built from a config: its name
        ident = str(backbone.get("name") if source in (None, "tiny") else source)
        return Source("hub", ident, _slug(str(backbone.get("name") or ident)), spec=spec,
                      facts={"id": ident, "backbone": dict(backbone)})  # fmt: skip
    if backbone is not None:
        raise HandClipError(f"{model} and backbone=...: give the model or a backbone config, not both")
    path = Path(model)
    if path.is_file():
        checkpoint, run_dir = find_checkpoint(path)
        config = _run_config(run_dir, model)
        return Source("checkpoint", model, _slug(f"{run_dir.name}-{checkpoint.stem}"), config, folders=[run_dir],
                      facts={"path": str(path), "run": str(run_dir)})  # fmt: skip
    if path.is_dir():
        if (path / MARKER).is_file():  # written by python -m handclip.export (--soup)
            from handclip.io import read_record

            marker = read_record(path / MARKER)
            kind = "soup" if marker.get("soup") else "export"
            return Source(kind, model, _slug(path.resolve().name), spec=export_spec(path), folders=[path],
                          facts={"path": str(path), "export": marker})  # fmt: skip
        stages = [p for p in path.glob("*-*/config.yaml") if p.parent.name.split("-")[0].isdigit()]
        if (path / "checkpoints").is_dir() or stages:  # a run (in stages: its last stage is the model)
            checkpoint, run_dir = find_checkpoint(path)
            config = _run_config(run_dir, model)
            return Source("run", model, _slug(path.resolve().name), config, folders=[path],
                          facts={"path": str(path), "checkpoint": str(checkpoint)})  # fmt: skip
        if any((child / "config.yaml").is_file() for child in path.iterdir() if child.is_dir()):
            from handclip.tools.card import run_files
            from handclip.tools.soup import sweep_points

            first = sweep_points(path)[0]
            return Source("soup", model, _slug(path.resolve().name), run_files(first)[0], folders=[path],
                          facts={"path": str(path), "sweep": str(path)})  # fmt: skip
        try:
            spec = export_spec(path)  # a model folder of anyone's: save_pretrained, open_clip
        except HandClipError:
            spec = None
        if spec is not None:
            return Source("hub", model, _slug(path.resolve().name), spec=spec, folders=[path],
                          facts={"path": str(path)})  # fmt: skip
        raise HandClipError(
            f"{model} is not a model HandCLIP can evaluate: not a run folder (config.yaml, checkpoints/), a sweep, "
            "a folder python -m handclip.export wrote, or a model folder (save_pretrained, with model.safetensors)"
        )
    first = Path(model).parts[0] if Path(model).parts else model
    if HUB_ID.match(model) and not Path(first).is_dir() and not model.endswith(".ckpt"):
        from handclip.model.hf.spec import hub_spec

        return Source("hub", model, _slug(model), spec=hub_spec(model, model.split("/")[-1]),
                      facts={"id": model})  # fmt: skip
    raise HandClipError(f"{model}: no such run folder, checkpoint, export or model folder (and not a hub id, "
                        "ORGANISATION/NAME)")  # fmt: skip


def _slug(text: str) -> str:
    return re.sub(r"[^\w.=,+-]+", "_", text).strip("_.") or "model"


# settings --------------------------------------------------------------------------------------------------------
def parse_overrides(overrides: Sequence[str], backbone_allowed: bool = True) -> list:
    """Hydra's overrides, checked: only the sections an evaluation reads, and no sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as error:  # noqa: BLE001 - Hydra's parse error, in one line
        raise ConfigError(f"cannot read the overrides: {str(error).splitlines()[0]}") from None
    allowed = (*SECTIONS, "experiment", *(("backbone",) if backbone_allowed else ()))
    for override in parsed:
        top = override.key_or_group.split(".")[0]
        if top not in allowed:
            extra = "" if backbone_allowed else " (the model is MODEL: backbone= is for evaluating a backbone config)"
            raise ConfigError(f"{override.input_line}: evaluate reads only the data, eval and paths settings "
                              f"(data=..., data.KEY=..., eval.KEY=..., paths.KEY=..., experiment=X){extra}")
        if override.is_sweep_override():
            raise ConfigError(f"{override.input_line}: a sweep; evaluate scores one setting (run it once per value)")
    return parsed


def compose(overrides: Sequence[str]):
    """train.py's configuration from conf/ with `overrides`, as an OmegaConf node (unresolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from handclip.train.resolvers import register_resolvers
    from handclip.train.stages import _composition_error

    if not CONF.is_dir():
        raise HandClipError(f"{CONF} not found: evaluate composes its settings from train.py's conf/ folder")
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=list(overrides))
    except Exception as error:  # noqa: BLE001 - Hydra's composition error, in one line
        raise ConfigError(_composition_error(error)) from None


def _resolved(cfg, sections: Sequence[str]) -> dict:
    from omegaconf import OmegaConf

    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if k.split(".")[0] in sections)
    if missing:
        raise ConfigError(f"{missing[0]} has no value; set it on the command line, e.g. {missing[0]}=...")
    try:
        return {section: OmegaConf.to_container(cfg[section], resolve=True) for section in sections}
    except Exception as error:  # noqa: BLE001 - an interpolation that cannot be resolved, in one line
        raise ConfigError(f"the settings cannot be resolved: {str(error).splitlines()[0]}") from None


def settings(overrides: Sequence[str], run_config: Mapping | None = None, backbone_allowed: bool = True) -> dict:
    """The data, eval and paths sections (and `backbone`, when an override chooses one) an evaluation uses.

    Without `run_config`: conf/'s defaults with the overrides, as train.py composes them. With it (a run's
    config.yaml): the run's data and eval sections; a group chosen (data=NAME, eval=NAME, experiment=NAME) takes
    that section from conf/ instead, and `key=value` overrides set values in the result. `paths` is always this
    command's (where the output goes), never the run's.
    """
    from omegaconf import OmegaConf

    parsed = parse_overrides(overrides, backbone_allowed)
    wanted = [*SECTIONS, *(["backbone"] if any(o.key_or_group.split(".")[0] == "backbone" for o in parsed) else [])]
    if run_config is None:
        return _resolved(compose(overrides), wanted)
    chosen = {o.key_or_group for o in parsed if "." not in o.key_or_group}
    composed_sections = {s for s in ("data", "eval") if s in chosen or "experiment" in chosen} | {"paths"}
    composing = [o.input_line for o in parsed if o.key_or_group.split(".")[0] in (*composed_sections, "experiment")]
    result = _resolved(compose(composing), ["paths", *sorted(composed_sections - {"paths"})])
    config = OmegaConf.create({s: run_config.get(s) for s in ("data", "eval") if s not in composed_sections})
    for override in parsed:
        top = override.key_or_group.split(".")[0]
        if top in composed_sections or top == "experiment":
            continue  # Hydra applied it
        if not isinstance(run_config.get(top), Mapping):
            raise ConfigError(f"{override.input_line}: the run's config.yaml has no {top} section")
        if override.is_delete():
            raise ConfigError(f"{override.input_line}: evaluate sets values; it removes none")
        OmegaConf.update(config, override.key_or_group, override.value(), merge=True, force_add=True)
    return {**result, **OmegaConf.to_container(config, resolve=True)}


# the output folder -----------------------------------------------------------------------------------------------
def is_evaluation(folder: Path) -> bool:
    """Whether `folder` holds an earlier evaluation's output (its metrics.json says what it evaluated)."""
    try:
        return "evaluated" in json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_out(out: Path, source: Source, overwrite: bool) -> None:
    """Refuse an output folder that is a run, the model's own folder (or inside it, or around it), a file, or a
    folder of other files (unless `overwrite`), or that cannot be written."""
    resolved = out.resolve()
    for folder in source.folders:
        folder = folder.resolve()
        if resolved == folder or folder in resolved.parents or resolved in folder.parents:
            raise HandClipError(f"--out {out}: it {'holds' if resolved in folder.parents else 'is'} the model "
                                f"{source.given}; write the evaluation elsewhere, e.g. runs/evaluate/NAME")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise HandClipError(f"--out {out} is a file: give a folder to write the evaluation into")
    ours = is_evaluation(out)
    if (out / "checkpoints").is_dir() or (out / "config.yaml").is_file() or ((out / "metrics.json").is_file()
                                                                              and not ours):  # fmt: skip
        raise HandClipError(f"--out {out} is a run directory: write the evaluation into a new folder, "
                            "e.g. runs/evaluate/NAME")  # fmt: skip
    if out.is_dir() and any(out.iterdir()) and not ours and not overwrite:
        raise HandClipError(
            f"--out {out} is not empty and is not an earlier evaluation; give a new folder, or pass --overwrite to "
            "write the evaluation's files into it (other files there are left as they are)"
        )
    check_writable(out, "--out")


# loading and scoring ---------------------------------------------------------------------------------------------
def backbone_spec(source: Source, trust: Sequence[str]):
    """The spec of the model's backbone (its config only: no weights); a run's config is checked first."""
    from handclip.build import build, check_targets
    from handclip.tools.export import MODEL_SECTIONS

    if source.spec is not None:
        return source.spec
    for section in MODEL_SECTIONS:
        if not isinstance(source.config.get(section), Mapping):
            raise HandClipError(f"{source.given}: its config.yaml has no {section} section: it is not a HandCLIP "
                                "run's config.yaml")  # fmt: skip
        check_targets(source.config[section], section, trust)
    return build(source.config["backbone"], "backbone", trust)


def load_model(source: Source, spec, cache: str | None, weights: str | None, greedy: bool, trust: Sequence[str]):
    """The model's backbone with its weights (what the evaluation scores)."""
    if source.kind in ("run", "checkpoint"):
        from handclip.tools.export import apply_reported_mix, load_run

        run = load_run(source.facts["path"], weights, trust)
        source.facts.update({"checkpoint": str(run.checkpoint), "weights": run.weights})
        notes = ["EMA"] if run.weights == "ema" else []
        run.policy.merge(run.backbone)  # adapters folded in, as an export holds them
        alpha = apply_reported_mix(run, source.facts["path"], None, weights, "evaluating", trust)
        if alpha is not None:
            source.facts["wise_ft"] = alpha
            notes.append(f"WiSE-FT {alpha:g}")
        if notes:
            source.facts["label_note"] = ", ".join(notes)
        return run.backbone
    if source.kind == "soup" and source.spec is None:  # a sweep: averaged here, as export --soup would
        from handclip.tools.soup import make_soup

        made = make_soup(source.facts["sweep"], greedy, weights, trust)
        source.facts.update({"soup": made.marker["soup"], "greedy": greedy, "weights": made.marker["weights"]})
        return made.backbone
    return spec.load(cache)


def protocol(data, section: Mapping, settings, feature: str) -> dict:
    """What the numbers are numbers of: the data (its `data:` section, resolved), its split and the evaluation
    settings that change scores."""
    return {"data": data.name, "settings": dict(section), "draw": data.draw,
            "runs": data.prepare_settings.runs, "manifest": str(data.manifest), "feature": feature,
            "flip_tta": settings.flip_tta, "test": settings.test, "text": settings.text,
            "name": settings.protocol}  # fmt: skip


def evaluate(
    model: str | None, overrides: Sequence[str] = (), out: str | Path | None = None, overwrite: bool = False,
    weights: str | None = None, greedy: bool = False, trust: Sequence[str] = (), console=None,
) -> Path:  # fmt: skip
    """Score `model` (see the module docstring) and write the evaluation into `out`; return the folder."""
    import torch

    from handclip.build import check_targets

    started = time.time()
    if weights not in (None, *WEIGHTS):
        raise HandClipError(f"--weights {weights}: choose one of {', '.join(WEIGHTS)}")
    if model is None:  # a backbone config (backbone=NAME) is the model
        chosen = settings(overrides)
        source = find_source(None, chosen.get("backbone"))
    else:
        source = find_source(model, None)
        chosen = settings(overrides, source.config, backbone_allowed=False)
    if weights is not None and source.spec is not None:
        raise HandClipError(f"--weights {weights}: only a run, a checkpoint or a sweep holds raw and EMA weights; "
                            f"{source.given} is a model folder with one set")  # fmt: skip
    if greedy and not (source.kind == "soup" and source.spec is None):
        raise HandClipError("--greedy: only for a sweep folder (it chooses which points go in the soup)")
    if source.config is not None:  # someone else's run folder: its data and eval sections build only allowed parts
        for section in ("data", "eval"):
            check_targets(chosen.get(section), section, trust)
    from handclip.train.config import build_evaluation

    data, eval_settings = build_evaluation(chosen)  # a missing dataset is refused here
    out = Path(out) if out is not None else Path(chosen["paths"]["runs"]) / "evaluate" / f"{source.name}-{data.name}"
    check_out(out, source, overwrite)
    spec = backbone_spec(source, trust)
    image_size = spec.facts().image_size  # the model's config only; a hub id that cannot be had fails here

    feature = eval_settings.feature
    if feature == "bnneck":  # the BN-neck lives in a run's objective, which no model folder holds
        feature = "projected"
        print("note: eval.feature=bnneck needs the run's objective, which is not loaded here: the projected "
              "embedding is scored (eval.feature=projected)", file=sys.stderr, flush=True)  # fmt: skip
    rows = data.prepare(image_size, training=False)  # no training batches: no batch size to fill
    from handclip.train.config import identity_options

    data.check_retrieval((), feature, identity_options(eval_settings))
    cache = (chosen.get("paths") or {}).get("cache")
    if source.config is not None:
        cache = (source.config.get("paths") or {}).get("cache") or cache
    backbone = load_model(source, spec, cache, weights, greedy, trust)
    backbone.eval()
    if torch.cuda.is_available():
        backbone.cuda()
    from handclip.eval.evaluator import Evaluator
    from handclip.eval.feature import ImageEncoder
    from handclip.eval.protocol import headline_name, statement
    from handclip.eval.tables import print_tables

    evaluator = Evaluator(rows, data.root, data.prepare_settings.image_cache, eval_settings, data.captioner,
                          ImageEncoder(feature), data.source.prompts())  # fmt: skip
    label = source.label + (f" ({source.facts['label_note']})" if "label_note" in source.facts else "")
    _console(console).print(f"evaluating {label} on {data.name} ({len(rows)} manifest rows)")
    result = evaluator(backbone)
    results = {label: result}
    evaluated = {"kind": source.kind, **{k: v for k, v in source.facts.items() if k != "label_note"},
                 "label": label, "protocol": protocol(data, chosen["data"], eval_settings, feature)}  # fmt: skip
    metrics = {**result["metrics"], "wall_time_s": time.time() - started}
    stated = statement(eval_settings.protocol, data.galleries, feature, eval_settings.flip_tta)
    payload = {"evaluated": evaluated, "metrics": metrics, "runs": {label: result["runs"]},
               "cmc": {label: result["cmc"]}, "eval_feature": feature, "manifest": str(data.manifest),
               "galleries": data.galleries, "protocol": stated}  # fmt: skip
    print_tables(_console(console), results, data.galleries, stated)
    _write(out, payload, results, backbone, data, evaluator)
    head = stated["headline"]
    named = headline_name(head)
    summary = ", ".join(f"{name} {100 * metrics[key]:.1f}%" for name, key in (
        (f"{named} Rank-1", f"{head}/rank1"), (f"{named} mAP", f"{head}/mAP"), ("val Rank-1", "val/rank1"))
        if key in metrics)  # fmt: skip
    _console(console).print(f"[bold]{label}[/bold]: {summary}; results in {out}")
    return out


def _console(console):
    if console is None:
        from rich.console import Console

        console = Console()
    return console


def _write(out: Path, payload: dict, results: dict, backbone, data, evaluator) -> None:
    """metrics.json and the figures, in a temporary folder beside `out`, then moved into place."""
    from handclip.eval.plots import pyplot, run_figures
    from handclip.io import remove_dead_leftovers, temporary_path, write_json_atomic
    from handclip.tools.export import put_in_place

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(out.parent, out.name)
    tmp = temporary_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        figures = run_figures(results, backbone, data.captioner, tmp, evaluator)
        for figure in figures.values():
            pyplot().close(figure)
        write_json_atomic(tmp / "metrics.json", payload)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    put_in_place(tmp, out, ours=is_evaluation(out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m handclip.evaluate", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="a run folder, a checkpoint, an export, a soup export or a sweep, a model folder or a hub "
                             "id (leave out and give backbone=NAME to evaluate a backbone config)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="data and evaluation settings as train.py takes them: data=captions "
                             "data.source.root=DIR eval.flip_tta=true experiment=NAME paths.runs=DIR")  # fmt: skip
    parser.add_argument("--out", metavar="DIR", help="where to write (default: ${paths.runs}/evaluate/<model>-<data>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder that is not an earlier evaluation")  # fmt: skip
    parser.add_argument("--weights", choices=WEIGHTS, default=None,
                        help="a run's EMA or raw weights (default: the EMA when the run kept one)")  # fmt: skip
    parser.add_argument("--greedy", action="store_true",
                        help="a sweep's soup adds points only if validation Rank-1 holds")  # fmt: skip
    parser.add_argument("--trust", action="append", default=[], metavar="MODULE",
                        help="a module of your own whose components the run's config.yaml may build (repeatable)")
    args = parser.parse_intermixed_args(argv)  # options before, between or after the overrides
    model, overrides = args.model, list(args.overrides)
    if model is not None and "=" in model:  # only overrides: a backbone config is the model
        model, overrides = None, [model, *overrides]
    try:
        evaluate(model, overrides, args.out, args.overwrite, args.weights, args.greedy, args.trust)
    except HandClipError as error:
        exit_with(error)


if __name__ == "__main__":
    main()
