"""Export a run as a model directory that loads without HandCLIP (in its backbone's own format).

    python -m handclip.export RUN_DIR_OR_CKPT OUT_DIR [--wise-ft ALPHA] [--weights ema|raw] [--trust MODULE]
    python -m handclip.export --soup runs/sweeps/NAME OUT_DIR [--greedy] [--trust MODULE]
    python -m handclip.export --stock RUN_A RUN_B OUT_DIR [--weights ema|raw] [--trust MODULE]

writes safetensors weights, config, tokenizer and image processor; the result loads with
`CLIPModel.from_pretrained(OUT_DIR)` and `pipeline("zero-shot-image-classification", model=OUT_DIR)`.
`--wise-ft ALPHA` interpolates the weights with the original backbone's (WiSE-FT:
(1 - ALPHA) * original + ALPHA * fine-tuned), which keeps more zero-shot ability.
A run trained with an EMA (`ema.decay`) exports its EMA by default (`--weights raw` for the raw
weights): the EMA's validation score chose the best checkpoint and its weights were the ones
tested, so the export is the model the run's numbers describe. `--soup` averages a sweep's runs
(`handclip.tools.soup`); `--stock` merges two runs by Model Stock (`handclip.tools.stock`). Every export
carries a model card, README.md (`handclip.tools.card`).

The run's `config.yaml` is rebuilt with `handclip.build`, which builds only HandCLIP's components and
the libraries it builds from: a run folder from elsewhere cannot run its own code here (`--trust
MODULE` allows a module of yours, e.g. a freeze policy of your own). Weights that are not finite
(NaN, inf) are refused, naming the first such parameter; so is an output folder that cannot be
written, before anything is loaded.

Each backbone writes its own format (`Backbone.export_format`, recorded in `handclip_export.json`); a run
whose backbone is an open_clip model (`handclip.model.openclip.OpenCLIP`, `backbone=oc_*`) is written in
open_clip's own format: `open_clip_model.safetensors`, `open_clip_config.json` (model and
preprocessing config) and `<name>.json` (the bare model config). It loads without HandCLIP with
`open_clip.create_model_and_transforms("local-dir:OUT_DIR")` (tokenizer:
`open_clip.get_tokenizer("local-dir:OUT_DIR")`), or with `open_clip.add_model_config("OUT_DIR/<name>.json")` and then
`open_clip.create_model("<name>", pretrained="OUT_DIR/open_clip_model.safetensors")` (a tiny model built from
a config, or a replaced projection, needs one of these two; an unchanged built-in architecture also loads with
`open_clip.create_model(name, pretrained="OUT_DIR/open_clip_model.safetensors")`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handclip.errors import HandClipError, exit_with
from handclip.tools.outputs import check_writable


def find_checkpoint(source: str | Path) -> tuple[Path, Path]:
    """(checkpoint, run directory) for a run directory (best, else last) or a checkpoint file."""
    source = Path(source)
    if source.is_dir():
        stages = [p for p in source.glob("*-*/config.yaml") if p.parent.name.split("-")[0].isdigit()]
        stages.sort(key=lambda p: int(p.parent.name.split("-")[0]))
        if stages and not (source / "checkpoints").is_dir():  # a run in stages: its last stage is the model
            return find_checkpoint(stages[-1].parent)
        for name in ("best.ckpt", "last.ckpt"):
            if (source / "checkpoints" / name).is_file():
                return source / "checkpoints" / name, source
        raise HandClipError(f"{source} holds no checkpoints/best.ckpt or checkpoints/last.ckpt")
    if source.is_file():
        return source, source.parent.parent
    raise HandClipError(f"{source}: no such run directory or checkpoint file")


WEIGHTS = ("ema", "raw")


def reported_mix(source: str | Path) -> float | None:
    """The WiSE-FT ratio of the model a finished run reported (its metrics.json), when `source` is the run's folder:
    what the run's numbers and card describe is that mix of its selected checkpoint with its initial weights.
    None for a checkpoint file named by the user, a run that reported unmixed weights, or an unfinished run."""
    source = Path(source)
    if not source.is_dir():
        return None
    checkpoint, run_dir = find_checkpoint(source)
    try:
        payload = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    from handclip.tools.card import reported_ratio

    best = payload.get("best_checkpoint")
    return reported_ratio(payload) if best and Path(best).name == checkpoint.name else None


def apply_reported_mix(
    run, source: str | Path, alpha: float | None, weights: str | None, what: str, trust: Sequence[str] = ()
) -> float | None:
    """`alpha` as given, or the run's reported WiSE-FT ratio (`reported_mix`) when neither it nor `weights` was
    given; the mix is applied to `run.backbone` and said in one line. Returns the ratio applied (None: unmixed)."""
    if alpha is None and weights is None:
        alpha = reported_mix(source)
        if alpha is not None:
            print(f"{what} the model the run reported: its selected weights mixed with its initial ones at WiSE-FT "
                  f"ratio {alpha:g} (--wise-ft 1 for the unmixed weights)", flush=True)  # fmt: skip
    if alpha is None:
        return None
    from handclip.build import build
    from handclip.model.projection import Keep

    if not isinstance(build(run.config["projection"], "projection", trust), Keep):
        raise HandClipError(
            "WiSE-FT needs an original for every weight, and this run replaced its projection heads "
            f"(projection: {run.config['projection'].get('_target_')}), which have none: export without --wise-ft"
        )
    wise_ft(run.backbone, run.spec.load((run.config.get("paths") or {}).get("cache")), alpha)
    return alpha


# the sections of a run's config that make its model: built, and so checked, before anything is loaded
MODEL_SECTIONS = ("backbone", "projection", "freeze")


@dataclass
class LoadedRun:
    """A run's fine-tuned backbone, with what made it."""

    backbone: Any  # the loaded Backbone, with the checkpoint's weights
    config: dict  # the run's config.yaml
    weights: str  # "ema" or "raw"
    spec: Any  # the BackboneSpec the config names
    policy: Any  # its FreezePolicy (which may hold adapters to merge)
    checkpoint: Path
    run_dir: Path


