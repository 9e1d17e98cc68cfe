"""Benchmarks, run on purpose (never in tests): numbers measured side by side in one run.

    python -m handclip.benchmark [--steps 5] [--batch 32] [--json FILE] [--policies full,last_2] [--skip-data]

1. Data: decoding a full-size 11k image (1600x1200 JPEG) and resizing it, against reading the
   resized cache that `prepare` writes: images per second each, and the ratio.
2. Training: one epoch (a warm-up batch, then `--steps` timed batches, rated by the median batch)
   of the real ViT-B/32 architecture (random weights, `CLIPConfig()` defaults) on the same pre-made
   images and captions, by four implementations side by side: a plain PyTorch loop over HF `CLIPModel` (its own loss),
   open_clip's `ViT-B-32` with `ClipLoss` (context 77, its own), HandCLIP's `FineTuner` under
   Lightning, and the same with the caches (`handclip_cached`: the frozen image prefix stored in
   float16 before the epoch, a frozen text tower encoded once per distinct caption); the plain loop
   runs first and again last in each policy, and ratios are to the mean of its two epochs. Policies:
   full; text_frozen; last_4 / last_2 (the top n vision blocks, the vision final norm and
   projection; text tower frozen); projection (the vision projection; text tower frozen); every
   policy also trains logit_scale. samples/s, the ratio to the plain loop, and peak memory (CUDA
   allocator peak, or the process's resident set on a CPU, which only grows). fp32 on a CPU,
   bf16 autocast on a GPU.
"""

from __future__ import annotations

import argparse
import os
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
        build_cache(root, names, 258, root / "derived")
        full = _rate(lambda n: transform(load_rgb(root / n)), names)
        cached = _rate(lambda n: transform(load_rgb(cache_dir(root / "derived", 258) / n)), names)
    return [
        ("decode + transform, 1600x1200 JPEG", f"{full:.1f} images/s", "1.00x"),
        ("decode + transform, 258 px cache", f"{cached:.1f} images/s", f"{cached / full:.2f}x"),
    ]


POLICIES = ("full", "text_frozen", "last_4", "last_2", "projection")
IMPLEMENTATIONS = ("plain", "open_clip", "handclip", "handclip_cached")


def _policy(name: str, depth: int = 12):
    """HandCLIP's policy for a benchmark name. Below text_frozen the text tower stays frozen, and
    last_n trains the top n vision blocks, the vision final norm and projection (and logit_scale)."""
    from handclip.model import Full, TextFrozen
    from handclip.model.freeze import FreezePolicy

    if name == "full":
        return Full()
    if name == "text_frozen":
        return TextFrozen()
    blocks = int(name[5:]) if name.startswith("last_") else 0

    class VisionTop(FreezePolicy):  # read from the layer groups: the vision projection (depth 0) and below
        def trains(self, group, parameter_name: str) -> bool:
            return group.tower == "vision" and group.kind != "embeddings" and group.depth <= blocks

    return VisionTop()


def _lock_open_clip(model, name: str) -> None:
    """The same policy through open_clip's own locking (LiT's `lock_image_tower`, `lock_text_tower`), as an open_clip
    user writes it: text_frozen locks the text tower; last_n and projection also lock all but the image tower's
    top n + 1 groups (the projection, then the top block with its final norm, ...). logit_scale trains."""
    if name == "full":
        return
    model.lock_text_tower(unlocked_layers=0)
    if name != "text_frozen":
        model.lock_image_tower(unlocked_groups=(int(name[5:]) if name.startswith("last_") else 0) + 1)


class _Peak:
    """Peak memory while a row runs: CUDA's allocator peak, or the process's resident set sampled every 20 ms."""

    def __init__(self, device):
        self.device, self.peak, self._stop = device, 0.0, None

    def __enter__(self):
        import threading

        import psutil
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        process, self._stop = psutil.Process(), threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss / 2**20)
                self._stop.wait(0.02)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()


