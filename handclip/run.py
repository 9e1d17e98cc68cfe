"""One training run from a resolved configuration: check, prepare, baseline, fit, test, report.

`train.py` composes the configuration with Hydra and calls `run_training`; everything a run
writes lands in its run directory: `config.yaml` (resolved), `freeze.txt`, `metrics.json`,
`checkpoints/`, and the logger's files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from handclip.errors import ConfigError, HandClipError
from handclip.files import write_text_atomic


def precision_for(setting: str) -> str:
    """`auto` means bf16-mixed on a GPU and 32-true on a CPU (bf16 matmuls crawl on CPUs)."""
    if setting != "auto":
        return setting
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def ensure_synthetic(data: Mapping[str, Any]) -> None:
    """Generate the synthetic dataset at data.root on first use."""
    synthetic = data.get("synthetic")
    root = Path(data["root"])
    if not synthetic or (root / "HandInfo.csv").is_file():
        return
    from handclip.data.synthetic import generate_hands

    width, height = synthetic.get("image_size", [1600, 1200])
    print(f"generating synthetic hands in {root} ({synthetic['identities']} identities) ...", flush=True)
    # generate beside the target, then rename: an interrupted generation leaves no half dataset
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    generate_hands(tmp, int(synthetic["identities"]), int(synthetic.get("seed", 0)), (int(width), int(height)))
    tmp.rename(root)


def _saveable(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _figures(results: dict, final: dict, model, backbone, captioner, run_dir: Path, logger) -> None:
    """CMC curves (baseline vs fine-tuned) and a PCA of test images and captions, as PNG + logger."""
    from handclip.plots import plot_cmc, plot_embeddings
    from handclip.zeroshot import encode_texts

    figures = {}
    if all("test" in r.get("cmc", {}) for r in results.values()):
        figures["cmc"] = plot_cmc({label: r["cmc"]["test"] for label, r in results.items()}, run_dir / "cmc.png")
    features, image_rows = final.get("_features"), final.get("_image_rows")
    test = [
        i
        for i, r in enumerate(image_rows or [])
        if r["split"].startswith(("query", "gallery")) and "_all" not in r["split"]
    ]
    if test and captioner is not None:
        chosen = [image_rows[i] for i in test]
        captions = sorted({(r["identity"], captioner(r)) for r in chosen})
        text = encode_texts(model, backbone.tokenizer, [c for _, c in captions])
        figures["embeddings"] = plot_embeddings(
            features[test], [r["identity"] for r in chosen], text, [i for i, _ in captions], run_dir / "embeddings.png"
        )
    _log_figures(logger, figures)


def _log_figures(logger, figures: dict) -> None:
    import matplotlib.pyplot as plt

    for name, figure in figures.items():
        try:
            if logger is not None and type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log({f"plots/{name}": wandb.Image(figure)})
            elif logger is not None and type(logger).__name__ == "TensorBoardLogger":
                logger.experiment.add_figure(f"plots/{name}", figure)
        finally:
            plt.close(figure)


def text_table(results: dict[str, dict]):
    """Zero-shot attribute accuracy and retrieval recall, baseline → fine-tuned."""
    from rich.table import Table

    labels = list(results)
    table = Table(title=f"language side: zero-shot prompts and retrieval, % ({' → '.join(labels)})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("chance / majority", justify="right")
    names = [
        k
        for k in results[labels[-1]]["metrics"]
        if k.startswith(("zeroshot/", "retrieval/")) and not k.endswith("_majority")
    ]
    for name in names:
        values = " → ".join(f"{100 * r['metrics'][name]:.1f}" for r in results.values() if name in r["metrics"])
        majority = results[labels[-1]]["metrics"].get(name.replace("_accuracy", "_majority"))
        table.add_row(
            name, values, f"{100 * majority:.1f}" if majority is not None and name.endswith("_accuracy") else ""
        )
    return table


def _quiet_libraries() -> None:
    """Keep the console to what a user reads: our tables, progress bars and warnings."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # our sampler skips the batches already trained on, so a mid-epoch resume is exact
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")


def _console():
    from rich.console import Console

    return Console()


def _write_json(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=float))


def evaluate_model(
    model, rows, root, backbone, cache_size: int, eval_cfg: Mapping, include_test: bool = True, captioner=None
) -> dict:
    """Features of every image the protocol needs, then all its scores (see handclip.evaluation)."""
    from handclip.data.dataset import ManifestImages
    from handclip.evaluation import extract_image_features, images_needed, score_protocol
    from handclip.transforms import eval_transform

    image_rows = images_needed(rows, include_test)
    transform = eval_transform(backbone.image_size, backbone.resize_size, backbone.image_mean, backbone.image_std)
    dataset = ManifestImages(image_rows, root, transform, cache_size)
    features = extract_image_features(
        model, dataset, int(eval_cfg.get("batch_size", 64)), flip=bool(eval_cfg.get("flip_tta", False)), progress=True
    )
    result = score_protocol(features, image_rows, rows, include_test)
    result["_features"], result["_image_rows"] = features, image_rows  # for plots; not saved
    if include_test and eval_cfg.get("text", True) and captioner is not None:
        from handclip.zeroshot import text_metrics

        # the test images (and, on 11k, the other aspects' gallery images): never trained on
        test = [i for i, r in enumerate(image_rows) if r["split"] not in ("train", "val")]
        if test:
            chosen = [image_rows[i] for i in test]
            result["metrics"].update(text_metrics(
                features[test], chosen, [captioner(r) for r in chosen], model, backbone.tokenizer
            ))  # fmt: skip
    return result


