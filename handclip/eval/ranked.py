"""Pictures of what the model retrieves, as torchreid's ranked-list view: a few queries, each beside its top k.

- `ranked.png`: queries of the first test run (query0) against its gallery (gallery0), each with its
  k best-scored gallery images, framed green when they show the query's identity and red when not;
- `ranked_text.png` (when the run scores text-to-image retrieval): captions as queries against the
  test images, framed green when the image has that caption (as `retrieval/text_to_image_R@k` counts).

Each query is shown for the untrained model and the reported one, one row each, so the change shows.
The queries are drawn with a fixed seed, half of them (where there are so many) among those the
reported model gets wrong at Rank-1. Nothing is encoded again: the features are those the final
evaluation scored. Images are shown as stored (the resized cache when the run has one), uncropped.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from handclip.eval.reid import TIE_TOLERANCE, similarity

QUERIES = 4  # queries per figure
SEED = 0  # the same queries in every run of a manifest
MATCH, MISS = "#2ca02c", "#d62728"  # green, red


def top_k(scores: torch.Tensor, matches: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k best-scored gallery items of each query (row of `scores`), best first: (indices, scores, whether each
    is a true match). A non-match scored within `TIE_TOLERANCE` of a match comes before it, as the metric counts it
    (handclip.eval.reid.match_ranks): the first green frame is at the rank Rank-k is computed from."""
    k = min(k, scores.shape[1])
    key = scores.float() + TIE_TOLERANCE * (~matches).float()
    first = torch.argsort(matches.int(), dim=1, stable=True)  # non-matches first among equal keys
    order = torch.argsort(key.gather(1, first), dim=1, descending=True, stable=True)
    index = first.gather(1, order)[:, :k]
    return index, scores.gather(1, index), matches.gather(1, index)


