"""Model soups: the average of a sweep's runs, exported like any run.

    python -m handclip.export --soup runs/sweeps/NAME OUT [--greedy] [--weights ema|raw] [--trust MODULE]

Every finished point of the sweep (one with `metrics.json`) contributes its best checkpoint
(its EMA when it kept one, unless `--weights raw`). Uniform by default: all points, equally
weighted. `--greedy` (Wortsman et al., 2022) orders the points by their validation Rank-1 and
adds each to the soup only if the soup's validation Rank-1 does not drop; validation uses the
first point's data and evaluation settings. Points whose backbone, projection or adapters differ
(what their freeze policies would merge into the weights, `FreezePolicy.merge`), or that trained on
other data (`data.source`, `data.draw`), are refused, before any weights are loaded: soups average
runs of one model on one dataset.

A soup of one point (a sweep with one finished point, or a greedy soup that kept only its first) is
exported, as that point's weights, with a warning on stderr and in the model card: it is what
`python -m handclip.export POINT` writes, and refusing would leave nothing when a sweep's other
points failed; but nobody should take it for an average.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handclip.errors import HandClipError

# what must be the same in every ingredient (the freeze policy's adapters too, see `_adapters`), and why
SHARED = {
    "backbone": "a soup averages runs of one backbone and projection",
    "projection": "a soup averages runs of one backbone and projection",
    "data.source": "a soup averages models trained on the same data",
    "data.draw": "a soup averages models trained on the same data",
}


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}"))
    return flat


def _select(config: Mapping, dotted: str) -> Any:
    """The setting at `dotted` (`data.draw`) in a nested config, or None where it has none."""
    for key in dotted.split("."):
        config = config.get(key) if isinstance(config, Mapping) else None
    return config


def _adapters(config: Mapping, trust: Sequence[str]) -> str | None:
    """The adapters a point's freeze policy adds and merges into the weights (its label), or None; found on the
    model's skeleton (its config only, no weights)."""
    from handclip.build import build
    from handclip.tools.export import build_freeze

    skeleton = build(config["backbone"], "backbone", trust).skeleton()
    build(config["projection"], "projection", trust).apply(skeleton)
    policy = build_freeze(config["freeze"], trust)
    policy.adapt(skeleton)
    return policy.label if policy.merge(skeleton) else None


def check_ingredients(points: list[tuple[Path, Mapping]], trust: Sequence[str] = ()) -> None:
    """Refuse points whose backbone, projection, adapters or training data (the data source's settings and draw)
    differ from the first point's."""
    from handclip.build import check_targets

    (first, reference), rest = points[0], points[1:]
    for _, config in points:
        for section in ("backbone", "projection", "freeze"):
            check_targets(config.get(section), section, trust)
    for point, config in rest:
        for section, why in SHARED.items():
            mine, theirs = _flatten(_select(config, section), section), _flatten(_select(reference, section), section)
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    raise HandClipError(
                        f"{point.name} cannot go in a soup with {first.name}: {key} differs ({mine.get(key)!r} vs "
                        f"{theirs.get(key)!r}); {why}"
                    )
        if config.get("freeze") != reference.get("freeze"):
            mine, theirs = _adapters(config, trust), _adapters(reference, trust)
            if mine != theirs:
                raise HandClipError(
                    f"{point.name} cannot go in a soup with {first.name}: its adapters differ ({mine or 'none'} vs "
                    f"{theirs or 'none'}); a soup averages runs of one model"
                )


def sweep_points(sweep_dir: Path) -> list[Path]:
    """The finished points of a sweep, in name order; unfinished and failed ones are named and left out."""
    if not sweep_dir.is_dir():
        raise HandClipError(f"--soup {sweep_dir}: no such sweep directory")
    points, skipped = [], []
    for run_dir in sorted(p for p in sweep_dir.iterdir() if (p / "config.yaml").is_file()):
        finished = (run_dir / "metrics.json").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
        (points if finished and not (run_dir / "failed.json").is_file() else skipped).append(run_dir)
    for run_dir in skipped:
        print(f"soup: {run_dir.name} left out (not finished, or failed)", flush=True)
    if not points and not skipped:
        from handclip.train.sweep import sweeps_in

        inner = sweeps_in(sweep_dir)
        if inner:  # runs/sweeps/<name> holds one folder per sweep; a soup never mixes two
            raise HandClipError(f"--soup {sweep_dir} holds sweeps ({len(inner)}), not a sweep's points: give one of "
                                f"them, e.g. {inner[-1]}")  # fmt: skip
    if not points:
        raise HandClipError(f"--soup {sweep_dir}: no finished sweep points (folders with metrics.json and a best.ckpt)")
    return points


def _validation(config: Mapping):
    """A function scoring a backbone's validation Rank-1 on the run's data, as the run validated it."""
    from handclip.eval.evaluator import Evaluator
    from handclip.eval.feature import ImageEncoder
    from handclip.train.config import build_components  # the run's own parts; greedy soups only

    parts = build_components(dict(config))
    rows = parts.data.prepare(parts.facts.image_size)
    # a BN-neck lives in the objective, which no export holds: the soup is scored on what it exports
    feature = "projected" if parts.eval.feature == "bnneck" else parts.eval.feature
    encode = ImageEncoder(feature)
    evaluate = Evaluator(rows, parts.data.root, parts.data.prepare_settings.image_cache, parts.eval, None, encode)
    return lambda backbone: float(evaluate(backbone, include_test=False)["metrics"]["val/rank1"])


