"""The model card (README.md) every export carries, as Hugging Face users expect to find one.

Built with `huggingface_hub`'s `ModelCard` and `ModelCardData`, so the front matter is what the hub reads
(`library_name`, `pipeline_tag`, `tags`, `base_model` where the weights came from the hub, `datasets`,
`metrics` and a `model-index` holding the headline numbers with their protocol) and the card loads back with
`ModelCard.load`. It is written from what the run left behind (its resolved `config.yaml`, `freeze.txt`,
`metrics.json` and the split manifest it names), what the export did (raw or EMA weights, WiSE-FT, a soup's
ingredients, merged adapters) and what the backbone says of itself: its initial weights and hub id
(`BackboneSpec`), its format's front matter and the code that loads the folder without HandCLIP (`Backbone`).

The card says what the data was: hand data (11k Hands, HD, synthetic hands) is scored by the re-identification
protocol (Rank-1 and mAP over the query/gallery runs), caption data (a caption CSV, an image folder) by
image-text retrieval (R@k on the test images and their captions), with the identity protocol beside it where
the data names identities.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GALLERIES = {"test": "same-aspect gallery", "test_all": "gallery merged over aspects"}
METRICS = ("rank1", "rank5", "rank10", "mAP")
RETRIEVAL = tuple(f"retrieval/{side}_R@{k}" for side in ("text_to_image", "image_to_text") for k in (1, 5, 10))
# what each data source is, in words, and whether it is hands (scored by re-identification) or captioned images
SOURCES = {
    "Hands11k": ("the 11k Hands dataset", True),
    "SyntheticHands": ("synthetic hands drawn in the 11k Hands format (handclip.data.synthetic)", True),
    "HD": ("the HD (hand dorsal) dataset", True),
    "CaptionCSV": ("an image-caption dataset read from a caption CSV", False),
    "ImageFolder": ("an image-caption dataset read from a Hugging Face image folder", False),
}
HAND_TAGS = ["hand-re-identification", "person-re-identification"]
CAPTION_TAGS = ["image-text-retrieval"]


def _settings(spec: Any) -> str:
    """A config section in one line: its target's short name and its settings."""
    if not isinstance(spec, Mapping):
        return str(spec)
    target = str(spec.get("_target_", "")).rsplit(".", 1)[-1]
    rest = {k: v for k, v in spec.items() if not k.startswith("_")}
    flat = ", ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in rest.items())
    return f"{target} ({flat})" if target and flat else target or flat


def _objective(loss: Mapping) -> list[str]:
    terms = loss.get("terms") or {}
    lines = [f"- `{name}`: {_settings(term)}" for name, term in terms.items() if isinstance(term, Mapping)]
    return lines or [f"- {_settings(loss)}"]


@dataclass
class DataFacts:
    """What a run trained and was tested on, from its config and its split manifest's sizes."""

    kind: str  # the data source's class name (CaptionCSV, Hands11k, ...), "" when the config names none
    what: str  # the kind in words
    hands: bool  # hand data, scored by re-identification; else captioned images, scored by retrieval
    folder: str  # the dataset folder's name
    sizes: dict  # split -> {"identities": n, "images": n}, from the manifest (empty when it is not at hand)

    @property
    def identities_named(self) -> bool:
        """Whether the data says whose images belong together (else each image is its own identity)."""
        train = self.sizes.get("train") or {}
        return self.hands or bool(train) and train.get("images", 0) > train.get("identities", 0)

    @property
    def by_image(self) -> bool:
        """Whether the split is by image (the image-text retrieval protocol: the data names no identities)."""
        return "test" in self.sizes

    def counts(self) -> list[str]:
        """Lines: training (with validation) and test identities and images."""
        train, val = self.sizes.get("train"), self.sizes.get("val")
        query, gallery = self.sizes.get("query0"), self.sizes.get("gallery0")
        lines = []
        if self.by_image:
            for split, what in (("train", "training"), ("val", "validation"), ("test", "test")):
                if self.sizes.get(split):
                    lines.append(f"- {what}: {self.sizes[split]['images']} images")
            return lines
        if train:
            held = f", plus {val['images']} validation images of the same identities" if val else ""
            lines.append(f"- training: {train['identities']} identities, {train['images']} images{held}")
        if query and gallery:
            lines.append(f"- test: {query['identities']} identities never trained on, {query['images']} query and "
                         f"{gallery['images']} gallery images per query/gallery run")  # fmt: skip
        return lines


