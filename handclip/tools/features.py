"""Image embeddings of a folder of images with an exported model (for downstream search).

    python -m handclip.features MODEL_DIR IMAGE_DIR [--out features.npz] [--overwrite]

prints one line per image (name and the first values of its L2-normalised embedding) and,
with --out, saves `names` and `features` arrays. MODEL_DIR is any folder `python -m
handclip.export` writes (a Hugging Face or an open_clip model: `handclip.model.exports` finds
which); images are prepared as evaluation prepares them. Only safetensors weights are read: a
pickled `pytorch_model.bin` can run code when loaded, and is refused.

--out never replaces a file it did not write (a features file from an earlier run is replaced,
anything else needs --overwrite) and never writes inside MODEL_DIR. Every refusal comes before
the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from handclip.data.readers import IMAGE_SUFFIXES
from handclip.errors import HandClipError, exit_with
from handclip.tools.outputs import check_writable

MARKER = "handclip_features"  # the array that makes an .npz one of ours, which a later run may replace


def embed_folder(model_dir: str | Path, image_dir: str | Path, batch_size: int = 32):
    """(names, L2-normalised image embeddings [n, dim], skipped names) of the images in `image_dir`.

    A file that cannot be decoded is skipped and named, as training does; it never stops the folder.
    """
    import torch
    from PIL import Image

    from handclip.data.images import load_rgb
    from handclip.data.transforms import eval_transform
    from handclip.model.exports import export_spec

    image_dir, model_dir = Path(image_dir), Path(model_dir)
    if not image_dir.is_dir():
        raise HandClipError(f"{image_dir}: no such folder of images")
    spec = export_spec(model_dir)  # which implementation wrote it; refuses a folder it cannot read safely
    paths = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise HandClipError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    try:
        backbone = spec.load().eval()
    except (OSError, ValueError) as error:
        raise HandClipError(f"{model_dir} cannot be loaded as a CLIP model: {str(error).splitlines()[0]}") from None
    # the backbone's own preprocessing values, the same transform as evaluation
    transform = eval_transform(backbone.image_size, backbone.resize_size, backbone.image_mean, backbone.image_std)
    names, out, skipped = [], [], []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images = []
            for path in paths[start : start + batch_size]:
                try:
                    images.append(transform(load_rgb(path)))
                    names.append(path.name)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                    skipped.append(path.name)
                    print(f"skipping {path}: cannot be decoded ({error})", file=sys.stderr)
            if images:
                out.append(torch.nn.functional.normalize(backbone.encode_image(torch.stack(images)), dim=-1))
    if not out:
        raise HandClipError(f"none of the {len(paths)} images in {image_dir} could be decoded")
    return names, torch.cat(out), skipped


def is_features_file(path: Path) -> bool:
    """Whether `path` is an .npz this command wrote (it holds the `MARKER` array)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return f"{MARKER}.npy" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def check_out(out: Path, model_dir: Path, overwrite: bool) -> None:
    """Refuse an --out that would overwrite what is not ours, write inside the model, or cannot be written."""
    if model_dir.resolve() in out.resolve().parents:
        raise HandClipError(f"--out {out} is inside the model folder {model_dir}: write the features elsewhere")
    if out.is_dir():
        raise HandClipError(f"--out {out} is a folder: give a file name, e.g. {out / 'features.npz'}")
    check_writable(out, "--out")  # a file in the way of its folder, or a folder that cannot be written
    if not out.absolute().parent.is_dir():
        raise HandClipError(f"--out {out}: the folder {out.parent} does not exist")
    if out.exists() and not overwrite and not is_features_file(out):
        raise HandClipError(
            f"--out {out} exists and is not a features file this command wrote: give a new file name, or pass "
            "--overwrite to replace it"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("image_dir")
    parser.add_argument("--out", help="save names and features to this .npz file (the name as given)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out file this command did not write")
    args = parser.parse_args(argv)
    try:
        if args.out:
            check_out(Path(args.out), Path(args.model_dir), args.overwrite)
        names, features, skipped = embed_folder(args.model_dir, args.image_dir)
    except HandClipError as error:
        exit_with(error)
    for name, row in zip(names, features, strict=True):
        print(name, " ".join(f"{v:+.4f}" for v in row[:8].tolist()), "...")
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not readable images", file=sys.stderr)
    if args.out:
        import numpy as np

        from handclip.io import atomic_write

        with atomic_write(args.out, "wb") as handle:  # the name as given: no .npz appended
            np.savez(handle, names=np.array(names), features=features.numpy(), **{MARKER: np.array(1)})
        print(f"saved {len(names)} embeddings of dimension {features.shape[1]} to {args.out}")


if __name__ == "__main__":
    main()