def soup(
    sweep_dir: str | Path, out_dir: str | Path, greedy: bool = False, overwrite: bool = False,
    weights: str | None = None, trust: Sequence[str] = (),
) -> Path:  # fmt: skip
    """Average the sweep's finished points into one model and export it (with its model card).

    `trust`: modules besides HandCLIP's whose components the points' configs may build (`handclip.build`).
    """
    from handclip.tools.export import check_destination, write_export

    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    check_destination(out_dir, sweep_dir, overwrite)
    made = make_soup(sweep_dir, greedy, weights, trust)
    return write_export(made.backbone, out_dir, made.marker, made.card)


@dataclass
class Soup:
    """A sweep's soup, made in memory: the averaged backbone, what export records of it and its model card."""

    backbone: Any
    marker: dict  # handclip_export.json's source, soup (the points averaged), greedy, weights
    card: str
    config: dict  # the first point's config.yaml: its backbone, data and evaluation settings


def make_soup(sweep_dir: str | Path, greedy: bool = False, weights: str | None = None,
              trust: Sequence[str] = ()) -> Soup:  # fmt: skip
    """Average the sweep's finished points into one backbone (see `soup`); nothing is written."""
    from handclip.build import check_targets
    from handclip.model.averaging import average_states
    from handclip.tools.card import model_card, run_files
    from handclip.tools.export import check_finite, load_run

    sweep_dir = Path(sweep_dir)
    points = sweep_points(sweep_dir)
    files = {p: run_files(p) for p in points}
    check_ingredients([(p, files[p][0]) for p in points], trust)
    if greedy:  # its validation builds the whole of the first point's config: data, objective, evaluation
        check_targets(files[points[0]][0], "", trust)

    ingredients, states, chosen, first, merged = [], {}, set(), None, None
    for point in points:
        run = load_run(point, weights, trust)
        merged = run.policy.merge(run.backbone) or merged  # adapters folded in: soups average plain weights
        states[point] = {k: v.detach().cpu() for k, v in run.backbone.state_dict().items()}
        check_finite(states[point], f"soup ingredient {point.name}")
        chosen.add(run.weights)
        first = first or run
        used = run.weights
        metrics = files[point][1]["metrics"]
        raw = "raw/" if used == "raw" and "raw/val/rank1" in metrics else ""
        ingredients.append({"name": point.name, "val": metrics.get(f"{raw}val/rank1"),
                            "test": metrics.get(f"{raw}test/rank1"), "path": str(point)})  # fmt: skip
    backbone = first.backbone  # the soup goes into the first point's model
    shapes = {k: tuple(v.shape) for k, v in states[points[0]].items()}
    for point in points[1:]:
        if {k: tuple(v.shape) for k, v in states[point].items()} != shapes:
            raise HandClipError(f"{point.name} cannot go in a soup with {points[0].name}: its weights differ in shape")

    notes = []
    if greedy:
        score = _validation(files[points[0]][0])
        order = sorted(ingredients, key=lambda item: -(item["val"] or 0.0))
        kept = [order[0]]
        backbone.load_state_dict(states[Path(order[0]["path"])])
        best = score(backbone)
        notes.append(f"greedy soup: {order[0]['name']} first (validation Rank-1 {100 * best:.1f}%)")
        for item in order[1:]:
            backbone.load_state_dict(average_states([states[Path(i["path"])] for i in [*kept, item]]))
            candidate = score(backbone)
            verdict = "kept" if candidate >= best else "left out"
            notes.append(f"adding {item['name']}: validation Rank-1 {100 * candidate:.1f}%, {verdict}")
            print(f"soup: {notes[-1]}", flush=True)
            if candidate >= best:
                kept, best = [*kept, item], candidate
        ingredients = kept
    backbone.load_state_dict(average_states([states[Path(i["path"])] for i in ingredients]))
    if len(ingredients) == 1:
        why = "the greedy soup kept only its first point" if greedy else "the sweep has only one finished point"
        alone = f"a soup of one: {why}, so this export is {ingredients[0]['name']}'s own weights, not an average"
        notes.append(alone)
        print(f"warning: {alone}", file=sys.stderr, flush=True)
    used = chosen.pop() if len(chosen) == 1 else "mixed"
    marker = {"source": str(sweep_dir), "soup": [i["path"] for i in ingredients], "greedy": greedy, "weights": used}
    config, _, policy = files[Path(ingredients[0]["path"])]
    card = model_card(config, None, policy, spec=first.spec, backbone=backbone, merged=merged, weights=used,
                      ingredients=ingredients, notes=notes, source=str(sweep_dir))  # fmt: skip
    print(f"soup of {len(ingredients)}: {', '.join(i['name'] for i in ingredients)}", flush=True)
    return Soup(backbone, marker, card, dict(files[points[0]][0]))
