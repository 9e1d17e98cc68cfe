"""One training run from a resolved configuration: check, prepare, baseline, fit, test, report.

`train.py` composes the configuration with Hydra and calls `run_training`; everything a run
writes lands in its run directory: `config.yaml` (resolved), `freeze.txt`, `metrics.json`,
`checkpoints/`, and the logger's files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from handclip.errors import ConfigError, HandClipError
from handclip.io import load_checkpoint_file, write_json_atomic, write_text_atomic
from handclip.train.config import RunSpec, check_config, objective_facts


def precision_for(setting: str) -> str:
    """`auto` means bf16-mixed on a GPU and 32-true on a CPU (bf16 matmuls crawl on CPUs)."""
    if setting != "auto":
        return setting
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def check_resume(path: str, checkpoint: Mapping, signature: Mapping) -> None:
    """Refuse to resume a checkpoint written under another backbone, freeze policy, projection, objective or
    evaluation protocol (its checkpoint choice and baseline were scored by that protocol)."""
    saved = (checkpoint.get("handclip") or {}).get("signature")
    if saved is None:
        return
    saved = dict(saved)
    if "evaluation" not in saved:  # written before runs stated a protocol: HandCLIP's was the only one
        saved["evaluation"] = {"protocol": "handclip", "flip_tta": (signature.get("evaluation") or {}).get("flip_tta")}
    changed = [key for key in signature if saved.get(key) != signature[key]]
    if changed:
        key = changed[0]
        raise HandClipError(
            f"cannot resume {path}: {key} differs from the run that wrote it "
            f"(checkpoint: {saved.get(key)}, now: {signature[key]}). To start a new run from "
            f"these weights with a fresh optimiser, use init_from={path} with a new run_name"
        )


def initial_weights(path: str) -> dict:
    """init_from's weights, read (and checked) before anything of the run is written."""
    if not Path(path).is_file():
        raise HandClipError(f"init_from={path}: no such checkpoint file")
    checkpoint = load_checkpoint_file(path)
    if "state_dict" not in checkpoint:
        raise HandClipError(f"init_from={path}: not a training checkpoint (no state_dict)")
    return checkpoint["state_dict"]


def load_initial_weights(module, path: str, state: Mapping) -> None:
    """init_from: the weights of a checkpoint, nothing else (fresh optimiser and schedule, and a loss term's record
    of its own run, such as LwF's targets, which the new run makes from the weights it begins with)."""
    own = module.state_dict()
    records = {f"objective.terms.{name}.{buffer}" for name, term in module.objective.terms.items()
               for buffer in term.run_records}  # fmt: skip
    own = {k: v for k, v in own.items() if k not in records}
    state = {k: v for k, v in state.items() if k not in records}
    misfits = [f"{len(names)} {what}, e.g. {names[0]}" for what, names in (
        ("missing", [k for k in own if k not in state]),
        ("not in this model", [k for k in state if k not in own]),
        ("of another shape", [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]),
    ) if names]  # fmt: skip
    if misfits:  # one line, however many weights differ
        raise HandClipError(
            f"init_from={path}: its weights do not fit this model ({'; '.join(misfits)}); "
            "use the same backbone, projection and loss as the run that wrote it"
        )
    module.load_state_dict(state, strict=False)  # every weight is there (checked above); the records stay


@dataclass
class Resume:
    """The checkpoint a run continues from, and the optimiser step it holds."""

    path: str
    step: int


@dataclass
class Assembled:
    """A run's parts once loaded: the data, the model as it will train, its objective, module and evaluator."""

    datamodule: Any
    backbone: Any
    heads: list
    report: Any  # the freeze table at the start
    objective: Any
    module: Any
    evaluate: Any
    metrics: dict
    initial: dict | None = None  # the starting weights of what trains (kept for WiSE-FT), or None


