"""A caption dataset without identities: split by image, scored by caption -> image retrieval, end to end."""

import json

from huggingface_hub import ModelCard

from handclip.eval.protocol import RETRIEVAL_GALLERIES
from tests.test_prepare import caption_folder
from tests.test_train import QUICK, train


def test_a_caption_csv_without_identities_trains_and_reports_caption_retrieval(tmp_path):
    from handclip.tools.export import export

    folder = caption_folder(tmp_path / "data" / "flowers", identities=False)
    base = [q for q in QUICK if not q.startswith("data.source")]
    result = train(tmp_path, "data=captions", f"data.source.root={folder}", "data.batch_size=4", "run_name=noid",
                   "eval.ranked=3", base=base)  # fmt: skip
    assert "no identity has two images, so validation and test score caption → image retrieval" in result.stdout
    payload = json.loads((tmp_path / "runs" / "noid" / "metrics.json").read_text())
    metrics = payload["metrics"]
    assert payload["galleries"] == RETRIEVAL_GALLERIES
    # 24 images: 5 test, 2 validation (each caption a query against its split's images), one pass, no runs
    assert len(payload["runs"]["fine-tuned"]["test"]) == 1 and "test/rank1_std" not in metrics
    for key in ("val/rank1", "val/mAP", "test/rank1", "test/mAP", "baseline/test/rank1", "selection/epoch"):
        assert 0.0 <= metrics[key] <= 1.0 if key != "selection/epoch" else metrics[key] in (0, 1), key
    assert metrics["test/rank5"] == 1.0  # 5 test images: every caption finds its image among the top 5
    assert (tmp_path / "runs" / "noid" / "ranked_text.png").is_file()
    assert not (tmp_path / "runs" / "noid" / "ranked.png").exists()  # no image queries to show
    card = ModelCard.load(export(tmp_path / "runs" / "noid", tmp_path / "model") / "README.md")
    assert "- split: by image (the data names no identities)" in card.text
    assert "- test: 5 images" in card.text and "caption → image retrieval among the test images" in card.text