def choose_queries(right: Sequence[bool], count: int = QUERIES, seed: int = SEED) -> list[int]:
    """`count` positions of `right` (whether the model gets each query right at Rank-1), drawn with `seed`: half
    (rounded up) among the wrong ones, the rest among the right ones, either filling in where the other runs short.
    The wrong ones first, each kind in order."""
    generator = torch.Generator().manual_seed(seed)
    kinds = []
    for want in (False, True):
        positions = [i for i, r in enumerate(right) if bool(r) == want]
        kinds.append([positions[i] for i in torch.randperm(len(positions), generator=generator).tolist()])
    wrong, correct = kinds
    wrong_count = min(len(wrong), max(-(-count // 2), count - len(correct)))
    return sorted(wrong[:wrong_count]) + sorted(correct[: count - wrong_count])


Top = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # what `top_k` gives: (indices, scores, matches)


def rankings(scores: Mapping[str, torch.Tensor], matches: torch.Tensor, k: int, count: int = QUERIES,
             seed: int = SEED) -> tuple[list[int], dict[str, Top]]:  # fmt: skip
    """The queries shown, chosen on the last model's Rank-1 among those with a match, and each model's `top_k` of
    them: (query positions, {model: (indices, scores, matches)})."""
    candidates = matches.any(dim=1).nonzero().flatten().tolist()
    if not candidates:
        return [], {}
    last = list(scores.values())[-1][candidates]
    right = top_k(last, matches[candidates], 1)[2][:, 0].tolist()
    chosen = [candidates[i] for i in choose_queries(right, count, seed)]
    return chosen, {label: top_k(s[chosen], matches[chosen], k) for label, s in scores.items()}


def shown_models(results: Mapping[str, dict], key: str) -> dict[str, dict]:
    """The untrained model (when scored in this process) and the reported one (the last), those holding `key`."""
    labels = [label for label in ("baseline", list(results)[-1]) if label in results]
    return {label: results[label] for label in dict.fromkeys(labels) if results[label].get(key) is not None}


def reid_rankings(results: Mapping[str, dict], rows: Sequence[dict], k: int) -> tuple[list[dict], dict, list[dict]]:
    """The first test run's shown queries: (their rows, {model: `top_k` of each}, the gallery rows the indices point
    into); nothing shown (empty lists) when the results hold no test features."""
    models = shown_models(results, "_scored")
    if not models:
        return [], {}, []
    image_rows = list(models.values())[-1]["_image_rows"]
    position = {r["image"]: i for i, r in enumerate(image_rows)}
    queries = [r for r in rows if r["split"] == "query0" and r["image"] in position]
    gallery = [r for r in rows if r["split"] == "gallery0" and r["image"] in position]
    if not queries or not gallery:
        return [], {}, []
    matches = torch.tensor([[q["identity"] == g["identity"] for g in gallery] for q in queries])
    at = (torch.tensor([position[r["image"]] for r in queries]), torch.tensor([position[r["image"]] for r in gallery]))
    scores = {label: similarity(r["_scored"][at[0]], r["_scored"][at[1]]) for label, r in models.items()}
    chosen, tops = rankings(scores, matches, k)
    return [queries[i] for i in chosen], tops, gallery


def text_rankings(results: Mapping[str, dict], k: int) -> tuple[list[str], dict, list[dict]]:
    """Captions as queries against the test images: (the captions shown, {model: `top_k` of each}, the image rows
    the indices point into); empty lists when the run scored no text retrieval."""
    models = shown_models(results, "_text")
    reported = list(models.values())[-1]["_text"] if models else None
    # the same captions of the same images (the untrained model's, read back on a resume, may lack them)
    models = {label: r for label, r in models.items() if reported and r["_text"]["unique"] == reported["unique"]}
    if not models:
        return [], {}, []
    image_rows = [list(models.values())[-1]["_image_rows"][i] for i in reported["images"]]
    where = {caption: i for i, caption in enumerate(reported["unique"])}
    of_image = torch.tensor([where[c] for c in reported["captions"]])
    matches = torch.arange(len(reported["unique"]))[:, None] == of_image[None, :]
    scores = {label: similarity(r["_text"]["text"], r["_features"][r["_text"]["images"]])
              for label, r in models.items()}  # fmt: skip
    chosen, tops = rankings(scores, matches, k)
    return [reported["unique"][i] for i in chosen], tops, image_rows


def plot_ranked(queries: Sequence[tuple[str, str | None]], tops: Mapping[str, tuple], gallery: Sequence[str],
                names: Sequence[str] | None, image_root: str | Path, path: str | Path, title: str):  # fmt: skip
    """One row per query and model: the query (an image, or its caption alone when it is None) and its top k, framed
    green (a match) or red, each with its rank and score (and gallery name, when `names`). `queries`: (title, image
    path relative to `image_root`); `tops`: {model: (indices into `gallery`, scores, matches)}, a row per query."""
    from handclip.eval.plots import pyplot
    from handclip.io import atomic_write

    plt = pyplot()
    k = max(int(index.shape[1]) for index, _, _ in tops.values())
    rows = len(queries) * len(tops)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.5 * (k + 1) + 0.4, 1.75 * rows + 0.5), squeeze=False)
    thumbnails: dict[str, object] = {}
    for q, (query_title, query_image) in enumerate(queries):
        for m, (model, (index, scores, matches)) in enumerate(tops.items()):
            row = axes[q * len(tops) + m]
            _cell(row[0], _thumbnail(image_root, query_image, thumbnails) if query_image else None, "#808080", 1)
            row[0].set_ylabel(model, fontsize=8)
            if query_image:
                row[0].set_title(textwrap.shorten(query_title, 28), fontsize=7)
            else:  # a caption query: its words in the cell
                row[0].text(0.5, 0.5, textwrap.fill(textwrap.shorten(query_title, 90), 18), ha="center",
                            va="center", fontsize=7, transform=row[0].transAxes)  # fmt: skip
            for rank in range(k):
                cell = row[rank + 1]
                if rank >= index.shape[1]:
                    cell.axis("off")
                    continue
                g, match = int(index[q, rank]), bool(matches[q, rank])
                _cell(cell, _thumbnail(image_root, gallery[g], thumbnails), MATCH if match else MISS, 4)
                cell.set_title(f"{rank + 1}: {float(scores[q, rank]):.2f}", fontsize=7,
                               color=MATCH if match else MISS)  # fmt: skip
                if names is not None:
                    cell.set_xlabel(textwrap.shorten(names[g], 20), fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, dpi=100, format="png")
    return fig


def _cell(ax, image, colour: str, width: float) -> None:
    if image is not None:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def _thumbnail(image_root: str | Path, name: str, kept: dict):
    """The image at most 160 px on a side; a grey square when it cannot be read (a figure never ends a run)."""
    from PIL import Image

    from handclip.data.images import load_rgb

    if name not in kept:
        try:
            image = load_rgb(Path(image_root) / name)
            image.thumbnail((160, 160))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # DataError too
            image = Image.new("RGB", (160, 160), (200, 200, 200))
        kept[name] = image
    return kept[name]


def ranked_figures(results: Mapping[str, dict], rows: Sequence[dict], image_root: str | Path, k: int,
                   run_dir: str | Path) -> dict:  # fmt: skip
    """{"ranked": figure, "ranked_text": figure}, those the results allow, written to the run directory ({} for k 0)."""
    figures = {}
    if not k or not results:
        return figures
    queries, tops, gallery = reid_rankings(results, rows, k)
    if queries:
        shown = [(f"query: {q['identity']}", q["image"]) for q in queries]
        figures["ranked"] = plot_ranked(shown, tops, [g["image"] for g in gallery], [g["identity"] for g in gallery],
                                        image_root, Path(run_dir) / "ranked.png",
                                        "test run 0: top gallery images of each query (green: same identity, red: "
                                        "another)")  # fmt: skip
    captions, tops, images = text_rankings(results, k)
    if captions:
        figures["ranked_text"] = plot_ranked([(c, None) for c in captions], tops, [r["image"] for r in images], None,
                                             image_root, Path(run_dir) / "ranked_text.png",
                                             "test images retrieved by caption (green: an image of that caption, "
                                             "red: another)")  # fmt: skip
    return figures