def run_training(cfg: Mapping, run_dir: str | Path, record_as: Mapping | None = None) -> dict:
    """Train and evaluate one configuration; returns the metrics written to metrics.json.

    `record_as` is the configuration written as `config.yaml` where it differs from the one run: a
    resume that dropped `init_from` (its checkpoint holds those weights already) records it as asked,
    so a later comparison of settings sees the run as it was asked for.

    Nothing is written into the run directory before the configuration is checked, the directory
    is locked for this process, and the resume is found to be possible.
    """
    import yaml

    from handclip.train.rundir import RunLock, check_run_dir

    spec = check_config(cfg)  # before anything heavy
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    with RunLock(run_dir):
        resume = _resume(spec, run_dir)
        if resume is not None and spec.eval.curve:
            from handclip.train.callbacks import TestCurve

            TestCurve.check(run_dir / "curve.json")  # before anything is written
        initial = initial_weights(spec.init_from) if spec.init_from else None

        def record() -> None:  # once the data is read and the objective built: nothing was refused
            saved = {**spec.config, "init_from": (record_as or spec.config).get("init_from")}
            # the run begins anew: results of an earlier run in this folder no longer describe it
            (run_dir / "metrics.json").unlink(missing_ok=True)
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
            (run_dir / "failed.json").unlink(missing_ok=True)

        return _train(spec, run_dir, resume, initial, record)


def _resume(spec: RunSpec, run_dir: Path) -> Resume | None:
    """The checkpoint to continue from (checked against this run's settings), or None for a fresh start."""
    from handclip.train.ema import check_resume as check_ema_resume
    from handclip.train.rundir import resolve_resume

    path, checkpoint = resolve_resume(run_dir, spec.ckpt_path, spec.overwrite)
    if checkpoint is None:
        return None
    check_resume(path, checkpoint, spec.signature)
    check_ema_resume(path, checkpoint, spec.ema_decay)
    _say_what_happens_to_the_schedule(checkpoint, spec.epochs, spec.freeze)
    print(f"resuming {path}: epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')}", flush=True)
    return Resume(path, int(checkpoint.get("global_step", 0)))  # Lightning reads the file again itself


