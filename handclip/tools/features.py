"""Image embeddings of a folder of images with an exported model (for downstream search).

    python -m handclip.features MODEL_DIR IMAGE_DIR [--out features.npz]

prints one line per image (name and the first values of its L2-normalised embedding) and,
with --out, saves `names` and `features` arrays. Uses transformers only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from handclip.data.readers import IMAGE_SUFFIXES
from handclip.errors import HandClipError, exit_with


def embed_folder(model_dir: str | Path, image_dir: str | Path, batch_size: int = 32):
    """(names, L2-normalised image embeddings [n, dim], skipped names) of the images in `image_dir`.

    A file that cannot be decoded is skipped and named, as training does; it never stops the folder.
    """
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    from handclip.data.images import load_rgb
    from handclip.model.hf import HFBackbone

    image_dir, model_dir = Path(image_dir), Path(model_dir)
    if not image_dir.is_dir():
        raise HandClipError(f"{image_dir}: no such folder of images")
    open_clip_export = (model_dir / "open_clip_config.json").is_file()
    if not (model_dir / "config.json").is_file() and not open_clip_export:
        raise HandClipError(f"{model_dir} is not a model directory (no config.json): give the folder export wrote")
    paths = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise HandClipError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    try:
        if open_clip_export:  # an open_clip model: its own preprocessing values, the same transform as evaluation
            from handclip.data.transforms import eval_transform
            from handclip.model.openclip import OpenCLIP

            backbone = OpenCLIP(name=f"local-dir:{model_dir}").load().eval()
            transform = eval_transform(backbone.image_size, backbone.resize_size, backbone.image_mean,
                                       backbone.image_std)  # fmt: skip

            def preprocess(images):
                return torch.stack([transform(image) for image in images])
        else:
            processor = CLIPImageProcessor.from_pretrained(model_dir)
            backbone = HFBackbone(CLIPModel.from_pretrained(model_dir), None, processor, str(model_dir)).eval()

            def preprocess(images):
                return processor(images=images, return_tensors="pt")["pixel_values"]
    except (OSError, ValueError, HandClipError) as error:
        raise HandClipError(f"{model_dir} cannot be loaded as a CLIP model: {str(error).splitlines()[0]}") from None
    names, out, skipped = [], [], []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images = []
            for path in paths[start : start + batch_size]:
                try:
                    images.append(load_rgb(path))
                    names.append(path.name)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                    skipped.append(path.name)
                    print(f"skipping {path}: cannot be decoded ({error})", file=sys.stderr)
            if images:
                pixels = preprocess(images)
                out.append(torch.nn.functional.normalize(backbone.encode_image(pixels), dim=-1))
    if not out:
        raise HandClipError(f"none of the {len(paths)} images in {image_dir} could be decoded")
    return names, torch.cat(out), skipped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("image_dir")
    parser.add_argument("--out", help="save names and features to this .npz file (the name as given)")
    args = parser.parse_args(argv)
    try:
        if args.out and not Path(args.out).resolve().parent.is_dir():
            raise HandClipError(f"--out {args.out}: the folder {Path(args.out).parent} does not exist")
        if args.out and Path(args.out).is_dir():
            raise HandClipError(
                f"--out {args.out} is a folder: give a file name, e.g. {Path(args.out) / 'features.npz'}"
            )
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
            np.savez(handle, names=np.array(names), features=features.numpy())
        print(f"saved {len(names)} embeddings of dimension {features.shape[1]} to {args.out}")


if __name__ == "__main__":
    main()