def load_run_model(source: str | Path, weights: str | None = None, trust: Sequence[str] = ()):
    """The fine-tuned backbone of a run (with its tokenizer and preprocessing) and the run's config.

    `weights`: `ema` (the run's moving average), `raw`, or None: the EMA when the checkpoint holds one.
    `trust`: modules besides HandCLIP's whose components the run's config may build (`handclip.build`).
    """
    run = load_run(source, weights, trust)
    return run.backbone, run.config


def load_run(source: str | Path, weights: str | None = None, trust: Sequence[str] = ()) -> LoadedRun:
    """A run's backbone with the weights of its checkpoint (see `load_run_model`)."""
    from handclip.build import build, check_targets
    from handclip.io import load_checkpoint_file, read_record
    from handclip.model.averaging import ema_weights

    if weights not in (None, *WEIGHTS):
        raise HandClipError(f"--weights {weights}: choose one of {', '.join(WEIGHTS)}")

    checkpoint, run_dir = find_checkpoint(source)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise HandClipError(f"{config_path} not found: export needs the run's resolved config beside its checkpoints")
    config = read_record(config_path)  # a damaged one is one line naming it
    for section in MODEL_SECTIONS:  # all of them, before any is built
        if not isinstance(config.get(section), Mapping):
            raise HandClipError(f"{config_path} has no {section} section: it is not a HandCLIP run's config.yaml")
        check_targets(config.get(section), section, trust)
    spec = build(config["backbone"], "backbone", trust)
    backbone = spec.load((config.get("paths") or {}).get("cache"))
    build(config["projection"], "projection", trust).apply(backbone)
    policy = build_freeze(config["freeze"], trust)
    policy.adapt(backbone)  # adapters (LoRA) the checkpoint holds weights for
    saved = load_checkpoint_file(checkpoint)
    state, averaged = saved["state_dict"], ema_weights(saved)
    del saved
    if weights == "ema" and averaged is None:
        raise HandClipError(f"--weights ema: {checkpoint} holds no EMA weights (the run had ema.decay=null)")
    chosen = weights or ("ema" if averaged is not None else "raw")
    prefix = "backbone."  # the training module's own attribute; the rest is the backbone's business
    if not any(k.startswith(prefix) for k in state):
        raise HandClipError(
            f"{checkpoint} holds no backbone.* weights: it was written by a HandCLIP from before the model "
            "interface (weights under model.*) or by another program; export it with the version that wrote it"
        )
    try:
        backbone.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    except RuntimeError as error:
        raise HandClipError(f"{checkpoint} does not fit the run's backbone: {str(error).splitlines()[0]}") from None
    if chosen == "ema":
        backbone.load_state_dict({**backbone.state_dict(), **averaged})
    return LoadedRun(backbone, config, chosen, spec, policy, checkpoint, run_dir)