def _train(spec: RunSpec, run_dir: Path, resume: Resume | None, initial: dict | None,
           record: Callable[[], None]) -> dict:  # fmt: skip
    import lightning as L

    from handclip.train.ema import TrainedWeights
    from handclip.train.loggers import run_logger

    started = time.time()
    console = _console()
    _quiet_libraries()
    L.seed_everything(spec.seed, workers=True, verbose=False)
    run = assemble(spec, run_dir, resume, initial, record, console)
    results: dict[str, dict] = {}
    if spec.eval.baseline:
        results["baseline"] = _baseline(run.evaluate, run.backbone, run_dir, resume)
        run.metrics.update({f"baseline/{k}": v for k, v in results["baseline"]["metrics"].items()})
        from handclip.eval.protocol import headline

        _print_baseline(console, results["baseline"]["metrics"], headline(spec.eval.protocol, run.datamodule.galleries))
    # raw weights, or their EMA: selected, tested, exported
    weights = TrainedWeights(spec.ema_decay, spec.freeze, (spec.eval.select, spec.eval.smooth))
    lightning_logger = spec.logger(save_dir=str(run_dir))
    logger = run_logger(lightning_logger)
    if resume is not None:
        logger.keep_until(resume.step)  # the history up to the checkpoint stays; what came after is redone
    logger.log_run_facts(spec.config, run.report)
    trainer, stop, best = _trainer(spec, run, weights, lightning_logger, run_dir, console)
    try:
        trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=resume.path if resume else None)
    except SystemExit:  # Lightning ends a run stopped by Ctrl-C with exit status 1
        _exit_if_stopped(stop)
        raise
    _exit_if_stopped(stop)  # a signal during the last validation: training is complete, but stop as asked
    trained = _training_facts(spec, run, weights, trainer)  # before the final evaluation loads other weights
    if trainer.is_global_zero:  # one writer
        _write_artifacts(run.objective, run.backbone, run_dir, run.datamodule.identity_keys)

    # the final evaluation: training is done and saved, so a signal now ends the run with a message
    with _stop_on_signal():
        from handclip.eval.protocol import statement
        from handclip.eval.tables import print_tables
        from handclip.train.final import choice_line, closing_warnings, final_evaluation

        last = str(run_dir / "checkpoints" / "last.ckpt")
        found, extra = final_evaluation(spec, run, weights, best.best_model_path, last, results, run.initial, run_dir)
        metrics = {**run.metrics, **found, "wall_time_s": time.time() - started,
                   "train_time_s": run.module.train_seconds(), "peak_memory_mb": _peak_memory_mb()}  # fmt: skip
        warned = closing_warnings(metrics, (results.get("baseline") or {}).get("metrics"), trained)
        galleries = run.datamodule.galleries
        stated = statement(spec.eval.protocol, galleries, spec.eval.feature, spec.eval.flip_tta)
        print_tables(console, results, galleries, stated)
        _log_figures(logger, results, run, run_dir)
        write_json_atomic(run_dir / "metrics.json", {
            "metrics": metrics, "runs": {label: r["runs"] for label, r in results.items()},
            "cmc": {label: r["cmc"] for label, r in results.items()}, "freeze": run.report.as_dict(),
            "eval_feature": spec.eval.feature, "manifest": str(run.datamodule.manifest), "galleries": galleries,
            "protocol": stated, "best_checkpoint": best.best_model_path,
            "warnings": warned,  # plain sentences: the reported model is (close to) the untrained one, and why
            **extra,  # weights: the EMA's or the raw ones behind test/* (raw/* holds the raw ones'); wise_ft: the mix
        })  # fmt: skip
        logger.log_final(metrics, trainer.global_step)
        line = choice_line(metrics, spec.eval.select, spec.eval.smooth)
        if line:
            console.print(line)
        console.print(f"[bold]done[/bold] in {metrics['wall_time_s']:.0f}s: {_summary(metrics, stated['headline'])}; "
                      f"results in {run_dir}")
        for warning in warned:  # last, where a reader of the run's end sees them
            console.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False)
        return metrics


def _training_facts(spec: RunSpec, run: Assembled, weights, trainer):
    """What training did, read from the module, the EMA and the unfreeze schedule's callback (closing warnings)."""
    from handclip.train.callbacks import FollowFreezeSchedule
    from handclip.train.final import TrainingFacts, first_unfreeze

    histories = [list(run.module.selection.history)]
    if weights.ema is not None:
        histories.append(list(weights.ema.selection.history))
    follow = next((c for c in trainer.callbacks if isinstance(c, FollowFreezeSchedule)), None)
    return TrainingFacts(spec.eval.select, histories, first_unfreeze(spec.freeze, spec.epochs),
                         follow.unfroze_at if follow is not None else None)  # fmt: skip


