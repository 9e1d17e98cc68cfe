"""Benchmarks, run on purpose (never in tests): numbers measured side by side in one run.

    python -m handclip.benchmark [--steps 5] [--batch 32] [--json FILE] [--policies full,last_2] [--skip-data]
                                 [--model vit_b32|tiny]

1. Data: decoding a full-size 11k image (1600x1200 JPEG) and resizing it, against reading the
   resized cache that `prepare` writes: images per second each (the median of torch.utils.benchmark's
   blocked_autorange), and the ratio.
2. Training: warm-up batches, then at least `--steps` timed batches (torch.utils.benchmark's Timer,
   `handclip.train.timing.time_batches`), rated by the median batch, of the real ViT-B/32
   architecture (random weights, `CLIPConfig()` defaults) on the same pre-made
   images and captions, by four implementations side by side: a plain PyTorch loop over HF `CLIPModel` (its own loss),
   open_clip's `ViT-B-32` with `ClipLoss` (context 77, its own), HandCLIP's `FineTuner` under
   Lightning, and the same with the caches (`handclip_cached`: the frozen image prefix stored in
   float16 before the epoch, a frozen text tower encoded once per distinct caption); the plain loop
   runs first and again last in each policy, and ratios are to the mean of its two epochs. Policies:
   full; text_frozen; last_4 / last_2 (the top n vision blocks, the vision final norm and
   projection; text tower frozen); projection (the vision projection; text tower frozen); every
   policy also trains logit_scale. samples/s, the ratio to the plain loop, and peak memory (CUDA
   allocator peak, or the process's resident set on a CPU, which only grows). fp32 on a CPU,
   bf16 autocast on a GPU. `--model tiny`: a small random CLIP, for trying the command out.

Ctrl-C or SIGTERM stops it within the batch that runs (exit status 130 or 143), showing the rows measured.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

from handclip.train.timing import Stopped, stopping_on_signals, time_batches, timer_paced_loop


def _rate(function, items) -> float:
    """Items per second of `function`, going round `items`: the median block of torch.utils.benchmark's
    blocked_autorange (on all the process's threads), so a block the machine slowed down does not count."""
    import torch
    from torch.utils.benchmark import Timer

    cycle = itertools.cycle(items)
    timer = Timer(stmt="function(next(cycle))", globals={"function": function, "cycle": cycle},
                  num_threads=torch.get_num_threads())  # fmt: skip
    return 1 / timer.blocked_autorange(min_run_time=2.0).median


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
MODELS = ("vit_b32", "tiny")
# a small CLIP (as conf/backbone/tiny.yaml): the command in seconds, not minutes; its numbers mean little
TINY = {
    "projection_dim": 64,
    "vision_config": {"image_size": 96, "patch_size": 16, "hidden_size": 64, "intermediate_size": 256,
                      "num_hidden_layers": 4, "num_attention_heads": 4},
    "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "max_position_embeddings": 77},
}  # fmt: skip


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

    def __init__(self, steps: int, batch: int, seed: int = 0, model: str = "vit_b32"):
        import torch
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        from handclip.model.hf import HFBackbone

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.steps, self.batch = steps, batch
        torch.manual_seed(seed)
        config = CLIPConfig(**TINY) if model == "tiny" else CLIPConfig()
        size = config.vision_config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        name = "random tiny CLIP" if model == "tiny" else "random ViT-B/32 (CLIPConfig defaults)"
        self.backbone = HFBackbone(CLIPModel(config), None, processor, name)
        self.backbone.to(self.device)
        self.depth = config.vision_config.num_hidden_layers
        # the batches a row goes round: as many as it times at least, and a warm-up; captions from 8 templates' worth
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
        """samples/s of the median timed batch, `step` going round the batches."""
        batches = itertools.cycle(list(self.batches()))
        return self.batch / time_batches(lambda: step(next(batches)), self.steps).median

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
        timer = timer_paced_loop(self.steps)  # one epoch, as long as the Timer asks for batches
        trainer = L.Trainer(
            max_epochs=1, accelerator=self.device.type, devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            precision="bf16-mixed" if self.device.type == "cuda" else "32-true", callbacks=[timer],
        )  # fmt: skip
        try:
            trainer.fit(module, train_dataloaders=loader)
        finally:
            folder.cleanup()
        return self.batch / timer.result().median


class _Items:
    """The benchmark's samples as HandCLIP batches: pixels, or stored hidden states; gone round again and again
    (one long epoch: the Timer decides when it has measured enough)."""

    ROUNDS = 10**6

    def __init__(self, bench: _Bench, store):
        self.bench, self.store = bench, store

    def __len__(self) -> int:
        return len(self.bench.pixels) * self.ROUNDS

    def __getitem__(self, index: int) -> int:
        return index % len(self.bench.pixels)

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


def bench_training(
    steps: int = 5, batch: int = 32, policies=POLICIES, implementations=IMPLEMENTATIONS, say=print,
    rows: list | None = None, model: str = "vit_b32",
) -> list[dict]:  # fmt: skip
    """Rows {implementation, policy, samples_per_s, ratio_to_plain, peak_memory_mb}, measured in this process and
    added to `rows` as they are (a policy's ratios once its second plain epoch is in: None until then)."""
    import gc
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - imported first: it sets its loggers' levels on import
    import torch

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    noise = r".*(LeafSpec|does not have many workers|litlogger|no `val_dataloader`).*"
    warnings.filterwarnings("ignore", message=noise)
    bench = _Bench(steps, batch, model=model)
    rows = [] if rows is None else rows
    for policy in policies:
        measured = []
        # the plain loop runs first and again last: on a CPU the rows after a change of policy drift faster
        # over the first epochs (measured: the same loop at 3.95 first and 4.83 samples/s last, the rows
        # between them in between), so each ratio is to the mean of the two plain epochs, which bracket the
        # others in time (the faster of the two would favour plain by half the drift)
        order = [*implementations, "plain"] if "plain" in implementations else list(implementations)
        for implementation in order:
            say(f"{policy:12s} {implementation:16s} measuring ...")
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
            rows.append(_row(implementation, policy, rate, None, peak.peak))
        epochs = [m for m in measured if m[0] == "plain"]
        if epochs:
            plain = ("plain", sum(m[1] for m in epochs) / len(epochs), max(m[2] for m in epochs))
            say(f"{policy:12s} plain epochs {', '.join(f'{m[1]:.2f}' for m in epochs)}: {plain[1]:.2f} samples/s")
            measured = [plain, *[m for m in measured if m[0] != "plain"]]
        del rows[len(rows) - len(order) :]  # the policy's rows again, with the plain loop's two epochs as one
        for implementation, rate, peak in measured:
            rows.append(_row(implementation, policy, rate, rate / plain[1] if epochs else None, peak))
    del bench
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def _row(implementation: str, policy: str, rate: float, ratio: float | None, peak: float) -> dict:
    return {
        "implementation": implementation, "policy": policy, "samples_per_s": round(rate, 3),
        "ratio_to_plain": None if ratio is None else round(ratio, 3), "peak_memory_mb": round(peak, 1),
    }  # fmt: skip


def _training_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("policy", "implementation", "samples/s", "vs plain", "peak memory MB"):
        table.add_column(column, justify="left" if column in ("policy", "implementation") else "right")
    for row in rows:
        table.add_row(row["policy"], row["implementation"], f"{row['samples_per_s']:.2f}",
                      "-" if row["ratio_to_plain"] is None else f"{row['ratio_to_plain']:.2f}x",
                      f"{row['peak_memory_mb']:.0f}")  # fmt: skip
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed batches per row, at least (after warm-up)")
    parser.add_argument("--model", choices=MODELS, default="vit_b32", help="tiny: a small CLIP, to try it out")
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
    if args.model == "tiny" and "open_clip" in implementations:
        parser.error("--model tiny has no open_clip counterpart: leave open_clip out of --implementations")
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
    try:
        with stopping_on_signals():
            _run(args, policies, implementations)
    except Stopped as stop:
        print(f"{stop.signal_name}: benchmark stopped" + (f"; nothing written to {args.json}" if args.json else ""),
              file=sys.stderr)  # fmt: skip
        raise SystemExit(stop.exit_status) from None


def _run(args, policies: list[str], implementations: list[str]) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

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
    model = "tiny CLIP" if args.model == "tiny" else "ViT-B/32"
    title = f"training {model} (random weights), batch {args.batch}, steady state ({where},{load})"
    rows: list[dict] = []
    try:
        bench_training(args.steps, args.batch, policies, implementations, say=console.log, rows=rows,
                       model=args.model)  # fmt: skip
    except Stopped:
        if rows:  # what was measured before the signal (a policy's ratios only once its plain epochs are in)
            console.print(_training_table(rows, f"{title}: stopped, the rows measured"))
        raise
    console.print(_training_table(rows, title))
    if args.json:
        from handclip.io import write_json_atomic

        write_json_atomic(args.json, rows)
        console.print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
