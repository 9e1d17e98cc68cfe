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
from pathlib import Path
from typing import Any

import torch

from handclip.errors import HandClipError
from handclip.io import load_checkpoint_file, write_json_atomic, write_text_atomic
from handclip.train.config import Components, check_config, objective_facts, run_signature


def precision_for(setting: str) -> str:
    """`auto` means bf16-mixed on a GPU and 32-true on a CPU (bf16 matmuls crawl on CPUs)."""
    if setting != "auto":
        return setting
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def check_resume(path: str, checkpoint: Mapping, signature: Mapping) -> None:
    """Refuse to resume a checkpoint written under another backbone, freeze policy, projection or objective."""
    saved = (checkpoint.get("handclip") or {}).get("signature")
    if saved is None:
        return
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
    """init_from: the weights of a checkpoint, nothing else (fresh optimiser and schedule)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise HandClipError(
            f"init_from={path}: its weights do not fit this model ({str(error).splitlines()[1].strip()}); "
            "use the same backbone, projection and loss as the run that wrote it"
        ) from None


def run_training(cfg: Mapping, run_dir: str | Path, record_as: Mapping | None = None) -> dict:
    """Train and evaluate one configuration; returns the metrics written to metrics.json.

    `record_as` is the configuration written as `config.yaml` where it differs from the one run: a
    resume that dropped `init_from` (its checkpoint holds those weights already) records it as asked,
    so a later comparison of settings sees the run as it was asked for.

    Nothing is written into the run directory before the configuration is checked, the directory
    is locked for this process, and the resume is found to be possible.
    """
    import yaml

    from handclip.train.rundir import RunLock, check_run_dir, resolve_resume

    parts = check_config(cfg)  # before anything heavy
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    with RunLock(run_dir):
        resume, checkpoint = resolve_resume(run_dir, cfg.get("ckpt_path"), bool(cfg["overwrite"]))
        if checkpoint is not None:
            check_resume(resume, checkpoint, run_signature(cfg))
            from handclip.train.ema import check_resume as check_ema_resume

            check_ema_resume(resume, checkpoint, parts.ema_decay)
            where = f"epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')}"
            print(f"resuming {resume}: {where}", flush=True)
            _say_what_happens_to_the_schedule(checkpoint, cfg)
        resume_step = int(checkpoint.get("global_step", 0)) if checkpoint is not None else None
        del checkpoint  # Lightning reads the file itself; do not hold a second copy while it does
        initial = initial_weights(cfg["init_from"]) if cfg.get("init_from") else None

        def record() -> None:  # once the data is read and the objective built: nothing was refused
            saved = {**cfg, "init_from": (record_as or cfg).get("init_from")}
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
            (run_dir / "failed.json").unlink(missing_ok=True)

        return _train(cfg, parts, run_dir, resume, resume_step, initial, record)


def _train(
    cfg: Mapping, parts: Components, run_dir: Path, resume: str | None, resume_step: int | None, initial: dict | None,
    record: Callable[[], None],
) -> dict:  # fmt: skip
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from handclip.eval.evaluator import Evaluator
    from handclip.eval.feature import ImageEncoder
    from handclip.model.freeze import apply_freeze
    from handclip.train.callbacks import AtomicCheckpointIO, ExactResume, FollowFreezeSchedule, GracefulStop
    from handclip.train.module import FineTuner

    started = time.time()
    console = _console()
    _quiet_libraries()
    L.seed_everything(int(cfg["seed"]), workers=True, verbose=False)

    # data first: a dataset that cannot be used fails before the weights load
    datamodule = parts.data
    rows = datamodule.prepare(parts.facts.image_size)

    backbone = parts.backbone.load(cfg["paths"].get("cache"))
    heads = parts.projection.apply(backbone)
    report = apply_freeze(backbone, parts.freeze, always_trainable=heads)
    console.print(report.to_rich())
    parts.compute.apply(backbone)
    objective = parts.objective(**objective_facts(
        backbone.facts, datamodule.num_identities, datamodule.identity_keys, _text_tower_digest(cfg, backbone),
    ))  # fmt: skip
    record()
    write_text_atomic(run_dir / "freeze.txt", report.to_text() + "\n")
    encode = ImageEncoder(parts.eval.feature, objective)
    datamodule.attach(backbone, parts.eval.batch_size)

    metrics: dict[str, Any] = {
        "trainable_parameters": report.trainable,
        "total_parameters": report.total,
        "data/bad_images": len(json.loads(datamodule.manifest.with_suffix(".json").read_text()).get("bad_images", [])),
    }
    evaluate = Evaluator(rows, datamodule.root, datamodule.prepare_settings.cache_size, parts.eval,
                         datamodule.captioner, encode)  # fmt: skip
    module = FineTuner(
        backbone,
        objective,
        parts.optimization,
        datamodule.val_rows,
        heads,
        run_signature(cfg),
        parts.freeze,
        encode,
        compute=parts.compute,
    )
    if initial is not None:
        load_initial_weights(module, cfg["init_from"], initial)
    from handclip.train.caches import attach_caches, restore_frozen_prefix

    epochs = int(cfg["trainer"]["max_epochs"])
    if resume is not None and datamodule.activation_cache:  # a resume has no init_from: the starting weights are
        restore_frozen_prefix(module, backbone, resume, parts.freeze, epochs)  # in the checkpoint
    metrics["cache/prefix_groups"] = attach_caches(
        datamodule, evaluate, module, backbone, parts.freeze, epochs, console
    )["prefix_groups"]

    results: dict[str, dict] = {}
    if parts.eval.baseline:
        results["baseline"] = _baseline(evaluate, backbone, run_dir, resume)
        metrics.update({f"baseline/{k}": v for k, v in results["baseline"]["metrics"].items()})
        _print_baseline(console, results["baseline"]["metrics"])

    ema_callbacks = []
    if parts.ema_decay is not None:
        from handclip.train.ema import WeightEMA

        ema_callbacks.append(WeightEMA(parts.ema_decay, parts.freeze))
    # with an EMA, its validation score picks the best epoch: its weights are the ones tested and exported
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor="ema/val/rank1" if ema_callbacks else "val/rank1",
        mode="max",
        save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
    )  # fmt: skip
    # Lightning's save_last only writes when a new best is saved, so "last" would go stale once
    # val/rank1 stops improving: a monitor-free callback writes it after every epoch instead
    latest = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False,
    )  # fmt: skip
    logger = parts.logger(save_dir=str(run_dir))
    if resume_step is not None and hasattr(logger, "keep_until"):
        logger.keep_until(resume_step)  # the history up to the checkpoint stays; what came after is redone
    from handclip.train.loggers import log_figures, log_run_facts

    log_run_facts(logger, cfg, report)
    stop = GracefulStop(run_dir / "checkpoints" / "last.ckpt")
    schedule_callbacks = []
    if parts.freeze.changes_within(int(cfg["trainer"]["max_epochs"])):
        plan = parts.freeze.plan(backbone, int(cfg["trainer"]["max_epochs"]), heads)
        console.print("unfreeze plan: " + "; ".join(f"from epoch {e}, {r.trainable:,} trainable" for e, r in plan))
        schedule_callbacks.append(FollowFreezeSchedule(parts.freeze, heads, run_dir / "freeze.txt"))
    trainer = parts.trainer(
        precision=precision_for(str(cfg["trainer"]["precision"])), default_root_dir=run_dir, logger=logger,
        callbacks=[checkpoints, latest, stop, ExactResume(), *schedule_callbacks, *ema_callbacks,
                   *parts.callbacks],
        plugins=[AtomicCheckpointIO()],
    )  # fmt: skip
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    except SystemExit:  # Lightning ends a run stopped by Ctrl-C with exit status 1
        _exit_if_stopped(stop)
        raise
    _exit_if_stopped(stop)  # a signal during the last validation: training is complete, but stop as asked
    if trainer.is_global_zero:  # one writer
        _write_artifacts(objective, backbone, run_dir, datamodule.identity_keys)

    # the final evaluation: training is done and saved, so a signal now ends the run with a message
    with _stop_on_signal():
        best = checkpoints.best_model_path
        averaged = None
        if best:
            saved = load_checkpoint_file(best)
            module.load_state_dict(saved["state_dict"])
            from handclip.model.averaging import ema_weights

            averaged = ema_weights(saved) if ema_callbacks else None
            del saved
        elif ema_callbacks:
            averaged = ema_callbacks[0].weights()
        if averaged is not None:  # the raw weights of the same checkpoint, scored too, reported under raw/
            results["fine-tuned (raw)"] = evaluate(backbone)
            metrics.update({f"raw/{k}": v for k, v in results["fine-tuned (raw)"]["metrics"].items()})
            backbone.load_state_dict({**backbone.state_dict(), **averaged})  # the EMA: tested, shown in figures
        final = evaluate(backbone)
        results["fine-tuned"] = final
        metrics.update(final["metrics"])
        metrics["wall_time_s"] = time.time() - started  # this process
        metrics["train_time_s"] = module.train_seconds()  # fit time, summed over resumes
        metrics["peak_memory_mb"] = _peak_memory_mb()
        _print_tables(console, results)
        from handclip.eval.plots import run_figures

        log_figures(logger, run_figures(results, backbone, datamodule.captioner, run_dir))
        payload = {
            "metrics": metrics,
            "runs": {label: r["runs"] for label, r in results.items()},
            "cmc": {label: r["cmc"] for label, r in results.items()},
            "freeze": report.as_dict(),
            "eval_feature": parts.eval.feature,
            "manifest": str(datamodule.manifest),
            "best_checkpoint": best,
            # the weights behind test/*: the EMA's (raw/* holds the raw weights' scores) or the raw ones
            "weights": "ema" if averaged is not None else "raw",
        }
        write_json_atomic(run_dir / "metrics.json", payload)
        from lightning.pytorch.loggers import CSVLogger

        if not isinstance(logger, CSVLogger):  # the CSV logger's final numbers are metrics.json
            logger.log_metrics(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.global_step
            )
            logger.finalize("success")
        console.print(f"[bold]done[/bold] in {metrics['wall_time_s']:.0f}s: {_summary(metrics)}; results in {run_dir}")
        return metrics


def _text_tower_digest(cfg: Mapping, backbone) -> str | None:
    """The digest of the text tower's weights as loaded, where the objective reads or writes identity texts."""
    wanted = "texts_from" in json.dumps(cfg["loss"]) or "IdentityPrompts" in json.dumps(cfg["loss"])
    if not wanted:
        return None
    from handclip.model.caching import tower_digest

    return tower_digest(backbone, "text")


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