def build_logger(cfg: Mapping, run_dir: Path):
    from lightning.pytorch import loggers

    kind = cfg["logger"].get("name", "csv")
    if kind == "csv":
        return loggers.CSVLogger(run_dir, name="logs", version="")
    if kind == "tensorboard":
        return loggers.TensorBoardLogger(run_dir, name="tensorboard", version="")
    if kind == "wandb":
        settings = cfg["logger"]
        return loggers.WandbLogger(
            project=settings.get("project", "handclip"), entity=settings.get("entity"),
            tags=list(settings.get("tags") or []), save_dir=str(run_dir),
            offline=settings.get("mode") == "offline", mode=settings.get("mode"),
            name=run_dir.name, id=_stable_wandb_id(run_dir), resume="allow",
            group=(cfg.get("sweep") or {}).get("name"),
        )  # fmt: skip
    raise ConfigError(f"logger.name={kind!r}: choose one of csv, tensorboard, wandb")


def _log_run_facts(logger, cfg: Mapping, report) -> None:
    """The resolved config and the freeze table, sent to the logger."""
    logger.log_hyperparams({k: v for k, v in cfg.items() if k not in ("paths",)})
    if type(logger).__name__ == "WandbLogger":
        import wandb

        table = wandb.Table(columns=["group", "parameters", "trainable"])
        for row in report.rows:
            table.add_data(row.group, row.parameters, row.status)
        logger.experiment.log({"freeze": table})
        logger.experiment.summary["trainable_parameters"] = report.trainable
    elif type(logger).__name__ == "TensorBoardLogger":
        logger.experiment.add_text("freeze", "```\n" + report.to_text() + "\n```")


