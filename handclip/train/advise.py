"""How deep to unfreeze, before paying for the sweep: `python -m handclip.advise experiment=NAME [KEY=VALUE ...]`.

Each candidate depth (`freeze=last_n freeze.vision_blocks=D`, every D from 0 to the image tower's blocks; the text
tower as `--text-blocks` says, by default as many of its blocks as the experiment's own policy trains: 0 for a
frozen text tower) is trained briefly, `--epochs` epochs (default 2) of
the experiment's own recipe, from the stored activations of its frozen prefix (`data.activation_cache`, as every
run): the frozen part is run once per image, so a depth costs what its trained part costs. Each short run is
scored on validation only (never a test run), and the depths are ranked by their validation mAP gain over the
untrained model. Beside each: its trainable parameters and what the full run would take (its measured seconds
per epoch x the experiment's `trainer.max_epochs`). The command it advises names `freeze.text_blocks` too.

    python -m handclip.advise experiment=demo
    python -m handclip.advise experiment=dorsal_hand --epochs 1 --depths 0,4,8,12

The short runs are kept in `${paths.runs}/advise/<name>-<time>/` (a run folder each) with `advice.csv`, the table.
A configuration that cannot run is refused in one `error:` line before anything is written. What the advice was
worth on the demo, against the real sweep, is in docs/freezing.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from handclip.errors import ConfigError, HandClipError, exit_with

TRAIN = Path(__file__).resolve().parents[2] / "train.py"
METRIC = "val/mAP"


@dataclass
class Candidate:
    depth: int
    text_blocks: int
    overrides: list[str]
    gain: float | None = None
    score: float | None = None
    trainable: int | None = None
    seconds_per_epoch: float | None = None
    error: str = ""


def plan(overrides: list[str], epochs: int, depths: list[int] | None, text_blocks: int | None) -> tuple[dict, list]:
    """(the experiment's resolved config, the candidates), checked before anything runs."""
    from omegaconf import OmegaConf

    from handclip.train.evaluate import compose

    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: a short run needs at least 1 epoch")
    cfg = OmegaConf.to_container(compose(overrides), resolve=True)
    from handclip.build import build

    spec = build(cfg["backbone"], "backbone")
    facts = spec.facts()
    blocks, text = facts.depth("vision"), facts.depth("text")
    chosen = sorted(set(depths)) if depths is not None else list(range(blocks + 1))
    if not chosen:
        raise ConfigError(f"--depths names no depth: give numbers of image blocks from 0 to {blocks}, e.g. 0,2,4")
    wrong = [d for d in chosen if not 0 <= d <= blocks]
    if wrong:
        raise ConfigError(f"--depths: {wrong[0]} is not a number of the image tower's blocks (0 to {blocks})")
    text_blocks = _text_blocks_trained(spec, cfg) if text_blocks is None else text_blocks
    if not 0 <= text_blocks <= text:
        raise ConfigError(f"--text-blocks {text_blocks}: the text tower has {text} blocks")
    candidates = []
    for depth in chosen:
        candidates.append(Candidate(depth, text_blocks, [
            *overrides, "freeze=last_n", f"freeze.vision_blocks={depth}", f"freeze.text_blocks={text_blocks}",
            f"trainer.max_epochs={epochs}", "eval.test=false", "eval.wise_ft=null", "eval.baseline=true",
            "eval.curve=false", "eval.ranked=0", "eval.smooth=1", "logger=csv",
        ]))  # fmt: skip
    return cfg, candidates


def _text_blocks_trained(spec, cfg: dict) -> int:
    """How many of the text tower's blocks the experiment's own freeze policy ever trains (0 for text_frozen), found
    on the model's skeleton (its config only, no weights): the text tower stays as the recipe has it."""
    from handclip.model.caching import never_trains
    from handclip.model.freeze import apply_freeze
    from handclip.tools.export import build_freeze

    skeleton = spec.skeleton()
    policy = build_freeze(cfg["freeze"])
    apply_freeze(skeleton, policy)
    epochs = int(cfg["trainer"]["max_epochs"])
    return sum(not never_trains(group, policy, epochs) for group in skeleton.layer_groups("text")
               if group.kind == "block")  # fmt: skip


def _new_folder(wanted: Path) -> Path:
    """`wanted`, made; `wanted-2`, `-3`, ... when another advice started in the same second (two at once)."""
    wanted.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = wanted if n == 1 else wanted.with_name(f"{wanted.name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise HandClipError(f"{wanted}: a thousand advice folders of this second exist")


def _train(candidate: Candidate, folder: Path, name: str) -> None:
    """One short run, in its own process (a run's end is a process's end: loggers, caches, signals)."""
    command = [sys.executable, str(TRAIN), *candidate.overrides, f"paths.runs={folder}", f"run_name={name}"]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    run = folder / name
    if result.returncode != 0:
        candidate.error = _last_error(result.stderr)
        return
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    candidate.score = metrics.get(METRIC)
    base = metrics.get(f"baseline/{METRIC}")
    candidate.gain = None if candidate.score is None or base is None else candidate.score - base
    candidate.trainable = metrics.get("trainable_parameters")
    epochs = int(next(o for o in candidate.overrides if o.startswith("trainer.max_epochs=")).split("=")[1])
    candidate.seconds_per_epoch = metrics.get("train_time_s", 0.0) / epochs


def advise(overrides: list[str], epochs: int = 2, depths: list[int] | None = None, text_blocks: int | None = None,
           console=None) -> Path:  # fmt: skip
    """Run the short runs, print the ranked table, write advice.csv; return the advice folder."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg, candidates = plan(overrides, epochs, depths, text_blocks)
    check = subprocess.run([sys.executable, str(TRAIN), *candidates[0].overrides, "dry_run=true"],
                           capture_output=True, text=True)  # fmt: skip
    if check.returncode != 0:  # the experiment itself cannot run: nothing is written
        raise HandClipError(_last_error(check.stderr))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = _new_folder(Path(cfg["paths"]["runs"]) / "advise" / f"{cfg.get('name', 'run')}-{stamp}")
    started = time.time()
    for candidate in candidates:
        console.print(f"advise: {epochs} epoch(s) with the top {candidate.depth} image blocks training ...")
        _train(candidate, folder, f"depth_{candidate.depth}")
    full = int(cfg["trainer"]["max_epochs"])
    ranked = sorted(candidates, key=lambda c: (c.gain is None, -(c.gain or 0.0), c.depth))
    table = Table(title=f"how deep to unfreeze: validation mAP gain after {epochs} epoch(s) of each depth, ranked "
                        f"({time.time() - started:.0f} s for the advice)")  # fmt: skip
    for heading in ("rank", "freeze.vision_blocks", "trainable", "val mAP gain", f"full run ({full} epochs)"):
        table.add_column(heading, justify="right")
    rows = []
    for rank, c in enumerate(ranked, 1):
        cost = None if c.seconds_per_epoch is None else c.seconds_per_epoch * full
        table.add_row(str(rank) if c.gain is not None else "-", str(c.depth),
                      f"{c.trainable:,}" if c.trainable is not None else "-",
                      f"{100 * c.gain:+.1f}" if c.gain is not None else f"failed: {c.error}",
                      f"{cost:.0f} s" if cost is not None else "-")  # fmt: skip
        rows.append({"rank": rank if c.gain is not None else "", "vision_blocks": c.depth,
                     "text_blocks": c.text_blocks, "trainable": c.trainable,
                     "val_mAP_gain": c.gain, "val_mAP": c.score, "full_run_seconds": cost,
                     "error": c.error})  # fmt: skip
    console.print(table)
    from handclip.io import atomic_write

    with atomic_write(folder / "advice.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = ranked[0]
    console.print(f"advice in {folder / 'advice.csv'}: try `python train.py {' '.join(overrides)} freeze=last_n "
                  f"freeze.vision_blocks={best.depth} freeze.text_blocks={best.text_blocks}` first")  # fmt: skip
    if all(c.gain is None for c in candidates):
        raise HandClipError(f"every short run failed; see {folder}")
    return folder


def _last_error(stderr: str) -> str:
    """What a failed train.py said: its `error:` line, else the exception's last line (not Hydra's advice)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("error:")]
    if said:
        return said[-1].removeprefix("error: ")[:300]
    raised = [line for line in lines if not line.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    return (raised[-1] if raised else "train.py failed without a message")[:300]


def _numbers(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers such as 0,2,4") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="train.py's settings: experiment=NAME, key=value")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each short run (default 2)")
    parser.add_argument("--depths", type=_numbers, default=None, help="image blocks to try, e.g. 0,2,4 (default all)")
    parser.add_argument("--text-blocks", type=int, default=None, help="text blocks that train (default all)")
    args = parser.parse_intermixed_args(argv)  # options before, between or after the settings
    try:
        advise(args.overrides, args.epochs, args.depths, args.text_blocks)
    except HandClipError as error:
        exit_with(error)


if __name__ == "__main__":
    main()
