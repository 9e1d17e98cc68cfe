"""Build every component of a run from its configuration, and check it before anything heavy.

Each group of `conf/` names its component with `_target_`; `build_components` instantiates them
with `hydra.utils.instantiate` (the objective and the logger with `_partial_`, finished at run
time). Every constructor validates its own settings, so building them *is* the check; then the
settings that depend on the backbone (freeze depth, projection width) are checked against its
config, read without weights. Errors are `ConfigError`s that name the key.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from handclip.build import check_keywords
from handclip.checks import flag, integer, number
from handclip.errors import ConfigError, HandClipError, first_line
from handclip.eval.evaluator import EvalSettings
from handclip.eval.feature import ImageEncoder
from handclip.model.backbone import BackboneFacts
from handclip.model.freeze import FreezePolicy, apply_freeze, freeze_policy, trainable_parameter_names
from handclip.train.compute import Compute, compute_settings, contrastive_accumulation_refused

# the top-level settings a run reads; anything else is a typo
TOP_LEVEL = (
    "name", "run_name", "sweep_name", "seed", "ckpt_path", "init_from", "overwrite", "dry_run", "paths", "backbone",
    "freeze", "projection", "loss", "optim", "data", "trainer", "logger", "callbacks", "eval", "sweep", "ema",
    "compute", "stages", "stage",
)  # fmt: skip
# what a resumed run must share with the checkpoint it resumes
SIGNATURE_KEYS = ("backbone", "freeze", "projection", "loss")


@dataclass
class RunSpec:
    """A run, built and checked from its resolved configuration once, nothing heavy loaded: its parts and the
    settings of the run itself. Nothing downstream reads the configuration; `config` is kept only as the
    record a run writes (config.yaml) and gives its logger."""

    backbone: Any  # a backbone spec: .facts(), .load(cache_dir)
    facts: BackboneFacts | None
    freeze: FreezePolicy
    projection: Any  # Keep | Replace: .check(facts), .apply(backbone)
    objective: Callable  # finished with num_identities / embed_dim / pre_projection_dim
    optimization: Any
    data: Any  # HandDataModule
    eval: EvalSettings
    logger: Callable  # finished with save_dir
    callbacks: list
    trainer: Callable  # finished with logger, callbacks, plugins, default_root_dir
    ema_decay: float | None = None  # an EMA of the trained weights (handclip.train.ema), or None
    compute: Compute = field(default_factory=Compute)  # accumulation, checkpointing, attention, compile
    config: dict = field(default_factory=dict)  # the resolved configuration, as recorded
    seed: int = 0
    epochs: int = 1  # trainer.max_epochs
    precision: str = "auto"  # trainer.precision
    cache_dir: str | None = None  # paths.cache: built backbones
    ckpt_path: str | None = None  # resume: `last` or a checkpoint
    init_from: str | None = None  # a checkpoint whose weights start a new run
    overwrite: bool = False
    text_tower_digest: bool = False  # a loss term reads or writes what the text tower encoded (identity texts)

    @property
    def signature(self) -> dict:
        """The settings a resumed run must share with the checkpoint it resumes."""
        return run_signature(self.config)


Components = RunSpec  # the name the parts had before the run's own settings joined them


def _flat_keys(tree: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + str(key))
        if isinstance(value, Mapping):
            keys += _flat_keys(value, f"{prefix}{key}.")
    return keys


def _nearest(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not near:  # a misplaced key: compare by its last part (max_epoch -> trainer.max_epochs)
        last = {k.rsplit(".", 1)[-1]: k for k in known}
        near = [last[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(last), n=1, cutoff=0.7)]
    return f" (did you mean {near[0]}?)" if near else ""


def _settings_of(target: Any) -> list[str]:
    try:
        return [p for p in inspect.signature(target).parameters if p not in ("self", "args", "kwargs", "ignored")]
    except (TypeError, ValueError):
        return []


def _target_path(prefix: str, spec: Any, target: str) -> str:
    """The key under which `target` is named, e.g. `loss.terms.clip`."""
    if isinstance(spec, Mapping):
        if spec.get("_target_") == target:
            return prefix
        for key, value in spec.items():
            found = _target_path(f"{prefix}.{key}", value, target)
            if found:
                return found
    return "" if prefix.count(".") else prefix


def _explain(section: str, spec: Mapping, error: Exception) -> ConfigError:
    """A one-line ConfigError from whatever went wrong while building `section`."""
    top = section  # the section as built; `section` may narrow to a nested part below
    located = re.search(r"Error locating target '([^']+)'", str(error))
    if located:
        where = _target_path(section, spec, located.group(1))
        return ConfigError(
            f"{where}._target_={located.group(1)!r} cannot be imported: check the module and name "
            f"(the files in conf/{section.split('.')[0]}/ name the built-in choices)"
        )
    cause = error
    while cause.__cause__ is not None and not isinstance(cause, HandClipError):
        cause = cause.__cause__
    if isinstance(cause, HandClipError):
        return cause if isinstance(cause, ConfigError) else ConfigError(str(cause))
    message = str(cause)
    target = spec.get("_target_") if isinstance(spec, Mapping) else None
    nested = re.search(r"full_key: ([\w.]+)", str(error))
    if nested and isinstance(spec, Mapping):  # the failing part is inside this section (loss.terms.clip)
        node: Any = spec
        for part in nested.group(1).split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and "_target_" in node:
            section, target = f"{section}.{nested.group(1)}", node["_target_"]
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", message)
    if unexpected:
        from handclip.build import locate

        try:
            known = _settings_of(locate(str(target)))
        except ConfigError:
            known = []
        key = unexpected.group(1)
        elsewhere = [k for k in _flat_keys(spec) if k != key and not k.startswith("_")]
        near = _nearest(key, known) or _nearest(key, elsewhere).replace("mean ", f"mean {top}.")
        return ConfigError(
            f"{section}.{key} is not a setting of {target}{near}; its settings are {', '.join(known) or 'none'}"
        )
    missing = re.search(r"missing \d+ required (?:positional |keyword-only )?arguments?: '(\w+)'", message)
    if missing:
        return ConfigError(f"{section}.{missing.group(1)} is missing: {target} needs it")
    return ConfigError(f"{section}: {first_line(cause)}")


def _build(section: str, spec: Any, **kwargs) -> Any:
    from hydra.utils import instantiate

    if not isinstance(spec, Mapping):
        raise ConfigError(f"config section '{section}' is missing or not a mapping (see conf/{section}/)")
    if "_target_" not in spec:
        raise ConfigError(f"{section} has no _target_: choose one of the files in conf/{section}/")
    try:
        return instantiate(spec, _convert_="all", **kwargs)
    except Exception as error:  # noqa: BLE001 - every failure becomes one line naming the key
        raise _explain(section, spec, error) from None


def _check_top_level(cfg: Mapping) -> None:
    unknown = [k for k in cfg if k not in TOP_LEVEL and k != "hydra"]
    if unknown:
        known = _flat_keys({k: v for k, v in cfg.items() if k in TOP_LEVEL})
        raise ConfigError(
            f"{unknown[0]} is not a setting{_nearest(unknown[0], known)}"
            "; it would be ignored. Remove it, or set the key that does what you meant"
        )
    for section in ("backbone", "freeze", "projection", "loss", "optim", "data", "trainer", "logger", "eval"):
        if not isinstance(cfg.get(section), Mapping):
            raise ConfigError(f"config section '{section}' is missing")


def check_run_settings(cfg: Mapping) -> None:
    """The settings of the run itself that are read before its components are built (a dry run, a sweep point's
    bookkeeping, which checkpoints to remove): `overwrite=no` must not read as true and start a run over."""
    for key in ("overwrite", "dry_run"):
        flag(key, cfg.get(key, False))
    for key in ("ckpt_path", "init_from"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, str):
            what = "last or a checkpoint file" if key == "ckpt_path" else "a checkpoint file"
            raise ConfigError(f"{key}={value!r} must be {what} (quote a file name that reads as a number or true: "
                              f"\"{key}='{value}'\")")  # fmt: skip


def _integer(cfg: Mapping, key: str, low: int, high: int) -> int:
    section, name = key.split(".")
    return integer(key, (cfg.get(section) or {}).get(name), low, high)


# what Lightning's Trainer accepts, and `auto` (bf16-mixed on a GPU, 32-true on a CPU)
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "16", "bf16", "64")


def _check_precision(value: Any) -> None:
    if str(value) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={value!r}: choose one of {', '.join(PRECISIONS)}")


def _try_trainer(trainer: Callable) -> None:
    """Build the Trainer once (no logger, no checkpoints), so Lightning's own checks fail now."""
    import logging
    import warnings

    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, precision="32-true",
                    callbacks=[])  # fmt: skip
    except Exception as error:  # noqa: BLE001 - TypeError, ValueError, Lightning's MisconfigurationException
        raise ConfigError(f"trainer: {first_line(error)}") from None
    finally:
        quiet.setLevel(level)


