"""Image embeddings of a folder of images with an exported model (for downstream search).

    python -m handclip.features MODEL_DIR IMAGE_DIR [--out features.npz]

prints one line per image (name and the first values of its L2-normalised embedding) and,
with --out, saves `names` and `features` arrays. Uses transformers only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from handclip.data.readers import IMAGE_SUFFIXES


def embed_folder(model_dir: str | Path, image_dir: str | Path, batch_size: int = 32):
    """(names, L2-normalised image embeddings [n, dim]) of the images in `image_dir`."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    from handclip.data.images import load_rgb
    from handclip.model.hf import HFBackbone

    paths = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    backbone = HFBackbone(CLIPModel.from_pretrained(model_dir), None, processor, str(model_dir)).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images = [load_rgb(p) for p in paths[start : start + batch_size]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            out.append(torch.nn.functional.normalize(backbone.encode_image(pixels), dim=-1))
    return [p.name for p in paths], torch.cat(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("image_dir")
    parser.add_argument("--out", help="save names and features to this .npz file")
    args = parser.parse_args(argv)
    names, features = embed_folder(args.model_dir, args.image_dir)
    for name, row in zip(names, features, strict=True):
        print(name, " ".join(f"{v:+.4f}" for v in row[:8].tolist()), "...")
    if args.out:
        import numpy as np

        from handclip.io import atomic_write

        with atomic_write(args.out, "wb") as handle:  # the name as given: no .npz appended
            np.savez(handle, names=np.array(names), features=features.numpy())
        print(f"saved {len(names)} embeddings of dimension {features.shape[1]} to {args.out}")


if __name__ == "__main__":
    main()