class _Bench:
    """One model, one data set, one batch size; a steady-state epoch per implementation and policy."""

    def __init__(self, steps: int, batch: int, seed: int = 0):
        import torch
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        from handclip.model.hf import HFBackbone

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.steps, self.batch = steps, batch
        torch.manual_seed(seed)
        config = CLIPConfig()
        size = config.vision_config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.backbone = HFBackbone(CLIPModel(config), None, processor, "random ViT-B/32 (CLIPConfig defaults)")
        self.backbone.to(self.device)
        self.depth = config.vision_config.num_hidden_layers
        # one epoch: a warm-up batch, then `steps` timed batches; captions from 8 templates' worth of sequences
        count = batch * (steps + 1)
        generator = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(count, 3, size, size, generator=generator)
        distinct = torch.randint(0, 49405, (8, 16), generator=generator)
        distinct[:, 0], distinct[:, -1] = 49406, 49407
        self.captions = torch.randint(0, 8, (count,), generator=generator)
        self.input_ids = distinct[self.captions]
        self.identities = torch.arange(count) % max(count // 4, 2)

    def batches(self):
        for start in range(0, len(self.pixels), self.batch):
            yield slice(start, start + self.batch)

    def _autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _timed(self, step) -> float:
        """samples/s of the median timed batch of one epoch (the first batch warms up)."""
        import torch

        marks = []
        for number, chosen in enumerate(self.batches()):
            if number >= 1:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())
            step(chosen)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return median_rate([*marks, time.perf_counter()], self.batch)

    def plain(self, policy: str) -> float:
        import torch

        from handclip.model import apply_freeze

        apply_freeze(self.backbone, _policy(policy, self.depth))
        model = self.backbone.model
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

        def step(chosen):
            with self._autocast():
                out = model(
                    input_ids=self.input_ids[chosen].to(self.device), pixel_values=self.pixels[chosen].to(self.device),
                    return_loss=True,
                )  # fmt: skip
            out.loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)

        return self._timed(step)

    def open_clip(self, policy: str) -> float:
        import open_clip
        import torch

        torch.manual_seed(0)
        model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
        model.to(self.device).train()
        _lock_open_clip(model, policy)
        loss = open_clip.ClipLoss()
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        tokens = torch.zeros(len(self.input_ids), model.context_length, dtype=torch.long)
        tokens[:, : self.input_ids.shape[1]] = self.input_ids  # open_clip pads to its context (77)

        def step(chosen):
            with self._autocast():
                image, text, scale = model(self.pixels[chosen].to(self.device), tokens[chosen].to(self.device))[:3]
                value = loss(image, text, scale)
            value.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)

        return self._timed(step)

    def handclip(self, policy: str, cached: bool = False) -> float:
        import functools
        import tempfile

        import lightning as L
        import torch
        from torch.utils.data import DataLoader

        from handclip.data.activations import ActivationStore
        from handclip.losses import ContrastiveLoss, Objective
        from handclip.model import apply_freeze
        from handclip.model.caching import TextCache, frozen_prefix, prefix_digest, text_frozen
        from handclip.train.module import FineTuner
        from handclip.train.optim import Optimization, warmup_cosine

        chosen_policy = _policy(policy, self.depth)
        apply_freeze(self.backbone, chosen_policy)
        optimization = Optimization(
            lr=1e-6, weight_decay=0.0, head_lr_multiplier=1.0, optimizer=functools.partial(torch.optim.AdamW),
            schedule=functools.partial(warmup_cosine, warmup=0),
        )  # fmt: skip
        module = FineTuner(self.backbone, Objective({"clip": ContrastiveLoss()}), optimization)
        groups = frozen_prefix(self.backbone, chosen_policy) if cached else 0
        if cached and text_frozen(self.backbone, chosen_policy):
            module.forward_path.text_cache = TextCache()
        folder = tempfile.TemporaryDirectory()
        store = None
        if groups:
            store = ActivationStore(folder.name, {"weights": prefix_digest(self.backbone, groups), "groups": groups},
                                    1, len(self.pixels), "float16")  # fmt: skip
            with torch.no_grad(), self._autocast():
                store.ensure(
                    lambda view, i: self.backbone.image_prefix(self.pixels[i].to(self.device), groups).float(),
                    self.batch, "filling the cache",
                )  # fmt: skip
            module.forward_path.prefix = groups
        items = _Items(self, store)
        loader = DataLoader(items, batch_size=self.batch, shuffle=False, collate_fn=items.collate)
        timer = _epoch_timer()
        trainer = L.Trainer(
            max_epochs=1, accelerator=self.device.type, devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            precision="bf16-mixed" if self.device.type == "cuda" else "32-true", callbacks=[timer],
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=loader)
        folder.cleanup()
        return median_rate(timer.marks, self.batch)


class _Items:
    """The benchmark's samples as HandCLIP batches: pixels, or stored hidden states."""

    def __init__(self, bench: _Bench, store):
        self.bench, self.store = bench, store

    def __len__(self) -> int:
        return len(self.bench.pixels)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict:
        import torch

        bench = self.bench
        batch = {"identities": bench.identities[indices], "index": torch.tensor(indices)}
        batch["input_ids"] = bench.input_ids[indices]
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        if self.store is None:
            batch["pixel_values"] = bench.pixels[indices]
        else:
            batch["hidden"] = self.store.batch(0, indices)
        return batch


def median_rate(marks: list[float], batch: int) -> float:
    """samples/s of the median step, from the times each timed step started and the last one ended: robust
    to a step that a shared machine slowed down, where the epoch's mean is not."""
    import statistics

    return batch / statistics.median(b - a for a, b in zip(marks, marks[1:], strict=False))


def _epoch_timer():
    import lightning as L

    class EpochTimer(L.Callback):
        """The start of every batch from the second (loading included), and the end of the epoch's last."""

        def __init__(self):
            self.marks: list[float] = []

        def on_train_batch_start(self, trainer, module, batch, batch_index):
            if batch_index >= 1:
                self._sync(module)
                self.marks.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, module):
            self._sync(module)
            self.marks.append(time.perf_counter())

        @staticmethod
        def _sync(module):
            import torch

            if module.device.type == "cuda":
                torch.cuda.synchronize()

    return EpochTimer()