def _try_logger(logger: Callable) -> None:
    """Make the logger once in a scratch folder, so its own checks (logger.mode=...) fail now, before the data,
    the weights and the baseline, and before anything is written into the run directory."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="handclip-logger-") as scratch:
        try:
            logger(save_dir=scratch)
        except HandClipError:
            raise
        except Exception as error:  # noqa: BLE001 - a library's own refusal of a setting, in one line
            raise ConfigError(f"logger: {first_line(error)}") from None


def objective_facts(
    facts: BackboneFacts | None, num_identities: int, identity_keys: list[str] | None = None,
    text_tower: str | None = None, prompt_tasks: dict | None = None, zero_shot_tasks: dict | None = None,
) -> dict:  # fmt: skip
    """What the objective's partial terms are finished with: identities from the data (0 in a check before
    the data is read; `identity_keys` in the order heads number them), widths from the model (stand-ins of
    64 where the backbone's config was not read), and `text_tower`, the digest of the text tower's weights,
    where a term reads what another run's text tower encoded, and `prompt_tasks`, the data's zero-shot prompt tasks
    ({task: [prompt per class]}; None before the data is read), and `backbone_logit_bias`, whether the backbone has
    a pretrained sigmoid bias (SigLIP's) that the SigLIP loss then starts from."""
    return {
        "num_identities": num_identities, "embed_dim": facts.projection_dim if facts else 64,
        "pre_projection_dim": facts.vision.width if facts else 64, "text_width": facts.text.width if facts else 64,
        "identity_keys": identity_keys, "text_tower": text_tower, "prompt_tasks": prompt_tasks,
        "zero_shot_tasks": zero_shot_tasks, "backbone_logit_bias": facts.logit_bias if facts else None,
    }  # fmt: skip


def reads_identity_texts(objective) -> list:
    """The terms of a finished objective that read fixed identity texts from another run (`texts_from`)."""
    return [term for term in objective.terms.values() if getattr(term, "texts_from", None)]


def _check_identity_text_sources(objective, cfg: Mapping, facts: BackboneFacts | None, projection) -> None:
    """Fixed identity texts must exist before anything loads, unless an earlier stage of this run writes them."""
    from handclip.losses.identity_text import check_identity_texts

    pending = (cfg.get("stage") or {}).get("previous")
    for term in reads_identity_texts(objective):
        if pending and str(term.texts_from).startswith(str(pending)):
            continue  # the stage before this one writes it
        width = getattr(projection, "dim", None) or (facts.projection_dim if facts else None)  # a new projection's
        check_identity_texts(term.texts_from, width)


def _try_objective(objective: Callable, facts: BackboneFacts | None):
    """Finish the objective once with stand-in run-time facts, so its terms' settings fail now; return it."""
    try:
        import warnings

        with warnings.catch_warnings():  # 0 identities: "not known yet" to the terms; heads sized 0 are no-ops
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
            return objective(**objective_facts(facts, 0))
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - one line naming the section
        raise ConfigError(f"loss: {first_line(error)}") from None


def check_decay(decay) -> float | None:
    """`ema.decay`: null (off) or a number in (0, 1)."""
    if decay is None:
        return None
    return number("ema.decay", decay, 0, 1, low_open=True, high_open=True, hint=" (e.g. 0.998), or null for no EMA")


def _check_selection(select: str, objective, ema_decay: float | None) -> None:
    """eval.select=val/id_accuracy needs an identity head in the objective that trains, to name the validation
    images, and the weights it classifies with: not an EMA's."""
    from handclip.eval.protocol import ID_ACCURACY

    if select != ID_ACCURACY:
        return
    head = objective.identity_head()
    if head is None or head.weight == 0:
        what = "has none" if head is None else "has one whose weight is 0, so it never learns"
        raise ConfigError(
            f"eval.select={ID_ACCURACY} needs an identity classifier that trains: the objective "
            f"({', '.join(objective.terms)}) {what}; add an identity term (handclip.losses.IdentityLoss, as "
            "loss=strong and loss=handid have), or select by a retrieval metric (eval.select=val/mAP)"
        )
    if ema_decay is not None:
        raise ConfigError(
            f"eval.select={ID_ACCURACY} with ema.decay={ema_decay}: the EMA averages the backbone only, so its "
            "features would be classified by heads trained with other weights, a pairing no checkpoint holds; "
            "select by a retrieval metric (eval.select=val/mAP) or leave ema.decay null"
        )


def _check_identity_batches(objective, data: Mapping) -> None:
    """Triplet and identity terms need P identities x K >= 2 images in every batch: say what to set."""
    wanted = objective.terms_needing("needs_identity_batches")
    if not wanted:
        return
    k = data.get("images_per_identity")
    if data.get("sampler") != "identity_balanced" or isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(
            f"loss.terms.{wanted[0]} needs P x K batches: set data.sampler=identity_balanced with "
            f"data.images_per_identity>=2 and data.batch_size = data.identities_per_batch x data.images_per_identity "
            f"(now data.sampler={data.get('sampler')}, data.images_per_identity={k})"
        )


def build_components(cfg: Mapping, read_backbone_config: bool = True, need_data: bool = True) -> RunSpec:
    """Every component of a resolved run configuration (a plain dict), built and checked, no weights.

    With `read_backbone_config=False` the backbone's config is not read (it may live on a hub this
    machine cannot reach), so the settings that depend on it are not checked and `facts` is None.
    """
    _check_top_level(cfg)
    check_run_settings(cfg)
    seed = cfg.get("seed")
    seed = integer("seed", seed, 0, 2**32 - 1)
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ConfigError(
            "ckpt_path and init_from together: ckpt_path resumes a run (its own weights, optimiser and step), "
            "init_from starts a new one from other weights; give one of them"
        )
    _integer(cfg, "trainer.max_epochs", 1, 100_000)
    _integer(cfg, "trainer.accumulate_grad_batches", 1, 100_000)
    _check_precision(cfg["trainer"].get("precision"))
    freeze = freeze_policy(_build("freeze", cfg["freeze"]), cfg["freeze"]["_target_"])
    freeze.check_epochs(int(cfg["trainer"]["max_epochs"]))
    interval = cfg["trainer"].get("val_check_interval")
    if hasattr(freeze, "observe") and interval not in (None, 1, 1.0):
        # its stages count validations as epochs (at most one stage a epoch, the caches planned so)
        raise ConfigError(
            f"freeze={type(freeze).__name__} counts one validation an epoch, and trainer.val_check_interval="
            f"{interval} validates more often: leave trainer.val_check_interval at 1.0 with this schedule"
        )
    projection = _build("projection", cfg["projection"])
    objective = _build("loss", cfg["loss"])
    optimization = _build("optim", cfg["optim"])
    data = _build("data", cfg["data"])
    if need_data:
        data.check_root()
    settings = _build("eval", cfg["eval"])
    logger = _build("logger", cfg["logger"])
    callbacks = [_build(f"callbacks.{name}", spec) for name, spec in (cfg.get("callbacks") or {}).items()]
    trainer = _build("trainer", cfg["trainer"], _partial_=True)
    backbone = _build("backbone", cfg["backbone"])
    for key, made in (("logger", logger), ("trainer", trainer), ("loss", objective)):
        check_keywords(key, made)
    _try_trainer(trainer)
    _try_logger(logger)
    clip = cfg["trainer"].get("gradient_clip_val")
    if clip is not None:
        number("trainer.gradient_clip_val", clip, 0, hint=" (0 or null: no clipping)")
    facts = None
    if read_backbone_config:
        facts = backbone.facts()  # the model config only: no weights
        projection.check(facts)
        # the policy on the model's structure (no weights): its depths, and a pattern that matches nothing
        skeleton = backbone.skeleton()
        apply_freeze(skeleton, freeze, always_trainable=projection.apply(skeleton))
    finished = _try_objective(objective, facts)
    if read_backbone_config and not trainable_parameter_names(skeleton) and not list(finished.parameters()):
        raise ConfigError(
            f"freeze={type(freeze).__name__} trains nothing of the backbone and the loss has no learnable parts of "
            "its own, so nothing would train: choose a policy that trains something (freeze=last_n) or an objective "
            "with learnable parts (loss=clipreid_prompts learns identity prompts with freeze=locked)"
        )
    _check_identity_batches(finished, cfg["data"])
    data.expected = (finished.terms_needing("needs_identities"), settings.feature,
                     identity_options(settings))  # checked once the data is read
    _check_identity_text_sources(finished, cfg, facts, projection)
    ImageEncoder(settings.feature, finished)  # eval.feature=bnneck needs a BN-neck in the objective
    ema = cfg.get("ema") or {}
    unknown = [k for k in ema if k != "decay"]
    if unknown:
        raise ConfigError(f"ema.{unknown[0]} is not a setting: ema has only decay (null, or e.g. 0.998)")
    _check_selection(settings.select, finished, check_decay(ema.get("decay")))
    refused = contrastive_accumulation_refused(cfg["trainer"], finished.needs_text or finished.needs_backbone)
    if refused:
        raise refused
    compute_spec = cfg.get("compute") or {"_target_": "handclip.train.compute.Compute"}
    compute = compute_settings(_build("compute", compute_spec), compute_spec["_target_"])
    compute.check(data.batch_size, cfg["trainer"], str(cfg["trainer"].get("precision")))
    prompts = finished.terms_needing("needs_backbone")
    if prompts and compute.accumulate > 1:
        raise ConfigError(
            f"loss.terms.{prompts[0]} runs the text tower inside the loss, which compute.accumulate cannot split "
            "into micro-batches: use compute.accumulate=1, or leave the term out (experiment=demo: loss=clip)"
        )
    return RunSpec(
        backbone, facts, freeze, projection, objective, optimization, data, settings, logger, callbacks, trainer,
        check_decay(ema.get("decay")), compute, config=dict(cfg), seed=seed, epochs=int(cfg["trainer"]["max_epochs"]),
        precision=str(cfg["trainer"].get("precision")), cache_dir=(cfg.get("paths") or {}).get("cache"),
        ckpt_path=cfg.get("ckpt_path"), init_from=cfg.get("init_from"), overwrite=bool(cfg.get("overwrite")),
        text_tower_digest=finished.needs_text_tower,
    )  # fmt: skip


def identity_options(settings: EvalSettings) -> list[str]:
    """The evaluation options set that need identities (re-ranking, verification), as the command line names them."""
    return [key for key, on in (("eval.rerank", settings.rerank is not None), ("eval.verify=true", settings.verify))
            if on]  # fmt: skip


def build_evaluation(cfg: Mapping) -> tuple[Any, EvalSettings]:
    """The data module and the evaluation settings of a resolved configuration (its `data` and `eval` sections),
    built and checked, the dataset folder found (or one a source generates): what scoring a model needs
    (`python -m handclip.evaluate`). Nothing is read but the configuration."""
    for section in ("data", "eval"):
        if not isinstance(cfg.get(section), Mapping):
            raise ConfigError(f"config section '{section}' is missing (see conf/{section}/)")
    data = _build("data", cfg["data"])
    data.check_root()
    return data, _build("eval", cfg["eval"])


def check_config(cfg: Mapping) -> RunSpec:
    """Check a resolved run configuration before any weights or images load; return its components."""
    return build_components(cfg)


def run_signature(cfg: Mapping) -> dict:
    """The settings a resumed run must share with the checkpoint it resumes: its model and objective, and how it
    is scored (`evaluation`: the protocol and the flip, which validation's checkpoint choice and the baseline
    were measured by)."""
    from handclip.eval.protocol import flip_of

    evaluation = cfg.get("eval") or {}
    protocol = evaluation.get("protocol", "handclip")
    flip = flip_of(protocol, evaluation.get("flip_tta"))
    return {**{key: cfg[key] for key in SIGNATURE_KEYS}, "evaluation": {"protocol": protocol, "flip_tta": flip}}
