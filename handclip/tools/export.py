"""Export a run as a Hugging Face model directory that loads without HandCLIP.

    python -m handclip.export RUN_DIR_OR_CKPT OUT_DIR [--wise-ft ALPHA] [--weights ema|raw]
    python -m handclip.export --soup runs/sweeps/NAME OUT_DIR [--greedy]

writes safetensors weights, config, tokenizer and image processor; the result loads with
`CLIPModel.from_pretrained(OUT_DIR)` and `pipeline("zero-shot-image-classification", model=OUT_DIR)`.
`--wise-ft ALPHA` interpolates the weights with the original backbone's (WiSE-FT:
(1 - ALPHA) * original + ALPHA * fine-tuned), which keeps more zero-shot ability.
A run trained with an EMA (`ema.decay`) exports its EMA by default (`--weights raw` for the raw
weights): the EMA's validation score chose the best checkpoint and its weights were the ones
tested, so the export is the model the run's numbers describe. `--soup` averages a sweep's runs
(`handclip.tools.soup`). Every export carries a model card, README.md (`handclip.tools.card`).

A run whose backbone is an open_clip model (`handclip.model.openclip.OpenCLIP`, `backbone=oc_*`) is written
in open_clip's own format instead: `open_clip_model.safetensors`, `open_clip_config.json` (model and
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
from pathlib import Path

import yaml

from handclip.errors import HandClipError, exit_with
from handclip.model.lora import merge_lora


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


def load_run_model(source: str | Path, weights: str | None = None):
    """The fine-tuned backbone of a run (with its tokenizer and preprocessing) and the run's config.

    `weights`: `ema` (the run's moving average), `raw`, or None: the EMA when the checkpoint holds one.
    """
    backbone, config, _ = load_weights(source, weights)
    return backbone, config


def load_weights(source: str | Path, weights: str | None = None):
    """(backbone, config, which weights: "ema" or "raw") of a run; see `load_run_model`."""
    from handclip.build import build
    from handclip.io import load_checkpoint_file
    from handclip.model.averaging import ema_weights

    if weights not in (None, *WEIGHTS):
        raise HandClipError(f"--weights {weights}: choose one of {', '.join(WEIGHTS)}")

    checkpoint, run_dir = find_checkpoint(source)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise HandClipError(f"{config_path} not found: export needs the run's resolved config beside its checkpoints")
    config = yaml.safe_load(config_path.read_text())
    backbone = build(config["backbone"], "backbone").load((config.get("paths") or {}).get("cache"))
    build(config["projection"], "projection").apply(backbone)
    _build_freeze(config["freeze"]).adapt(backbone)  # adapters (LoRA) the checkpoint holds weights for
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
    return backbone, config, chosen


def _build_freeze(spec):
    """The run's freeze policy (its nested parts too: a schedule's stages), without Hydra."""
    from collections.abc import Mapping

    from handclip.build import build

    def make(value):
        if isinstance(value, Mapping):
            value = {k: make(v) for k, v in value.items()}
            return build(value, "freeze") if "_target_" in value else value
        return value

    return make(spec)


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
    """Refuse a destination that would touch a run or someone else's files."""
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


def _put_in_place(tmp: Path, out_dir: Path) -> None:
    """Move the finished export in: a new folder, a previous export replaced whole, or files into a folder."""

    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(tmp, out_dir)
    elif (out_dir / MARKER).is_file():  # a previous export: ours, replaced whole
        retired = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
        os.replace(out_dir, retired)
        os.replace(tmp, out_dir)
        shutil.rmtree(retired)
    else:  # --overwrite into a folder of the user's: our files replace theirs by name, nothing else goes
        for item in tmp.iterdir():  # save_pretrained writes files only
            os.replace(item, out_dir / item.name)
        tmp.rmdir()


