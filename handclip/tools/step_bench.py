"""Samples/s, peak memory and MFU of one training step under compute settings, run on purpose (never in tests).

    python -m handclip.tools.step_bench --model vit_b32 --policy last_2 --batch 64 \\
        --settings accumulate=1 accumulate=2 accumulate=2,checkpointing [--steps 6] [--repeat 2] [--json FILE]

Each setting runs in its own process (so peak memory is its own): a random-weight model of the
named architecture, a fixed random batch of images and 16-token captions, the contrastive step
of training (`handclip.train.accumulate.contrastive_step`) and AdamW, a warm-up step, then at
least `--steps` timed steps (torch.utils.benchmark's Timer: `handclip.train.timing.time_batches`),
rated by their mean. On a GPU: bf16 autocast, fused AdamW, peak allocated memory and model
FLOPs utilisation (FLOPs from the backbone, `Backbone.forward_flops`, peak from the GPU's name or `--peak-tflops`).
On a CPU: fp32, and the peak resident memory of the process above what it held before the first step.
Ctrl-C or SIGTERM stops it at once (exit status 130 or 143); the rows printed so far are what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from handclip.train.timing import Stopped, stopping_on_signals, time_batches

MODELS = ("tiny", "vit_b32", "vit_b16")
POLICIES = {"full": None, "text_frozen": None, "last_2": 2, "last_4": 4, "projection": 0}


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(name: str):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor

    from handclip.model.hf import HFBackbone, tiny_clip_config

    if name == "tiny":
        import yaml

        with open("conf/backbone/tiny.yaml") as spec:
            config = tiny_clip_config(yaml.safe_load(spec)["config"])
    else:
        patch = 32 if name == "vit_b32" else 16
        config = CLIPConfig(vision_config={"patch_size": patch})
    from transformers import CLIPModel

    torch.manual_seed(0)
    size = config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return HFBackbone(CLIPModel(config), None, processor, name)


def _policy(name: str):
    from handclip.model import Full, LastN, TextFrozen

    if name == "full":
        return Full()
    if name == "text_frozen":
        return TextFrozen()
    return LastN(vision_blocks=POLICIES[name], text_blocks=0)


def measure(model: str, policy: str, batch: int, steps: int, setting: dict, peak_tflops: float | None) -> dict:
    """One setting's numbers (in this process)."""
    import torch

    from handclip.losses import ContrastiveLoss, Objective
    from handclip.model import apply_freeze
    from handclip.model.forward import Forward
    from handclip.tools.mfu import backbone_step_flops, mfu, peak_flops
    from handclip.train.accumulate import contrastive_step
    from handclip.train.compute import Compute
    from handclip.train.optim import fused_if_cuda

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backbone = _model(model).to(device).train()
    apply_freeze(backbone, _policy(policy))
    compute = Compute(
        accumulate=setting.get("accumulate", 1), gradient_checkpointing=setting.get("checkpointing", False),
        compile=setting.get("compile", False),
    )  # fmt: skip
    compute.apply(backbone)
    objective = Objective({"clip": ContrastiveLoss()}).to(device)
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6, **fused_if_cuda(torch.optim.AdamW, trainable))
    generator = torch.Generator().manual_seed(0)
    size = backbone.image_size
    tokens = torch.randint(1, 49405, (batch, 16), generator=generator)
    tokens[:, -1] = 49407
    data = {
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator).to(device),
        "input_ids": tokens.to(device), "attention_mask": torch.ones_like(tokens).to(device),
        "identities": torch.arange(batch, device=device),
    }  # fmt: skip

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            _, _, backward = contrastive_step(Forward(backbone), objective, data, compute.accumulate, device)
        backward.backward()
        optimizer.step()

    before = _rss_mb()
    step()  # warm-up (and compilation)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rate = batch / time_batches(step, steps).mean
    flops = backbone_step_flops(backbone, text_tokens=16)
    peak = peak_flops(torch.cuda.get_device_name(), peak_tflops) if cuda else None
    # accumulation re-runs the forward of what trains: that work is not counted as model FLOPs
    row = {
        "model": model, "policy": policy, "batch": batch, **setting, "samples_per_s": round(rate, 2),
        "device": torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads",
    }  # fmt: skip
    if cuda:
        row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        utilisation = mfu(rate, flops, peak)
        row["mfu"] = round(utilisation, 4) if utilisation is not None else None
    else:
        row["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        row["step_memory_mb"] = round(_peak_rss_mb() - before, 1)
    row["gflop_per_sample"] = round(flops / 1e9, 2) if flops else None
    return row


def _setting(text: str) -> dict:
    setting: dict = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        setting[key] = int(value) if value else True
    unknown = set(setting) - {"accumulate", "checkpointing", "compile"}
    if unknown:
        raise SystemExit(f"--settings: {sorted(unknown)[0]} is not one of accumulate=N, checkpointing, compile")
    return setting


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="vit_b32")
    parser.add_argument("--policy", choices=list(POLICIES), default="full")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--settings", nargs="+", default=["accumulate=1", "accumulate=2"])
    parser.add_argument("--repeat", type=int, default=1, help="run the settings this many times, interleaved")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak, when its name is unknown")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one setting
    args = parser.parse_args(argv)
    try:
        with stopping_on_signals():
            _run(args)
    except Stopped as stop:
        print(f"{stop.signal_name}: step_bench stopped" + (f"; nothing written to {args.json}" if args.json else ""),
              file=sys.stderr)  # fmt: skip
        raise SystemExit(stop.exit_status) from None


def _run(args) -> None:
    if args.one is not None:
        row = measure(args.model, args.policy, args.batch, args.steps, _setting(args.one), args.peak_tflops)
        print(json.dumps(row))
        return
    rows = []
    for text in [t for _ in range(args.repeat) for t in args.settings]:
        _setting(text)
        command = [sys.executable, "-m", "handclip.tools.step_bench", "--one", text, "--model", args.model,
                   "--policy", args.policy, "--batch", str(args.batch), "--steps", str(args.steps)]  # fmt: skip
        if args.peak_tflops:
            command += ["--peak-tflops", str(args.peak_tflops)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{text}: {done.stderr.strip().splitlines()[-1]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.repeat > 1:  # on a shared machine the best of the interleaved runs is the least disturbed
        best = {}
        for row in rows:
            key = tuple((k, v) for k, v in row.items() if k in ("accumulate", "checkpointing", "compile"))
            if key not in best or row["samples_per_s"] > best[key]["samples_per_s"]:
                best[key] = row
        rows = list(best.values())
        print("best of each:", *map(json.dumps, rows), sep="\n")
    if args.json:
        from handclip.io import write_json_atomic

        write_json_atomic(args.json, rows)


if __name__ == "__main__":
    main()