def reported_ratio(payload: Mapping | None) -> float | None:
    """The WiSE-FT ratio of the model a run reported (its metrics.json), None when it reported unmixed weights."""
    mix = (payload or {}).get("wise_ft")
    alpha = mix.get("alpha") if isinstance(mix, Mapping) else None
    return None if alpha is None or float(alpha) == 1.0 else float(alpha)


def data_facts(config: Mapping, payload: Mapping | None) -> DataFacts:
    data = config.get("data") or {}
    source = data.get("source") or {}
    kind = str(source.get("_target_", "")).rsplit(".", 1)[-1]
    what, hands = SOURCES.get(kind, (f"{kind or 'unnamed'} data", True))
    folder = Path(str(source.get("root", ""))).name or str(data.get("name") or "data")
    sizes: dict = {}
    manifest = (payload or {}).get("manifest")
    if manifest:
        try:
            sizes = json.loads(Path(manifest).with_suffix(".json").read_text()).get("sizes") or {}
        except (OSError, ValueError):
            sizes = {}  # the run was copied here without its dataset's cache: the card says less
    return DataFacts(kind, what, hands, folder, sizes)


def _test_table(payload: Mapping, label: str = "fine-tuned", hands: bool = True) -> list[str]:
    """The 10-run protocol table of each gallery kind, mean ± std last."""
    runs = (payload.get("runs") or {}).get(label) or {}
    metrics = payload.get("metrics") or {}
    lines = []
    galleries = payload.get("galleries") or (GALLERIES if hands else {"test": "one gallery image per identity"})
    first = (payload.get("protocol") or {}).get("headline", "test")  # the stated protocol's headline first
    for prefix in dict.fromkeys((first, "test", "test_all")):
        if not runs.get(prefix):
            continue
        header = " | ".join(m.replace("rank", "Rank-") for m in METRICS)
        gallery = galleries.get(prefix, prefix)
        lines += [f"**{prefix}** ({gallery}), %:", "", f"| run | {header} |", "|---" * (len(METRICS) + 1) + "|"]
        for run in runs[prefix]:
            name = "-" if run.get("run") is None else str(run["run"])
            lines.append(f"| {name} | " + " | ".join(f"{100 * run[m]:.1f}" for m in METRICS) + " |")
        means = [
            f"{100 * metrics.get(f'{prefix}/{m}', float('nan')):.1f} ± {100 * metrics.get(f'{prefix}/{m}_std', 0):.1f}"
            for m in METRICS
        ]
        lines += ["| **mean ± std** | " + " | ".join(means) + " |", ""]
    return lines


def _name(key: str) -> str:
    """`test/rank1` -> `Rank-1`, `retrieval/text_to_image_R@5` -> `text-to-image R@5`."""
    last = key.rsplit("/", 1)[-1]
    return last.replace("rank", "Rank-").replace("_R@", " R@").replace("_", "-")


def _reid_protocol(prefix: str, config: Mapping, payload: Mapping, hands: bool) -> str:
    from handclip.eval.protocol import PROTOCOLS

    evaluation = config.get("eval") or {}
    stated = payload.get("protocol") or {}
    runs = len(((payload.get("runs") or {}).get("fine-tuned") or {}).get(prefix) or []) or "the"
    flip = ", flip test-time augmentation" if stated.get("flip_tta", evaluation.get("flip_tta")) else ""
    named = f"{PROTOCOLS[stated['name']]}, " if stated.get("name") in PROTOCOLS else ""
    gallery = (payload.get("galleries") or {}).get(prefix) or (GALLERIES[prefix] if hands else
                                                                "one gallery image per identity")  # fmt: skip
    return (f"{named}re-identification: each query image ranks the gallery by cosine similarity of its "
            f"{payload.get('eval_feature') or evaluation.get('feature') or 'projected'} image feature; "
            f"mean over {runs} query/gallery runs of the test identities, "
            f"{gallery}{flip}")  # fmt: skip


