"""Evaluation as one object, called on the backbone before and after training.

`Evaluator(rows, root, image_cache, settings, captioner)(backbone)` extracts the features of every
image the protocol needs once, scores validation and the test runs (see `handclip.eval.protocol`),
and adds the language side (zero-shot attribute prompts, retrieval) on images never trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from handclip.checks import flag, integer, one_of
from handclip.errors import ConfigError


@dataclass(frozen=True)
class EvalSettings:
    """The `eval:` settings of a run (defaults in `conf/eval/default.yaml`)."""

    baseline: bool  # evaluate the untrained model through the same protocol first
    test: bool  # run the test protocol at the end with the best validation checkpoint
    flip_tta: bool | None  # feature of image + mirrored image, for query and gallery alike; None: the protocol's
    text: bool  # zero-shot attribute prompts and retrieval on the test images
    batch_size: int  # images per forward pass in every evaluation, validation included
    feature: str = "projected"  # the image feature scored (handclip.eval.feature); the default is in conf/eval
    # WiSE-FT after training (handclip.eval.forgetting.WiseFT's settings), or None: off
    wise_ft: Any = None
    select: str = "val/rank1"  # the validation metric that picks the best checkpoint (handclip.train.selection)
    smooth: int = 1  # ... averaged over the last this many validations
    # record the test protocol after every validation in curve.json, for studies of checkpoint selection (never read
    # by the run itself: it selects on validation alone)
    curve: bool = False
    # pictures of what the model retrieves (ranked.png, and ranked_text.png with captions): each of a few test queries
    # with its top this-many gallery images, right and wrong marked; 0: none
    ranked: int = 5
    # which protocol the numbers follow (handclip.eval.protocol.PROTOCOLS): what the headline gallery is, and whether
    # the mirrored image's feature is added
    protocol: str = "handclip"
    # k-reciprocal re-ranking of the test runs, scored beside them (handclip.eval.reranking.Reranking), or None
    rerank: Any = None
    verify: bool = False  # verification figures on the headline test runs' pairs (handclip.eval.verification)

    def __post_init__(self):
        from handclip.eval.feature import EVAL_FEATURES
        from handclip.eval.forgetting import WiseFT
        from handclip.eval.protocol import PROTOCOLS, flip_of
        from handclip.eval.reranking import Reranking

        one_of("eval.feature", self.feature, EVAL_FEATURES)
        one_of("eval.protocol", self.protocol, tuple(PROTOCOLS))
        if self.protocol == "published" and self.flip_tta is False:
            raise ConfigError("eval.flip_tta=false contradicts eval.protocol=published, which adds the mirrored "
                              "image's feature as the published evaluations do: leave eval.flip_tta unset (null) or "
                              "choose eval.protocol=handclip")  # fmt: skip
        if self.flip_tta is None:
            object.__setattr__(self, "flip_tta", flip_of(self.protocol, None))
        if self.wise_ft is not None:
            object.__setattr__(self, "wise_ft", _settings("eval.wise_ft", self.wise_ft, WiseFT,
                               "{alphas: [0.0, 0.25, 0.5, 0.75, 1.0], keep: 0.8, metric: val/mAP, confidence: 0.95}"))
        if self.rerank is not None:  # eval.rerank=true: the published defaults
            object.__setattr__(self, "rerank", _settings("eval.rerank", {} if self.rerank is True else self.rerank,
                                                         Reranking, "{k1: 20, k2: 6, lambda_value: 0.3}"))
        for key in ("baseline", "test", "flip_tta", "text", "curve", "verify"):
            flag(f"eval.{key}", getattr(self, key))
        integer("eval.batch_size", self.batch_size, 1)
        integer("eval.smooth", self.smooth, 1, 1000)
        integer("eval.ranked", self.ranked, 0, 20, hint=" (0: no pictures of the top-ranked gallery images)")
        check_validation_metric("eval.select", self.select, "a checkpoint is never chosen on test",
                                identity_accuracy=True)
        if self.wise_ft is not None:  # a metric validation never gives would choose the unmixed model without a word
            check_validation_metric("eval.wise_ft.metric", self.wise_ft.metric, "a mix is never chosen on test")


def _settings(key: str, value: Any, kind: type, example: str) -> Any:
    """`value`, a mapping of the dataclass `kind`'s settings, as a `kind` (or one already), else a ConfigError
    naming `key` and the settings it has."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}={value!r} must be null or settings such as {example}")
    names = [f.name for f in fields(kind)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]} is not a setting; settings are {', '.join(names)}")
    return kind(**value)


def check_validation_metric(key: str, value: Any, why: str, identity_accuracy: bool = False) -> str:
    """`value` if validation gives it (val/rank1, val/rank5, val/rank10, val/mAP; with `identity_accuracy`, also
    val/id_accuracy, which a run with an identity head gives), else a ConfigError naming `key`."""
    from handclip.eval.protocol import ID_ACCURACY, VALIDATION_METRICS

    allowed = (*VALIDATION_METRICS, ID_ACCURACY) if identity_accuracy else VALIDATION_METRICS
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} must be a validation metric, one of {', '.join(allowed)}: {why}")
    return value