def _say_what_happens_to_the_schedule(checkpoint: Mapping, cfg: Mapping) -> None:
    before, now = (checkpoint.get("handclip") or {}).get("max_epochs"), cfg["trainer"]["max_epochs"]
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


def _baseline(evaluate, backbone, run_dir: Path, resume: str | None) -> dict:
    """The untrained model's scores (kept in baseline.json: a resumed run does not score them again)."""
    from handclip.eval.evaluator import saveable

    path = run_dir / "baseline.json"
    if resume and path.is_file():
        return json.loads(path.read_text())
    baseline = evaluate(backbone)
    write_json_atomic(path, saveable(baseline))
    return baseline


def _print_baseline(console, shown: Mapping) -> None:
    test = f", test Rank-1 {100 * shown['test/rank1']:.1f}% mAP {100 * shown['test/mAP']:.1f}%"
    console.print(f"baseline (untrained): val Rank-1 {100 * shown['val/rank1']:.1f}%"
                  + (test if "test/rank1" in shown else ""))  # fmt: skip


def _print_tables(console, results: dict) -> None:
    from handclip.eval.tables import protocol_table, text_table

    final = results["fine-tuned"]["metrics"]
    for prefix in ("test", "test_all"):
        if f"{prefix}/rank1" in final:
            console.print(protocol_table(results, prefix))
    console.print(text_table(results))


def _summary(metrics: Mapping) -> str:
    return ", ".join(
        f"{name} {100 * metrics[key]:.1f}% (baseline {100 * metrics['baseline/' + key]:.1f}%)"
        if "baseline/" + key in metrics
        else f"{name} {100 * metrics[key]:.1f}%"
        for name, key in (("test Rank-1", "test/rank1"), ("test mAP", "test/mAP"))
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