def assemble(spec: RunSpec, run_dir: Path, resume: Resume | None, initial: dict | None, record: Callable[[], None],
             console) -> Assembled:  # fmt: skip
    """Data, model, freeze policy, objective, module, evaluator and caches, in the order that keeps a seed's
    random numbers: the data first (a dataset that cannot be used fails before the weights load)."""
    from handclip.eval.evaluator import Evaluator
    from handclip.eval.feature import ImageEncoder
    from handclip.model.caching import tower_digest
    from handclip.model.freeze import apply_freeze
    from handclip.train.caches import attach_caches, restore_frozen_prefix
    from handclip.train.module import FineTuner
    from handclip.train.selection import Selection

    datamodule = spec.data
    rows = datamodule.prepare(spec.facts.image_size)
    backbone = spec.backbone.load(spec.cache_dir)
    heads = spec.projection.apply(backbone)
    report = apply_freeze(backbone, spec.freeze, always_trainable=heads)
    console.print(report.to_rich())
    spec.compute.apply(backbone)
    digest = tower_digest(backbone, "text") if spec.text_tower_digest else None
    objective = spec.objective(**objective_facts(
        backbone.facts, datamodule.num_identities, datamodule.identity_keys, digest,
        {task: prompts for task, (_, _, prompts) in datamodule.prompt_tasks().items()},
        {task: prompts for task, (_, _, prompts) in datamodule.prompt_tasks(named=True).items()},
    ))  # fmt: skip
    encode = ImageEncoder(spec.eval.feature, objective)
    datamodule.attach(backbone, spec.eval.batch_size, labels=objective.needs_labels)
    bad = json.loads(datamodule.manifest.with_suffix(".json").read_text()).get("bad_images", [])
    metrics: dict[str, Any] = {"trainable_parameters": report.trainable, "total_parameters": report.total,
                               "data/bad_images": len(bad)}  # fmt: skip
    evaluate = Evaluator(rows, datamodule.root, datamodule.prepare_settings.image_cache, spec.eval,
                         datamodule.captioner, encode, datamodule.source.prompts())  # fmt: skip
    selection = Selection(spec.eval.select, spec.eval.smooth)
    module = FineTuner(backbone, objective, spec.optimization, datamodule.val_rows, heads, spec.signature, spec.freeze,
                       encode, compute=spec.compute, selection=selection)  # fmt: skip
    if initial is not None:
        load_initial_weights(module, spec.init_from, initial)
    if objective.needs_text and not datamodule.retrieval:  # can the text side tell the identities apart at all?
        _check_captions(backbone, datamodule, spec, metrics, console)
    teachers = [term for term in objective.terms.values() if term.needs_teacher]
    if teachers:  # what the starting model makes of the training images, before any step
        features = datamodule.training_features(backbone, spec.eval.batch_size)
        for term in teachers:
            term.teach(backbone, features)
    record()  # nothing was refused: the run directory is written from here on
    write_text_atomic(run_dir / "freeze.txt", report.to_text() + "\n")
    if resume is not None and datamodule.activation_cache:  # a resume has no init_from: the starting weights are
        restore_frozen_prefix(module, backbone, resume.path, spec.freeze, spec.epochs)  # in the checkpoint
    caches = attach_caches(datamodule, evaluate, module, backbone, spec.freeze, spec.epochs, console)
    metrics["cache/prefix_groups"] = caches["prefix_groups"]
    initial = None
    anchored = [term for term in objective.terms.values() if term.needs_anchor]
    if spec.eval.wise_ft is not None or anchored:  # the weights WiSE-FT mixes with and an anchor pulls towards: as
        from handclip.model.caching import trained_names  # the run starts (init_from included)
        from handclip.train.final import INITIAL, keep_initial_weights

        names = trained_names(backbone, spec.freeze, spec.epochs)
        initial = keep_initial_weights(backbone, names, run_dir, resumed=resume is not None)
        for term in anchored:
            if initial is None:
                raise HandClipError(f"{run_dir} holds no starting weights ({INITIAL}): it began before they were "
                                    "kept, so the anchor has nothing to pull towards; start the run again")  # fmt: skip
            term.anchor_to(backbone, initial)
    if spec.eval.wise_ft is None:
        initial = None  # kept for the anchor only: WiSE-FT is off
    return Assembled(datamodule, backbone, heads, report, objective, module, evaluate, metrics, initial)


