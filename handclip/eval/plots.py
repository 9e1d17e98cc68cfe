"""Figures a person would rather look at than read: CMC curves and an embedding map (and, in
`handclip.eval.ranked`, what the models retrieve)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from handclip.io import atomic_write


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cmc(curves: Mapping[str, Sequence[float]], path: str | Path, title: str = "CMC, test (mean over runs)"):
    """Rank-k for k = 1..len(curve), one line per label (e.g. baseline, fine-tuned)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], marker="o", markersize=3, label=label)
    ax.set_xlabel("rank k")
    ax.set_ylabel("Rank-k accuracy (%)")
    ax.set_ylim(0, 100)
    return save_figure(fig, ax, path, title)


def save_figure(fig, ax, path: str | Path, title: str):
    """Title, grid and legend, then write the PNG; returns the figure."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = [], []
    for axes in fig.axes:  # a twin axis's lines belong in the same legend
        more = axes.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, dpi=120, format="png")
    return fig


def plot_roc(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path):
    """Verification ROC of each result (true accept against false accept rate, log scale), as roc.png."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, curve in curves.items():
        ax.plot(curve["fpr"], curve["tpr"], label=label)
    for far in (1e-3, 1e-2):
        ax.axvline(far, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(1e-5, 1)
    ax.set_xlabel("false accept rate (impostor pairs accepted)")
    ax.set_ylabel("true accept rate (genuine pairs accepted)")
    return save_figure(fig, ax, path, "verification ROC, headline test runs' pairs (pooled)")


def pca_2d(features: torch.Tensor) -> torch.Tensor:
    """First two principal components of L2-normalised features."""
    x = F.normalize(features.float(), dim=-1)
    x = x - x.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:2].T


def plot_embeddings(
    image_features: torch.Tensor,
    image_ids: Sequence[str],
    text_features: torch.Tensor,
    text_ids: Sequence[str],
    path: str | Path,
    title: str = "test identities: images (o) and captions (*), PCA",
    max_identities: int = 10,
):
    """Images and captions of up to `max_identities` identities in one 2-D PCA, coloured by identity."""
    plt = pyplot()
    chosen = sorted(set(image_ids))[:max_identities]
    keep_images = [i for i, x in enumerate(image_ids) if x in chosen]
    keep_texts = [i for i, x in enumerate(text_ids) if x in chosen]
    points = pca_2d(torch.cat([image_features[keep_images], text_features[keep_texts]]))
    image_points, text_points = points[: len(keep_images)], points[len(keep_images) :]
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6, 5))
    for c, identity in enumerate(chosen):
        mask = [image_ids[i] == identity for i in keep_images]
        ax.scatter(*image_points[mask].T, color=colours(c % 10), s=18, alpha=0.7, label=identity.split("/")[-1])
        mask = [text_ids[i] == identity for i in keep_texts]
        ax.scatter(*text_points[mask].T, color=colours(c % 10), s=160, marker="*", edgecolors="black")
    ax.set_title(title)
    ax.legend(fontsize=7, title="identity", loc="best")
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, dpi=120, format="png")
    return fig


def run_figures(results: dict, backbone, captioner, run_dir: str | Path, evaluator=None) -> dict:
    """CMC curves (baseline vs fine-tuned), a PCA of test images and captions and, with the run's `evaluator`
    (handclip.eval.Evaluator: its rows, images and `eval.ranked`), what the models retrieve, written as PNGs.

    Returns {name: figure}; the caller logs and closes them.
    """
    from handclip.eval.zeroshot import encode_texts

    run_dir = Path(run_dir)
    final = list(results.values())[-1]
    figures = {}
    if all("roc" in r for r in results.values()):
        figures["roc"] = plot_roc({label: r["roc"] for label, r in results.items()}, run_dir / "roc.png")
    if all("test" in r.get("cmc", {}) for r in results.values()):
        figures["cmc"] = plot_cmc({label: r["cmc"]["test"] for label, r in results.items()}, run_dir / "cmc.png")
    features, image_rows = final.get("_features"), final.get("_image_rows")
    test = [
        i
        for i, r in enumerate(image_rows or [])
        if r["split"].startswith(("query", "gallery")) and "_all" not in r["split"]
    ]
    if test and captioner is not None and features is not None:
        chosen = [image_rows[i] for i in test]
        captions = sorted({(r["identity"], captioner(r)) for r in chosen})
        text = encode_texts(backbone, [c for _, c in captions])
        figures["embeddings"] = plot_embeddings(
            features[test], [r["identity"] for r in chosen], text, [i for i, _ in captions], run_dir / "embeddings.png"
        )
    if evaluator is not None:
        from handclip.eval.ranked import ranked_figures

        figures.update(ranked_figures(results, evaluator.rows, evaluator.image_root, evaluator.settings.ranked,
                                      run_dir))  # fmt: skip
    return figures