def export(
    source: str | Path, out_dir: str | Path, alpha: float | None = None, overwrite: bool = False,
    weights: str | None = None,
) -> Path:  # fmt: skip
    """Write the run's model as a Hugging Face directory with a model card; return it.

    `weights`: `ema`, `raw`, or None (the EMA when the run kept one: its validation score picked the
    best checkpoint and its weights were the ones tested). The model is written into a new
    temporary folder beside `out_dir` and moved into place only when complete. A non-empty
    `out_dir` that is not a previous export is refused unless `overwrite`; a run directory, or a
    folder holding the run, is always refused.
    """
    from handclip.build import build
    from handclip.tools.card import model_card, run_files

    out_dir = Path(out_dir)
    checkpoint, run_dir = find_checkpoint(source)
    check_destination(out_dir, run_dir, overwrite)
    backbone, config, chosen = load_weights(source, weights)
    if alpha is not None:
        from handclip.model.projection import Keep

        if not isinstance(build(config["projection"], "projection"), Keep):
            raise HandClipError(
                "WiSE-FT needs an original for every weight, and this run replaced its projection heads "
                f"(projection: {config['projection'].get('_target_')}), which have none: export without --wise-ft"
            )
        original = build(config["backbone"], "backbone").load((config.get("paths") or {}).get("cache"))
        merge_lora(backbone)
        wise_ft(backbone, original, alpha)
    marker = {"source": str(run_dir), "checkpoint": str(checkpoint), "wise_ft": alpha, "weights": chosen}
    _, payload, policy = run_files(run_dir)

    def card(export_format, load_hint):
        return model_card(config, payload, policy, weights=chosen, export_format=export_format, load_hint=load_hint,
                          wise_ft=alpha, source=str(checkpoint))  # fmt: skip

    return write_export(backbone, out_dir, marker, card)


def write_export(backbone, out_dir: Path, marker: dict, card) -> Path:
    """Save the backbone, the marker and the model card (`card(export_format, load_hint)`) into a
    temporary folder, then move it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    if tmp.exists():
        raise HandClipError(f"{tmp} exists: another export into {out_dir} may be running; remove it if not")
    merge_lora(backbone)  # adapters folded into the weights: the export loads without peft
    try:
        backbone.save_pretrained(tmp)  # an open_clip backbone writes open_clip's own format
        export_format = getattr(backbone, "export_format", None)
        load_hint = backbone.load_hint(out_dir) if export_format else None
        if export_format:  # absent (a Hugging Face directory) for the Hugging Face backbone, as before
            marker["format"] = export_format
            marker["load"] = load_hint
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        (tmp / "README.md").write_text(card(export_format, load_hint), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own half-written folder
        raise
    _put_in_place(tmp, out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run directory (runs/NAME), a checkpoint file, or with --soup a sweep")
    parser.add_argument("out_dir", help="where to write the Hugging Face model directory")
    parser.add_argument("--wise-ft", type=float, default=None, metavar="ALPHA", help="interpolate with the original")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder that is not an export")
    parser.add_argument("--weights", choices=WEIGHTS, default=None,
                        help="the run's EMA or raw weights (default: the EMA when the run kept one)")  # fmt: skip
    parser.add_argument("--soup", action="store_true", help="average the finished points of the sweep SOURCE")
    parser.add_argument("--greedy", action="store_true", help="with --soup: add points only if val Rank-1 holds")
    args = parser.parse_args(argv)
    try:
        if args.greedy and not args.soup:
            raise HandClipError("--greedy needs --soup: it chooses which sweep points go in a soup")
        if args.soup and args.wise_ft is not None:
            raise HandClipError("--wise-ft with --soup: export the soup, or WiSE-FT one run, not both at once")
        if args.soup:
            from handclip.tools.soup import soup

            out = soup(args.source, args.out_dir, args.greedy, args.overwrite, args.weights)
        else:
            out = export(args.source, args.out_dir, args.wise_ft, args.overwrite, args.weights)
    except HandClipError as error:
        exit_with(error)
    marker = json.loads((out / MARKER).read_text()) if (out / MARKER).is_file() else {}
    print(f"exported {out}: {marker.get('load') or f'load it with CLIPModel.from_pretrained({str(out)!r})'}")


if __name__ == "__main__":
    main()