def _trainer(spec: RunSpec, run: Assembled, weights, logger, run_dir: Path, console):
    """(the Lightning trainer, its Ctrl-C/SIGTERM handler, the best-checkpoint callback)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from handclip.train.callbacks import AtomicCheckpointIO, ExactResume, FollowFreezeSchedule, GracefulStop, TestCurve

    folder = run_dir / "checkpoints"
    best = ModelCheckpoint(dirpath=folder, filename="best", monitor=weights.monitor, mode="max", save_top_k=1,
                           auto_insert_metric_name=False, enable_version_counter=False)  # fmt: skip
    # Lightning's save_last only writes when a new best is saved, so "last" would go stale once the
    # monitored score stops improving: a monitor-free callback writes it after every epoch instead
    latest = ModelCheckpoint(dirpath=folder, filename="last", save_top_k=1, enable_version_counter=False)
    stop = GracefulStop(folder / "last.ckpt")
    callbacks = [best, latest, stop, ExactResume(), *weights.callbacks, *spec.callbacks]
    if spec.eval.curve:  # the test curve, for studies of selection; recorded after the checkpoints are written
        callbacks.append(TestCurve(run.evaluate, run_dir / "curve.json"))
    if spec.freeze.changes_within(spec.epochs):
        plan = spec.freeze.plan(run.backbone, spec.epochs, run.heads)
        when = "unfreeze plan" if not hasattr(spec.freeze, "observe") else "unfreeze plan if validation stalls soonest"
        console.print(f"{when}: " + "; ".join(f"from epoch {e}, {r.trainable:,} trainable" for e, r in plan))
        callbacks.append(FollowFreezeSchedule(spec.freeze, run.heads, run_dir / "freeze.txt"))
    trainer = spec.trainer(precision=precision_for(spec.precision), default_root_dir=run_dir, logger=logger,
                           callbacks=callbacks, plugins=[AtomicCheckpointIO()])  # fmt: skip
    return trainer, stop, best


def _log_figures(logger, results: dict, run: Assembled, run_dir: Path) -> None:
    """The run's figures: saved beside metrics.json, sent to the logger, then closed."""
    import matplotlib.pyplot as plt

    from handclip.eval.plots import run_figures

    figures = run_figures(results, run.backbone, run.datamodule.captioner, run_dir, run.evaluate)
    try:
        logger.log_figures(figures)
    finally:
        for figure in figures.values():
            plt.close(figure)


def _write_artifacts(objective, backbone, run_dir: Path, identity_keys: list[str]) -> None:
    """What the objective's terms leave behind (learned identity texts), from the weights training ended
    with: `<name>.safetensors` in the run directory, with what they were made for in its header (the
    training identities in order, the text tower's digest), which a reading run checks."""
    from safetensors.torch import save

    from handclip.io import atomic_write
    from handclip.model.caching import tower_digest

    found = objective.artifacts(backbone)
    if not found:
        return
    facts = {"identities": json.dumps(identity_keys), "text_tower": tower_digest(backbone, "text")}
    for name, tensor in found.items():
        with atomic_write(run_dir / f"{name}.safetensors", "wb") as out:
            out.write(save({name: tensor.detach().cpu().contiguous()}, metadata=facts))