RETRIEVAL_PROTOCOL = ("image-text retrieval on the test images (never trained on) and their distinct captions: "
                      "R@k, the share of queries with a match among the top k (one test pass)")  # fmt: skip


def headline(facts: DataFacts, config: Mapping, payload: Mapping | None) -> list[tuple[str, str, float, str]]:
    """(metric key, name, value, protocol) of the numbers a card leads with: retrieval R@k for caption data,
    then (where the data names identities) re-identification Rank-1 and mAP, which lead for hand data."""
    metrics = (payload or {}).get("metrics") or {}
    first = ((payload or {}).get("protocol") or {}).get("headline", "test")  # the stated protocol's headline leads
    reid = [(f"{prefix}/{m}", _name(m), float(metrics[f"{prefix}/{m}"]),
             _reid_protocol(prefix, config, payload, facts.hands))
            for prefix in dict.fromkeys((first, *GALLERIES)) for m in ("rank1", "mAP")
            if f"{prefix}/{m}" in metrics]  # fmt: skip
    retrieval = [(key, _name(key), float(metrics[key]), RETRIEVAL_PROTOCOL) for key in RETRIEVAL if key in metrics]
    if facts.hands:
        return reid
    return retrieval + (reid if facts.identities_named else [])


def card_data(config: Mapping, payload: Mapping | None, *, spec, backbone, facts: DataFacts, name: str,
              tested: bool):  # fmt: skip
    """The card's front matter: library, tags, base model, data set, metrics and their values (model-index)."""
    from huggingface_hub import EvalResult, ModelCardData

    meta = dict(backbone.card_metadata)
    tags = [backbone.family.lower(), "handclip", *(HAND_TAGS if facts.hands else CAPTION_TAGS),
            "image-feature-extraction"]  # fmt: skip
    numbers = headline(facts, config, payload) if tested else []
    results = [
        EvalResult(task_type="image-retrieval" if key.startswith("retrieval/") else "image-feature-extraction",
                   task_name="image-text retrieval" if key.startswith("retrieval/") else "re-identification",
                   dataset_type=facts.folder, dataset_name=facts.folder, dataset_config=facts.kind or None,
                   dataset_split="test",
                   metric_type=key, metric_name=label, metric_value=round(value, 4), metric_config=protocol)
        for key, label, value, protocol in numbers
    ]  # fmt: skip
    return ModelCardData(
        library_name=meta.pop("library_name", None), tags=tags, base_model=spec.base_model(),
        datasets=[facts.folder], metrics=list(dict.fromkeys(key for key, *_ in numbers)) or None,
        model_name=name, eval_results=results or None, **meta,
    )  # fmt: skip


PLACEHOLDER = "PATH_TO_THIS_FOLDER"


def _load_snippet(backbone, facts: DataFacts) -> list[str]:
    use = ("Re-identification compares L2-normalised image features by cosine similarity." if facts.hands else
           "Retrieval compares L2-normalised image and text features by cosine similarity.")  # fmt: skip
    return ["```python", backbone.load_example(PLACEHOLDER), "```", "",
            f"`hand.jpg` stands for an image{' of a hand' if facts.hands else ''}. {use}", ""]  # fmt: skip


