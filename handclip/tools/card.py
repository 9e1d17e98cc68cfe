"""The model card (README.md) every export carries, as Hugging Face users expect to find one.

It is written from what the run left behind (its resolved `config.yaml`, `freeze.txt` and
`metrics.json`), what the export did (raw or EMA weights, WiSE-FT, a soup's ingredients, merged
adapters) and what the backbone says of itself: its initial weights and hub id (`BackboneSpec`), its
format's front matter and the code that loads the folder without HandCLIP (`Backbone`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

GALLERIES = {"test": "same-aspect gallery", "test_all": "gallery merged over aspects"}
METRICS = ("rank1", "rank5", "rank10", "mAP")
DATA_SHOWN = ("_target_", "name", "source", "draw", "runs", "sampler", "batch_size")


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


def _test_table(payload: Mapping, label: str = "fine-tuned") -> list[str]:
    """The 10-run protocol table of each gallery kind, mean ± std last."""
    runs = (payload.get("runs") or {}).get(label) or {}
    metrics = payload.get("metrics") or {}
    lines = []
    for prefix, gallery in GALLERIES.items():
        if not runs.get(prefix):
            continue
        header = " | ".join(m.replace("rank", "Rank-") for m in METRICS)
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


PLACEHOLDER = "PATH_TO_THIS_FOLDER"


def _load_snippet(backbone) -> list[str]:
    return [
        "```python",
        backbone.load_example(PLACEHOLDER),
        "```",
        "",
        "`hand.jpg` stands for an image of a hand. Re-identification compares L2-normalised image features by "
        "cosine similarity.",
        "",
    ]


def run_files(run_dir: str | Path) -> tuple[dict, dict | None, str | None]:
    """(config, metrics.json or None, freeze policy line or None) of a run directory."""
    run_dir = Path(run_dir)
    from handclip.io import read_record

    config = read_record(run_dir / "config.yaml")
    metrics_path, freeze_path = run_dir / "metrics.json", run_dir / "freeze.txt"
    payload = read_record(metrics_path) if metrics_path.is_file() else None
    policy = freeze_path.read_text().splitlines()[0].strip() if freeze_path.is_file() else None
    return config, payload, policy


def model_card(
    config: Mapping, payload: Mapping | None, policy: str | None, *, spec, backbone, weights: str,
    merged: str | None = None, wise_ft: float | None = None, ingredients: Sequence[Mapping] = (),
    notes: Sequence[str] = (), source: str = "",
) -> str:  # fmt: skip
    """README.md text: YAML front matter, then base model, training, objective, data, results and loading.

    `spec` is the run's `BackboneSpec`, `backbone` the exported `Backbone`; `merged` what the freeze policy
    merged into the weights (`FreezePolicy.merge`).
    """
    front: dict[str, Any] = {
        **{k: v for k, v in backbone.card_metadata.items() if k == "library_name"},
        "tags": ["clip", "handclip", "hand-re-identification", "person-re-identification", "image-feature-extraction"],
    }
    hub_id = spec.base_model()
    if hub_id:
        front["base_model"] = hub_id
    front.update({k: v for k, v in backbone.card_metadata.items() if k != "library_name"})
    name = config.get("run_name") or config.get("name") or "run"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# HandCLIP: {name}", ""]
    lines += [f"A CLIP model fine-tuned with HandCLIP for hand-based person re-identification, "
              f"exported from `{source}`.", ""]  # fmt: skip
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
    lines += [
        f"- optimiser: {_settings(optim)}",
        f"- epochs: {trainer.get('max_epochs')}, seed: {config.get('seed')}",
        "",
        "## Objective",
        "",
        *_objective(config.get("loss") or {}),
        "",
    ]
    data = config.get("data") or {}
    lines += [
        "## Data and split",
        "",
        f"- data: {_settings({k: v for k, v in data.items() if k in DATA_SHOWN})}",
        "- split: the published protocol: training identities, validation identities, and 10 query/gallery "
        "runs over the test identities",
        "",
    ]
    lines += ["## Weights", ""]
    ema = (config.get("ema") or {}).get("decay")
    if weights == "ema":
        lines.append(f"- the exponential moving average of the trained weights (decay {ema})")
    elif weights == "raw":
        lines.append("- the raw trained weights" + (f" (the run also kept an EMA, decay {ema})" if ema else ""))
    else:
        lines.append("- each ingredient's own choice: its EMA where it kept one, else its raw weights")
    if wise_ft is not None:
        lines.append(f"- WiSE-FT: (1 - {wise_ft}) x original + {wise_ft} x fine-tuned")
    if ingredients:
        lines += ["- a model soup: the average of these runs' weights", ""]
        lines += ["| ingredient | val Rank-1 % | test Rank-1 % |", "|---|---|---|"]
        for item in ingredients:
            cells = [f"{100 * item[k]:.1f}" if isinstance(item.get(k), float) else "-" for k in ("val", "test")]
            lines.append(f"| {item['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"- {note}" for note in notes]
    lines.append("")
    lines += ["## Results", ""]
    if ingredients:
        lines += ["The soup itself was not run through the test protocol; the table gives its ingredients'.", ""]
    elif payload is None:
        lines += ["The run has no metrics.json (it did not finish its test): no results.", ""]
    elif wise_ft is not None:
        lines += [f"These are the fine-tuned model's numbers; the WiSE-FT mix (alpha {wise_ft}) was not tested.", ""]
    if payload is not None and not ingredients:
        tested = payload.get("weights", "raw")
        if tested != weights:
            lines += [f"The test numbers below are the {tested} weights'; this export holds the {weights} weights.", ""]
        table = _test_table(payload)
        lines += table or ["The run was not tested (eval.test=false).", ""]
    lines += ["## How to load", "", *_load_snippet(backbone)]
    return "\n".join(lines).rstrip() + "\n"