def build_freeze(spec: Mapping, trust: Sequence[str] = ()):
    """The run's freeze policy (its nested parts too: a schedule's stages), without Hydra."""
    from handclip.build import build

    def make(value, key):
        if isinstance(value, Mapping):
            value = {k: make(v, f"{key}.{k}") for k, v in value.items()}
            return build(value, key, trust) if "_target_" in value else value
        return value

    return make(spec, "freeze")


def check_finite(state: Mapping, what: str) -> None:
    """Refuse weights that are not all finite, naming the first parameter with a NaN or an infinity."""
    import torch

    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise HandClipError(
                f"{what}: {name} holds {bad} values (training diverged); nothing was exported. Export an earlier "
                "checkpoint, or the raw weights if only the EMA is broken (--weights raw)"
            )


def wise_ft(backbone, original, alpha: float) -> None:
    """In place: every weight of `backbone` becomes (1 - alpha) * original + alpha * fine-tuned."""
    import torch

    if not 0.0 <= alpha <= 1.0:
        raise HandClipError(f"--wise-ft {alpha}: alpha must be in [0, 1] (1 = fine-tuned, 0 = original)")
    reference = original.state_dict()
    with torch.no_grad():
        for name, tensor in backbone.state_dict().items():
            if reference[name].shape != tensor.shape:
                raise HandClipError(
                    f"WiSE-FT: {name} has shape {tuple(tensor.shape)} vs {tuple(reference[name].shape)}"
                )
            if tensor.is_floating_point():
                tensor.copy_((1 - alpha) * reference[name] + alpha * tensor)


MARKER = "handclip_export.json"  # what makes a folder a previous export, which may be replaced