def bench_training(
    steps: int = 5, batch: int = 32, policies=POLICIES, implementations=IMPLEMENTATIONS, say=print
) -> list[dict]:
    """Rows {implementation, policy, samples_per_s, ratio_to_plain, peak_memory_mb}, measured in this process."""
    import gc
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - imported first: it sets its loggers' levels on import
    import torch

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    noise = r".*(LeafSpec|does not have many workers|litlogger|no `val_dataloader`).*"
    warnings.filterwarnings("ignore", message=noise)
    bench = _Bench(steps, batch)
    rows = []
    for policy in policies:
        measured = []
        # the plain loop runs first and again last: on a CPU the rows after a change of policy drift faster
        # over the first epochs (measured: the same loop at 3.95 first and 4.83 samples/s last, the rows
        # between them in between), so each ratio is to the mean of the two plain epochs, which bracket the
        # others in time (the faster of the two would favour plain by half the drift)
        order = [*implementations, "plain"] if "plain" in implementations else list(implementations)
        for implementation in order:
            gc.collect()
            with _Peak(bench.device) as peak:
                if implementation == "plain":
                    rate = bench.plain(policy)
                elif implementation == "open_clip":
                    rate = bench.open_clip(policy)
                else:
                    rate = bench.handclip(policy, cached=implementation == "handclip_cached")
            say(f"{policy:12s} {implementation:16s} {rate:8.2f} samples/s")
            measured.append((implementation, rate, peak.peak))
        epochs = [m for m in measured if m[0] == "plain"]
        if epochs:
            plain = ("plain", sum(m[1] for m in epochs) / len(epochs), max(m[2] for m in epochs))
            say(f"{policy:12s} plain epochs {', '.join(f'{m[1]:.2f}' for m in epochs)}: {plain[1]:.2f} samples/s")
            measured = [plain, *[m for m in measured if m[0] != "plain"]]
        for implementation, rate, peak in measured:
            rows.append({
                "implementation": implementation, "policy": policy, "samples_per_s": round(rate, 3),
                "ratio_to_plain": round(rate / plain[1], 3) if epochs else None, "peak_memory_mb": round(peak, 1),
            })  # fmt: skip
    del bench
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed batches per row (after one warm-up batch)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, of {', '.join(POLICIES)}")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--json", metavar="FILE", help="write the training rows as a JSON list")
    parser.add_argument("--skip-data", action="store_true", help="skip the image decoding benchmark")
    parser.add_argument("--skip-model", action="store_true", help="skip the training benchmark")
    args = parser.parse_args(argv)
    policies, implementations = args.policies.split(","), args.implementations.split(",")
    for value, allowed, key in (
        (policies, POLICIES, "--policies"),
        (implementations, IMPLEMENTATIONS, "--implementations"),
    ):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            parser.error(f"{key}: {unknown[0]!r} is not one of {', '.join(allowed)}")
    if "plain" not in implementations:
        parser.error("--implementations must include plain: every ratio is to it")
    for key, value in (("--steps", args.steps), ("--batch", args.batch)):
        if value < 1:
            parser.error(f"{key}={value}: give at least 1 (each row is rated by its median timed batch)")
    if args.skip_data and args.skip_model:
        parser.error("--skip-data and --skip-model together leave nothing to measure: give at most one")
    if args.json:  # checked before the minutes of measuring, not after
        target = Path(args.json)
        if target.is_dir():
            parser.error(f"--json {args.json} is a folder: give a file name, e.g. {target / 'bench.json'}")
        if not target.resolve().parent.is_dir():
            parser.error(f"--json {args.json}: the folder {target.parent} does not exist")
        if not os.access(target.resolve().parent, os.W_OK):
            parser.error(f"--json {args.json}: the folder {target.parent} is not writable")
    import torch

    console = Console()
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    load = " load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    if not args.skip_data:
        table = Table(title=f"image decoding ({where})")
        for column in ("what", "measured", "speed vs first row"):
            table.add_column(column)
        for row in bench_data():
            table.add_row(*row)
        console.print(table)
    if args.skip_model:
        return
    rows = bench_training(args.steps, args.batch, policies, implementations, say=console.log)
    table = Table(title=f"training ViT-B/32 (random weights), batch {args.batch}, steady state ({where},{load})")
    for column in ("policy", "implementation", "samples/s", "vs plain", "peak memory MB"):
        table.add_column(column, justify="left" if column in ("policy", "implementation") else "right")
    for row in rows:
        table.add_row(row["policy"], row["implementation"], f"{row['samples_per_s']:.2f}",
                      "-" if row["ratio_to_plain"] is None else f"{row['ratio_to_plain']:.2f}x",
                      f"{row['peak_memory_mb']:.0f}")  # fmt: skip
    console.print(table)
    if args.json:
        from handclip.io import write_json_atomic

        write_json_atomic(args.json, rows)
        console.print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
