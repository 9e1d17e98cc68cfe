"""Benchmarks, run on purpose (never in tests): numbers measured side by side in one run.

    python -m handclip.benchmark [--steps 3] [--batch 8] [--skip-model]

1. Data: decoding a full-size 11k image (1600x1200 JPEG) and resizing it, against reading the
   resized cache that `prepare` writes: images per second each, and the ratio.
2. Model: one training step (forward + backward + AdamW) of the real ViT-B/32 architecture
   (random weights, `CLIPConfig()` defaults) under several freeze policies: seconds per step
   and the ratio to `full`. fp32 on a CPU, bf16 autocast on a GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _rate(function, items) -> float:
    start = time.perf_counter()
    for item in items:
        function(item)
    return len(items) / (time.perf_counter() - start)


def bench_data(count: int = 24) -> list[tuple[str, str, str]]:
    from handclip.data.images import build_cache, cache_dir, load_rgb
    from handclip.data.synthetic import generate_hands
    from handclip.data.transforms import eval_transform

    transform = eval_transform(224, 224, [0.5] * 3, [0.5] * 3)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        generate_hands(root, seed=0, plan={"dorsal right": [(5, count)]}, aspects=["dorsal right"])
        names = [f"Hands/{p.name}" for p in sorted((root / "Hands").glob("*.jpg"))]
        build_cache(root, names, 258)
        full = _rate(lambda n: transform(load_rgb(root / n)), names)
        cached = _rate(lambda n: transform(load_rgb(cache_dir(root, 258) / n)), names)
    return [
        ("decode + transform, 1600x1200 JPEG", f"{full:.1f} images/s", "1.00x"),
        ("decode + transform, 258 px cache", f"{cached:.1f} images/s", f"{cached / full:.2f}x"),
    ]


def bench_model(steps: int = 3, batch: int = 8) -> list[tuple[str, str, str]]:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from handclip.losses import contrastive_loss
    from handclip.model import Full, LastN, TextFrozen, apply_freeze
    from handclip.model.hf import HFBackbone

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    size = CLIPConfig().vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    model = HFBackbone(CLIPModel(CLIPConfig()), None, processor, "random ViT-B/32").to(device)
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    tokens = torch.randint(0, 49405, (batch, 16), device=device)
    tokens[:, -1] = 49407
    policies = [
        ("full", Full()),
        ("text_frozen", TextFrozen()),
        ("last_n vision_blocks=4", LastN(vision_blocks=4, text_blocks=0)),
        ("last_n vision_blocks=0", LastN(vision_blocks=0, text_blocks=0)),
    ]
    rows, reference = [], None
    for label, policy in policies:
        report = apply_freeze(model, policy)
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

        def step(optimiser=optimiser):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = contrastive_loss(model.encode_image(pixels), model.encode_text(tokens), model.logit_scale)
            loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)

        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        reference = reference or seconds
        rows.append((f"ViT-B/32 step, {label} ({report.trainable / 1e6:.1f}M trainable)",
                     f"{seconds:.2f} s/step (batch {batch})", f"{reference / seconds:.2f}x"))  # fmt: skip
    return rows


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args(argv)
    import torch

    table = Table(title=f"HandCLIP benchmarks ({'GPU' if torch.cuda.is_available() else 'CPU'}, "
                        f"{torch.get_num_threads()} threads)")  # fmt: skip
    for column in ("what", "measured", "speed vs first row"):
        table.add_column(column)
    for row in bench_data():
        table.add_row(*row)
    if not args.skip_model:
        for row in bench_model(args.steps, args.batch):
            table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