def _stable_wandb_id(run_dir: Path) -> str:
    """One wandb run id per run directory, kept in a file so a resumed run continues it."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id


def run_signature(cfg: Mapping) -> dict:
    """The settings a resumed run must share with the checkpoint it resumes."""
    return {key: cfg[key] for key in ("backbone", "freeze", "projection")}


def check_resume(path: str, checkpoint: Mapping, signature: Mapping) -> None:
    """Refuse to resume a checkpoint written under another freeze policy, projection or backbone."""
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


def load_initial_weights(module, path: str) -> None:
    """init_from: the model weights of a checkpoint, nothing else (fresh optimiser and schedule)."""
    from handclip.checkpoints import load_checkpoint_file

    state = load_checkpoint_file(path)["state_dict"]
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise HandClipError(
            f"init_from={path}: its weights do not fit this model ({str(error).splitlines()[1].strip()}); "
            "use the same backbone and projection as the run that wrote it"
        ) from None


def run_training(cfg: Mapping, run_dir: str | Path) -> dict:
    """Train and evaluate one configuration; returns the metrics written to metrics.json."""
    from handclip.config_check import check_config
    from handclip.rundir import RunLock, resolve_resume

    facts = check_config(cfg)  # before anything heavy
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        resume, checkpoint = resolve_resume(run_dir, cfg.get("ckpt_path"), bool(cfg.get("overwrite", False)))
        if checkpoint is not None:
            check_resume(resume, checkpoint, run_signature(cfg))
        del checkpoint  # Lightning reads the file itself; do not hold a second copy while it does
        if cfg.get("init_from") and not Path(cfg["init_from"]).is_file():
            raise HandClipError(f"init_from={cfg['init_from']}: no such checkpoint file")
        return _train(cfg, run_dir, facts, resume)


def _train(cfg: Mapping, run_dir: Path, facts: dict, resume: str | None) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from handclip.backbone import load_backbone
    from handclip.checkpoints import load_checkpoint_file
    from handclip.data.prepare import prepare, read_manifest, settings_from_config
    from handclip.evaluation import protocol_table
    from handclip.freeze import apply_freeze
    from handclip.projection import replace_projection
    from handclip.sampling import balanced_sampler_for
    from handclip.training import AtomicCheckpointIO, ClipFineTuner, HandDataModule, SaveOnInterrupt

    started = time.time()
    console = _console()
    _quiet_libraries()
    L.seed_everything(int(cfg["seed"]), workers=True, verbose=False)

    data = cfg["data"]
    ensure_synthetic(data)
    settings = settings_from_config(data, facts["image_size"])
    manifest = prepare(settings)
    rows = read_manifest(manifest)
    if data.get("sampler", "random") == "identity_balanced":
        balanced_sampler_for(rows, data)  # fillable? needs the split's identities, not the weights

    backbone = load_backbone(cfg["backbone"], cfg["paths"].get("cache"))
    model = backbone.model
    heads = replace_projection(model, cfg["projection"])
    report = apply_freeze(model, cfg["freeze"], always_trainable=tuple(heads))
    console.print(report.to_rich())
    (run_dir / "freeze.txt").write_text(report.to_text() + "\n")

    metrics: dict[str, Any] = {
        "trainable_parameters": report.trainable,
        "total_parameters": report.total,
        "data/bad_images": len(json.loads(manifest.with_suffix(".json").read_text()).get("bad_images", [])),
    }
    eval_cfg = cfg.get("eval") or {}
    include_test = bool(eval_cfg.get("test", True))
    datamodule = HandDataModule(rows, settings.root, backbone, data, settings.cache_size, int(cfg["seed"]))
    module = ClipFineTuner(model, cfg["optim"], cfg["loss"], datamodule.val_rows, heads, run_signature(cfg))
    if cfg.get("init_from") and not resume:
        load_initial_weights(module, cfg["init_from"])

    results: dict[str, dict] = {}
    baseline_path = run_dir / "baseline.json"
    if eval_cfg.get("baseline", True):
        if resume and baseline_path.is_file():  # the untrained model's scores do not change
            baseline = json.loads(baseline_path.read_text())
        else:
            baseline = evaluate_model(
                model, rows, settings.root, backbone, settings.cache_size, eval_cfg, include_test, datamodule.captioner
            )
            _write_json(baseline_path, _saveable(baseline))
        results["baseline"] = baseline
        metrics.update({f"baseline/{k}": v for k, v in baseline["metrics"].items()})
        shown = baseline["metrics"]
        console.print(
            f"baseline (untrained): val Rank-1 {100 * shown['val/rank1']:.1f}%"
            + (
                f", test Rank-1 {100 * shown['test/rank1']:.1f}% mAP {100 * shown['test/mAP']:.1f}%"
                if "test/rank1" in shown
                else ""
            )
        )

    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor="val/rank1", mode="max",
        save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
    )  # fmt: skip
    # Lightning's save_last only writes when a new best is saved, so "last" would go stale once
    # val/rank1 stops improving: a monitor-free callback writes it after every epoch instead
    latest = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False,
    )  # fmt: skip
    trainer_cfg = {k: v for k, v in cfg["trainer"].items() if k != "_target_"}
    trainer_cfg["precision"] = precision_for(str(trainer_cfg.get("precision", "auto")))
    logger = build_logger(cfg, run_dir)
    _log_run_facts(logger, cfg, report)
    trainer = L.Trainer(
        **trainer_cfg, default_root_dir=run_dir, logger=logger,
        callbacks=[
            checkpoints,
            latest,
            LearningRateMonitor(logging_interval="step"),
            SaveOnInterrupt(run_dir / "checkpoints" / "last.ckpt"),
        ],
        plugins=[AtomicCheckpointIO()],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)

    best = checkpoints.best_model_path
    if best:
        module.load_state_dict(load_checkpoint_file(best)["state_dict"])
    final = evaluate_model(
        model, rows, settings.root, backbone, settings.cache_size, eval_cfg, include_test, datamodule.captioner
    )
    results["fine-tuned"] = final
    metrics.update(final["metrics"])
    metrics["wall_time_s"] = time.time() - started  # this process
    metrics["train_time_s"] = module.train_seconds()  # fit time, summed over resumes
    metrics["peak_memory_mb"] = _peak_memory_mb()
    for prefix in ("test", "test_all"):
        if f"{prefix}/rank1" in final["metrics"]:
            console.print(protocol_table(results, prefix))
    console.print(text_table(results))
    _figures(results, final, model, backbone, datamodule.captioner, run_dir, logger)
    payload = {
        "metrics": metrics,
        "runs": {label: r["runs"] for label, r in results.items()},
        "cmc": {label: r["cmc"] for label, r in results.items()},
        "freeze": report.as_dict(),
        "manifest": str(manifest),
        "best_checkpoint": best,
    }
    _write_json(run_dir / "metrics.json", payload)
    if type(logger).__name__ != "CSVLogger":  # the CSV logger's final numbers are metrics.json
        logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.global_step)
        logger.finalize("success")
    summary = ", ".join(
        f"{name} {100 * metrics[key]:.1f}% (baseline {100 * metrics['baseline/' + key]:.1f}%)"
        if "baseline/" + key in metrics
        else f"{name} {100 * metrics[key]:.1f}%"
        for name, key in (("test Rank-1", "test/rank1"), ("test mAP", "test/mAP"))
        if key in metrics
    )
    console.print(f"[bold]done[/bold] in {metrics['wall_time_s']:.0f}s: {summary}; results in {run_dir}")
    return metrics


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