@contextmanager
def _stop_on_signal():
    """Ctrl-C or SIGTERM after training: say what is kept and exit 1 / 143, never 0."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt as interrupt:
        name = str(interrupt) or "SIGINT"
        print(f"\n{name} during the final evaluation: training is complete and its checkpoints are kept; "
              "run the same command with ckpt_path=last to evaluate it", flush=True)  # fmt: skip
        raise SystemExit(143 if name == "SIGTERM" else 1) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _say_what_happens_to_the_schedule(checkpoint: Mapping, now: int, freeze) -> None:
    before = (checkpoint.get("handclip") or {}).get("max_epochs")
    if before is not None and before != now and (freeze.changes_within(before) or freeze.changes_within(now)):
        # an unfreeze schedule is planned over the run's epochs: the optimiser's groups (when each starts) and the
        # stored activations (what never trains) would not be those of the checkpoint
        raise ConfigError(
            f"trainer.max_epochs={now}, but the run was planned over {before} epochs, and its unfreeze schedule "
            f"({freeze.label}) sets when each group starts to train from that: resume with "
            f"trainer.max_epochs={before}, or start a new run (init_from) to train longer"
        )
    if before is not None and before != now:
        print(
            f"note: trainer.max_epochs was {before}, now {now}: the warm-up and cosine schedule is laid over the "
            f"new number of steps, and the learning rate continues from step {checkpoint.get('global_step')} of it "
            "(a longer run raises it again). Give the old value to finish the run as it was planned",
            flush=True,
        )


def _exit_if_stopped(stop) -> None:
    """Ctrl-C exits 1; SIGTERM exits 143 (128 + 15), what schedulers read as terminated, never as success."""
    if stop.signal_name == "SIGTERM":
        raise SystemExit(143)
    if stop.signal_name:
        raise SystemExit(1)


def _baseline(evaluate, backbone, run_dir: Path, resume: Resume | None) -> dict:
    """The untrained model's scores (kept in baseline.json: a resumed run does not score them again)."""
    from handclip.eval.evaluator import saveable
    from handclip.io import DamagedFileError, read_record

    path = run_dir / "baseline.json"
    if resume and path.is_file():
        try:
            saved = read_record(path)
            if not all(isinstance(saved.get(key), dict) for key in ("metrics", "runs", "cmc")):
                raise DamagedFileError(f"{path} is damaged: it lacks the scores HandCLIP writes there")
            return saved
        except DamagedFileError as error:
            print(f"{error}: the untrained model is scored again", flush=True)
    baseline = evaluate(backbone)
    write_json_atomic(path, saveable(baseline))
    return baseline


def _check_captions(backbone, datamodule, spec: RunSpec, metrics: dict, console) -> None:
    """The training identities' captions, embedded before any step: how well they stand apart (a metric), and a
    warning with the fix when they do not and the text tower cannot learn to (handclip.eval.separability)."""
    from handclip.eval.separability import advice, caption_identifiability
    from handclip.model.caching import text_frozen

    found = caption_identifiability(backbone, datamodule.train_rows, datamodule.captioner)
    if not found:
        return
    metrics["text/caption_identifiability"] = found["identifiability"]
    metrics["text/caption_identifiability_chance"] = found["chance"]
    said = advice(found, text_trains=not text_frozen(backbone, spec.freeze, spec.epochs))
    if said is not None:
        kind, words = said
        colour = "yellow" if kind == "warning" else "cyan"
        console.print(f"[bold {colour}]{kind}:[/bold {colour}] {words}", highlight=False)


def _print_baseline(console, shown: Mapping, head: str = "test") -> None:
    from handclip.eval.protocol import headline_name

    name = headline_name(head)
    test = ""
    if f"{head}/rank1" in shown:  # eval.test=false scores validation only
        test = f", {name} Rank-1 {100 * shown[f'{head}/rank1']:.1f}% mAP {100 * shown[f'{head}/mAP']:.1f}%"
    console.print(f"baseline (untrained): val Rank-1 {100 * shown['val/rank1']:.1f}%{test}")


def _summary(metrics: Mapping, head: str = "test") -> str:
    """The headline evaluation's Rank-1 and mAP (and the baseline's), for the run's last line."""
    from handclip.eval.protocol import headline_name

    name = headline_name(head)
    return ", ".join(
        f"{label} {100 * metrics[key]:.1f}% (baseline {100 * metrics['baseline/' + key]:.1f}%)"
        if "baseline/" + key in metrics
        else f"{label} {100 * metrics[key]:.1f}%"
        for label, key in ((f"{name} Rank-1", f"{head}/rank1"), (f"{name} mAP", f"{head}/mAP"))
        if key in metrics
    )


def _quiet_libraries() -> None:
    """Keep the console to what a user reads: our tables, progress bars and warnings."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # ExactResume skips the batches already trained on, so a mid-epoch resume is exact
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")


def _console():
    from rich.console import Console

    return Console()


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
