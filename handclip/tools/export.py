"""Export a run as a Hugging Face model directory that loads without HandCLIP.

    python -m handclip.export RUN_DIR_OR_CKPT OUT_DIR [--wise-ft ALPHA]

writes safetensors weights, config, tokenizer and image processor; the result loads with
`CLIPModel.from_pretrained(OUT_DIR)` and `pipeline("zero-shot-image-classification", model=OUT_DIR)`.
`--wise-ft ALPHA` interpolates the weights with the original backbone's (WiSE-FT:
(1 - ALPHA) * original + ALPHA * fine-tuned), which keeps more zero-shot ability.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import yaml

from handclip.errors import HandClipError


def find_checkpoint(source: str | Path) -> tuple[Path, Path]:
    """(checkpoint, run directory) for a run directory (best, else last) or a checkpoint file."""
    source = Path(source)
    if source.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (source / "checkpoints" / name).is_file():
                return source / "checkpoints" / name, source
        raise HandClipError(f"{source} holds no checkpoints/best.ckpt or checkpoints/last.ckpt")
    if source.is_file():
        return source, source.parent.parent
    raise HandClipError(f"{source}: no such run directory or checkpoint file")


def load_run_model(source: str | Path):
    """The fine-tuned backbone of a run (with its tokenizer and preprocessing) and the run's config."""
    from handclip.build import build
    from handclip.io import load_checkpoint_file

    checkpoint, run_dir = find_checkpoint(source)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise HandClipError(f"{config_path} not found: export needs the run's resolved config beside its checkpoints")
    config = yaml.safe_load(config_path.read_text())
    backbone = build(config["backbone"], "backbone").load((config.get("paths") or {}).get("cache"))
    build(config["projection"], "projection").apply(backbone)
    state = load_checkpoint_file(checkpoint)["state_dict"]
    prefix = "backbone.model."
    if not any(k.startswith(prefix) for k in state):
        raise HandClipError(f"{checkpoint} holds no backbone weights ({prefix}*): was it written by HandCLIP?")
    backbone.load_weights({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return backbone, config


def wise_ft(backbone, original, alpha: float) -> None:
    """In place: every weight of `backbone` becomes (1 - alpha) * original + alpha * fine-tuned."""
    import torch

    if not 0.0 <= alpha <= 1.0:
        raise HandClipError(f"--wise-ft {alpha}: alpha must be in [0, 1] (1 = fine-tuned, 0 = original)")
    reference = original.weights_state_dict()
    with torch.no_grad():
        for name, tensor in backbone.weights_state_dict().items():
            if reference[name].shape != tensor.shape:
                raise HandClipError(
                    f"WiSE-FT: {name} has shape {tuple(tensor.shape)} vs {tuple(reference[name].shape)}"
                )
            if tensor.is_floating_point():
                tensor.copy_((1 - alpha) * reference[name] + alpha * tensor)


def export(source: str | Path, out_dir: str | Path, alpha: float | None = None) -> Path:
    """Write the run's model as a Hugging Face directory; return it."""
    from handclip.build import build

    backbone, config = load_run_model(source)
    if alpha is not None:
        from handclip.model.projection import Keep

        if not isinstance(build(config["projection"], "projection"), Keep):
            raise HandClipError(
                "WiSE-FT needs an original for every weight, and this run replaced its projection heads "
                f"(projection: {config['projection'].get('_target_')}), which have none: export without --wise-ft"
            )
        original = build(config["backbone"], "backbone").load((config.get("paths") or {}).get("cache"))
        wise_ft(backbone, original, alpha)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run directory (runs/NAME) or a checkpoint file")
    parser.add_argument("out_dir", help="where to write the Hugging Face model directory")
    parser.add_argument("--wise-ft", type=float, default=None, metavar="ALPHA", help="interpolate with the original")
    args = parser.parse_args(argv)
    try:
        out = export(args.source, args.out_dir, args.wise_ft)
    except HandClipError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"exported {out}: load it with CLIPModel.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