def check_destination(out_dir: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse a destination that would touch a run or someone else's files, or that cannot be written."""
    out, run = out_dir.resolve(), run_dir.resolve()
    if out == run or out in run.parents:
        raise HandClipError(f"{out_dir} holds the run {run_dir} itself: export into a new folder, e.g. exported/NAME")
    if out.exists() and not out.is_dir():
        raise HandClipError(f"{out_dir} is a file: give a folder to export into")
    if run in out.parents:
        raise HandClipError(f"{out_dir} is inside the run {run_dir}: export next to it, e.g. exported/NAME")
    if (out / "checkpoints").is_dir() or (out / "metrics.json").is_file():
        raise HandClipError(f"{out_dir} is a run directory: export into a new folder, e.g. exported/NAME")
    foreign = out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file()
    if foreign and not overwrite:
        raise HandClipError(
            f"{out_dir} is not empty and is not a previous export; export into a new folder, or pass --overwrite "
            "to write the model's files and its card (README.md) into it (other files there are left as they are)"
        )
    check_writable(out_dir, "export into")


def put_in_place(tmp: Path, out_dir: Path, ours: bool | None = None) -> None:
    """Move the finished folder `tmp` in: a new folder, a previous one of ours replaced whole (`ours`; default: a
    previous export, a folder with the export's marker), or its files into a folder of the user's."""
    ours = (out_dir / MARKER).is_file() if ours is None else ours
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(tmp, out_dir)
    elif ours:  # a previous export (or evaluation): ours, replaced whole
        retired = out_dir.with_name(f"{tmp.name}-old")
        os.replace(out_dir, retired)
        os.replace(tmp, out_dir)
        shutil.rmtree(retired)
    else:  # --overwrite into a folder of the user's: our files replace theirs by name, nothing else goes
        for item in tmp.iterdir():  # save_pretrained writes files only
            os.replace(item, out_dir / item.name)
        tmp.rmdir()


def export(
    source: str | Path, out_dir: str | Path, alpha: float | None = None, overwrite: bool = False,
    weights: str | None = None, trust: Sequence[str] = (),
) -> Path:  # fmt: skip
    """Write the run's model in its backbone's format with a model card; return the folder.

    `weights`: `ema`, `raw`, or None (the EMA when the run kept one: its validation score picked the
    best checkpoint and its weights were the ones tested). The model is written into a new
    temporary folder beside `out_dir` and moved into place only when complete. A non-empty
    `out_dir` that is not a previous export is refused unless `overwrite`; a run directory, or a
    folder holding the run, is always refused. `trust`: see `load_run_model`.
    """
    from handclip.tools.card import model_card, run_files

    out_dir = Path(out_dir)
    checkpoint, run_dir = find_checkpoint(source)
    check_destination(out_dir, run_dir, overwrite)
    run = load_run(source, weights, trust)
    backbone, config = run.backbone, run.config
    merged = run.policy.merge(backbone)  # adapters folded into the weights: the export loads without peft
    alpha = apply_reported_mix(run, source, alpha, weights, "exporting", trust)
    marker = {"source": str(run_dir), "checkpoint": str(checkpoint), "wise_ft": alpha, "weights": run.weights}
    _, payload, policy = run_files(run_dir)
    card = model_card(config, payload, policy, spec=run.spec, backbone=backbone, merged=merged, weights=run.weights,
                      wise_ft=alpha, source=str(checkpoint))  # fmt: skip
    return write_export(backbone, out_dir, marker, card)


def write_export(backbone, out_dir: Path, marker: dict, card: str) -> Path:
    """Save the backbone (its adapters merged already), the marker and the model card `card` into a temporary
    folder, then move it into place; weights that are not finite are refused first."""
    from handclip.io import remove_dead_leftovers, temporary_path

    check_finite(backbone.state_dict(), "export")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(out_dir.parent, out_dir.name)  # what an export killed half-way left (its process is gone)
    tmp = temporary_path(out_dir)
    if tmp.exists():
        raise HandClipError(f"{tmp} exists: another export into {out_dir} may be running; remove it if not")
    try:
        backbone.save_pretrained(tmp)  # in the backbone's own format
        marker["format"] = backbone.export_format
        marker["load"] = backbone.load_hint(out_dir)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own half-written folder
        raise
    put_in_place(tmp, out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run directory (runs/NAME), a checkpoint file, or with --soup a sweep")
    parser.add_argument("out_dir", help="where to write the model directory (with --stock: the second run)")
    parser.add_argument("stock_out", nargs="?", default=None, metavar="OUT_DIR",
                        help="with --stock: where to write the model directory")  # fmt: skip
    parser.add_argument("--wise-ft", type=float, default=None, metavar="ALPHA", help="interpolate with the original")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder that is not an export")
    parser.add_argument("--weights", choices=WEIGHTS, default=None,
                        help="the run's EMA or raw weights (default: the EMA when the run kept one)")  # fmt: skip
    parser.add_argument("--soup", action="store_true", help="average the finished points of the sweep SOURCE")
    parser.add_argument("--greedy", action="store_true", help="with --soup: add points only if val Rank-1 holds")
    parser.add_argument("--stock", action="store_true",
                        help="Model Stock: merge RUN_A and RUN_B towards the pretrained weights (A B OUT)")  # fmt: skip
    parser.add_argument("--trust", action="append", default=[], metavar="MODULE",
                        help="a module of your own whose components the run's config.yaml may build (repeatable)")
    args = parser.parse_args(argv)
    try:
        if args.greedy and not args.soup:
            raise HandClipError("--greedy needs --soup: it chooses which sweep points go in a soup")
        if args.soup and args.wise_ft is not None:
            raise HandClipError("--wise-ft with --soup: export the soup, or WiSE-FT one run, not both at once")
        if args.stock and (args.soup or args.wise_ft is not None):
            raise HandClipError("--stock merges two runs by Model Stock; it takes neither --soup nor --wise-ft")
        if args.stock != (args.stock_out is not None):
            raise HandClipError("--stock takes two runs and a destination: python -m handclip.export --stock RUN_A "
                                "RUN_B OUT_DIR" if args.stock else f"one destination, not two ({args.out_dir}, "
                                f"{args.stock_out}): a third path is for --stock RUN_A RUN_B OUT_DIR")  # fmt: skip
        if args.stock:
            from handclip.tools.stock import model_stock

            out = model_stock(args.source, args.out_dir, args.stock_out, args.overwrite, args.weights, args.trust)
        elif args.soup:
            from handclip.tools.soup import soup

            out = soup(args.source, args.out_dir, args.greedy, args.overwrite, args.weights, args.trust)
        else:
            out = export(args.source, args.out_dir, args.wise_ft, args.overwrite, args.weights, args.trust)
    except HandClipError as error:
        exit_with(error)
    print(f"exported {out}: {json.loads((out / MARKER).read_text())['load']}")


if __name__ == "__main__":
    main()
