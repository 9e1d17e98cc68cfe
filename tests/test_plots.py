import torch
from PIL import Image

from handclip.eval.plots import pca_2d, plot_cmc, plot_embeddings


def test_cmc_plot_is_written(tmp_path):
    plot_cmc({"baseline": [0.1, 0.3, 0.5], "fine-tuned": [0.4, 0.7, 0.9]}, tmp_path / "cmc.png")
    assert Image.open(tmp_path / "cmc.png").size[0] > 300


def test_pca_keeps_the_largest_spread():
    torch.manual_seed(0)
    x = torch.randn(50, 8) * torch.tensor([10.0, 5.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]) + 3
    points = pca_2d(x)
    assert points.shape == (50, 2) and points.var(dim=0)[0] >= points.var(dim=0)[1]


def test_embedding_plot_colours_identities(tmp_path):
    images, texts = torch.randn(12, 16), torch.randn(3, 16)
    plot_embeddings(images, ["a", "b", "c"] * 4, texts, ["a", "b", "c"], tmp_path / "e.png")
    assert Image.open(tmp_path / "e.png").size[0] > 300