class Evaluator:
    """Scores a backbone by the re-identification protocol of a manifest's rows."""

    def __init__(
        self, rows: Sequence[dict], root: str | Path, image_cache: str | Path | None, settings: EvalSettings,
        captioner: Callable | None = None, encode: Callable | None = None, prompts: Mapping | None = None,
    ):  # fmt: skip
        self.rows = list(rows)
        from handclip.eval.feature import ImageEncoder

        self.encode = encode or ImageEncoder()  # the evaluation feature (eval.feature); default: projected
        self.root = root
        self.image_cache = image_cache  # the folder of resized copies (PrepareSettings.image_cache), or None
        self.settings = settings
        self.captioner = captioner
        self.prompts = prompts  # the data source's zero-shot tasks (DataSource.prompts()); none: no prompt task
        # set by handclip.train.caches: (store, image -> position, prefix groups) and a frozen text tower's cache
        self.activations = None
        self.text_cache = None

    def __call__(self, backbone, include_test: bool | None = None, language: bool = True, merged: bool = True,
                 extras: bool = True) -> dict:  # fmt: skip
        """{"metrics", "runs", "cmc"} (see `score_protocol`), plus for the figures `_image_rows`, `_scored` (their
        scored features), `_features` (their features in the space of the captions) and `_text` (the test images'
        positions in `_image_rows`, their `captions`, the distinct `unique` ones and their embeddings `text`).
        `extras=False` leaves out re-ranking and verification (the per-epoch test curve, a study tool)."""
        from handclip.eval.feature import ImageEncoder
        from handclip.eval.protocol import extract_features, images_needed, score_protocol
        from handclip.model.forward import Forward

        include_test = self.settings.test if include_test is None else include_test
        rows = self.rows if merged else [r for r in self.rows if not r["split"].startswith("gallery_all")]
        image_rows = images_needed(rows, include_test)
        stored = self.activations  # (store, image -> position, prefix groups): the frozen prefix's hidden states
        forward = Forward(backbone, prefix=stored[2] if stored else 0, text_cache=self.text_cache)

        def extract(encode, progress: bool = False):  # the features of image_rows, [images, dim]
            return extract_features(forward, self._batches(backbone, image_rows), encode, progress,
                                    total=-(-len(image_rows) // self.settings.batch_size))  # fmt: skip

        features = extract(self.encode, progress=True)
        result = score_protocol(features, image_rows, rows, include_test, texts=forward.captions,
                                protocol=self.settings.protocol, rerank=self.settings.rerank if extras else None,
                                verify=self.settings.verify and extras)  # fmt: skip
        joint = self.encode.feature == "projected"  # comparable with text embeddings
        # for the figures; not saved
        result["_image_rows"], result["_scored"] = image_rows, features
        result["_features"] = features if joint else None  # in the joint space, beside captions
        if include_test and language and self.settings.text and self.captioner is not None:
            from handclip.eval.zeroshot import text_metrics

            # the test images (and, on 11k, the other aspects' gallery images): never trained on
            test = [i for i, r in enumerate(image_rows) if r["split"] not in ("train", "val")]
            if test:
                chosen = [image_rows[i] for i in test]
                captions = [self.captioner(r) for r in chosen]
                projected = features
                if not joint:
                    projected = extract(ImageEncoder())
                    result["_features"] = projected
                kept: dict = {}
                result["metrics"].update(text_metrics(projected[test], chosen, captions, backbone, self.text_cache,
                                                      kept, self.prompts))  # fmt: skip
                result["_text"] = {"images": test, "captions": captions, "unique": kept["captions"],
                                   "text": kept["text"]}  # fmt: skip
        return result

    @property
    def image_root(self) -> Path:
        """Where the images are read from: the resized cache when there is one."""
        return Path(self.image_cache) if self.image_cache else Path(self.root)

    def _batches(self, backbone, image_rows: Sequence[dict]):
        """The images' batches: stored hidden states of the frozen prefix, or pixels through the eval transform."""
        size, flip = self.settings.batch_size, self.settings.flip_tta
        if self.activations is not None:
            from handclip.data.activations import stored_batches

            store, position, _ = self.activations
            return stored_batches(store, [position[r["image"]] for r in image_rows], size, flip)
        from handclip.data.dataset import ManifestImages
        from handclip.data.transforms import eval_transform
        from handclip.eval.protocol import pixel_batches

        transform = eval_transform(backbone.image_size, backbone.resize_size, backbone.image_mean, backbone.image_std)
        return pixel_batches(ManifestImages(image_rows, self.root, transform, self.image_cache), size, flip=flip)


def saveable(result: dict) -> dict:
    """An evaluation result without its in-memory parts (features), for JSON."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