def run_files(run_dir: str | Path) -> tuple[dict, dict | None, str | None]:
    """(config, metrics.json or None, freeze policy line or None) of a run directory."""
    run_dir = Path(run_dir)
    from handclip.io import read_record

    config = read_record(run_dir / "config.yaml")
    metrics_path, freeze_path = run_dir / "metrics.json", run_dir / "freeze.txt"
    payload = read_record(metrics_path) if metrics_path.is_file() else None
    policy = freeze_path.read_text().splitlines()[0].strip() if freeze_path.is_file() else None
    return config, payload, policy


def _purpose(facts: DataFacts) -> str:
    if facts.hands:
        return "for hand-based person re-identification"
    return "for image-text retrieval" + (" and re-identification of the identities it names" if
                                         facts.identities_named else "")  # fmt: skip


def _headline_lines(numbers, metrics: Mapping) -> list[str]:
    """One line per protocol: its numbers (mean ± std over the runs where there are several; the untrained
    model's beside each), then the protocol."""
    protocols: dict[str, list[str]] = {}
    for key, label, value, protocol in numbers:
        std = metrics.get(f"{key}_std")
        spread = f" ± {100 * std:.1f}" if isinstance(std, float) else ""
        before = metrics.get(f"baseline/{key}")
        untrained = f" (untrained {100 * before:.1f}%)" if isinstance(before, float) else ""
        protocols.setdefault(protocol, []).append(f"{label} **{100 * value:.1f}%**{spread}{untrained}")
    return [f"- {', '.join(shown)}. Protocol: {protocol}" for protocol, shown in protocols.items()]


def model_card(
    config: Mapping, payload: Mapping | None, policy: str | None, *, spec, backbone, weights: str,
    merged: str | None = None, wise_ft: float | None = None, ingredients: Sequence[Mapping] = (),
    notes: Sequence[str] = (), source: str = "", combined: str = "a model soup: the average of these runs' weights",
) -> str:  # fmt: skip
    """README.md text (a `huggingface_hub.ModelCard`): front matter, then what the model is, base model, training,
    objective, data, weights, results and loading.

    `spec` is the run's `BackboneSpec`, `backbone` the exported `Backbone`; `merged` what the freeze policy
    merged into the weights (`FreezePolicy.merge`).
    """
    from huggingface_hub import ModelCard

    name = str(config.get("run_name") or config.get("name") or "run")
    facts = data_facts(config, payload)
    # the run's numbers are those of the model it reported: its WiSE-FT mix when it chose one (handclip.train.final)
    reported = reported_ratio(payload)
    same = (wise_ft is None and reported is None) or (wise_ft is not None and reported is not None
                                                      and float(wise_ft) == float(reported))  # fmt: skip
    tested = payload is not None and not ingredients and same
    metrics = (payload or {}).get("metrics") or {}
    data = card_data(config, payload, spec=spec, backbone=backbone, facts=facts, name=name, tested=tested)
    numbers = headline(facts, config, payload)
    where = f" `{facts.folder}`, {facts.what}" if facts.kind else f" `{facts.folder}`"
    lines = [
        f"# HandCLIP: {name}",
        "",
        f"A {backbone.family} model fine-tuned with HandCLIP {_purpose(facts)} on{where}, exported from `{source}`.",
        "",
    ]
    lines += ["## Base model", "", f"- backbone: {spec.initial_weights()}",
              f"- projection: {_settings(config.get('projection'))}", ""]  # fmt: skip
    lines += ["## What was trained", "", f"- {policy or 'freeze policy: ' + _settings(config.get('freeze'))}"]
    stage = config.get("stage") or {}
    if stage.get("name"):
        after = f", after the stage in {stage['previous']}" if stage.get("previous") else ""
        lines.append(f"- stage `{stage['name']}` of a run in stages{after}")
    if merged:
        lines.append(f"- {merged}")
    optim = {k: v for k, v in (config.get("optim") or {}).items() if k in ("_target_", "lr", "weight_decay",
                                                                        "head_lr_multiplier")}  # fmt: skip
    trainer = config.get("trainer") or {}
    lines += [f"- optimiser: {_settings(optim)}", f"- epochs: {trainer.get('max_epochs')}, seed: {config.get('seed')}"]
    if "selection/epoch" in metrics:
        select = (config.get("eval") or {}).get("select", "validation")
        lines.append(f"- checkpoint: epoch {metrics['selection/epoch']}, chosen by {select} on the validation images")
    lines += ["", "## Objective", "", *_objective(config.get("loss") or {}), ""]
    data_section = config.get("data") or {}
    lines += ["## Data and split", "", f"- data: {facts.what}, folder `{facts.folder}`"
              + (f" (data source {facts.kind})" if facts.kind else ""), *facts.counts()]  # fmt: skip
    if facts.by_image:
        lines.append("- split: by image (the data names no identities): each image, with all its captions, trains, "
                     "validates or tests; validation and test score caption → image retrieval among their own images")
    elif facts.hands:
        lines.append(f"- split: the published protocol: training identities with one validation image each, and "
                     f"{data_section.get('runs', 10)} query/gallery runs over the test identities")  # fmt: skip
    else:
        lines.append(
            f"- split: training identities with one validation image each; test identities never trained on, "
            f"in {data_section.get('runs', 10)} query/gallery runs; retrieval on the test images"
            + ("" if facts.identities_named else " (the data names no identities: each image is its own)")
        )
    lines += [f"- captions: {', '.join(repr(c) for c in data_section.get('captions') or [])}", ""]
    lines += ["## Weights", ""]
    ema = (config.get("ema") or {}).get("decay")
    if weights == "ema":
        lines.append(f"- the exponential moving average of the trained weights (decay {ema})")
    elif weights == "raw":
        lines.append("- the raw trained weights" + (f" (the run also kept an EMA, decay {ema})" if ema else ""))
    else:
        lines.append("- each ingredient's own choice: its EMA where it kept one, else its raw weights")
    if wise_ft is not None:
        lines.append(f"- WiSE-FT: (1 - {wise_ft}) x original + {wise_ft} x fine-tuned"
                     + (" (the ratio the run chose on validation: the model it reported)" if same else ""))
    if ingredients:
        lines += [f"- {combined}", ""]
        lines += ["| ingredient | val Rank-1 % | test Rank-1 % |", "|---|---|---|"]
        for item in ingredients:
            cells = [f"{100 * item[k]:.1f}" if isinstance(item.get(k), float) else "-" for k in ("val", "test")]
            lines.append(f"| {item['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"- {note}" for note in notes]
    lines.append("")
    lines += ["## Results", ""]
    if ingredients:
        lines += ["The merged model itself was not run through the test protocol; the table gives its ingredients'.",
                  ""]  # fmt: skip
    elif payload is None:
        lines += ["The run has no metrics.json (it did not finish its test): no results.", ""]
    elif not same:
        held = f"the WiSE-FT mix at ratio {wise_ft:g}" if wise_ft is not None else "the unmixed fine-tuned weights"
        told = f"the run's WiSE-FT mix at ratio {float(reported):g}" if reported is not None else "the unmixed weights"
        lines += [f"These are the numbers of the model the run reported ({told}); this export holds {held}, which "
                  "was not tested.", ""]  # fmt: skip
    if payload is not None and not ingredients:
        tested_weights = payload.get("weights", "raw")
        if tested_weights != weights:
            lines += [f"The test numbers below are the {tested_weights} weights'; this export holds the {weights} "
                      "weights.", ""]  # fmt: skip
        if numbers:
            lines += _headline_lines(numbers, metrics) + [""]
        warnings = payload.get("warnings") or []
        if warnings:
            lines += ["**Caveats** (the run's closing warnings):", "", *[f"- {w}" for w in warnings], ""]
        table = _test_table(payload, hands=facts.hands)
        lines += table or ["The run was not tested (eval.test=false).", ""]
    lines += ["## How to load", "", *_load_snippet(backbone, facts)]
    text = "\n".join(lines).rstrip() + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}"))
