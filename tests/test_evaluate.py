"""`python -m handclip.evaluate`: a run, its export and its checkpoint score what the run reported; a model folder
of anyone's scores as a hub model on caption data; every refusal is one line, exit 2, nothing written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.fake_runs import HF_TINY, command, fake_run, one_error_line

SCORES = ("val/", "test/", "test_all/", "retrieval/", "zeroshot/")


def evaluate(*args) -> subprocess.CompletedProcess:
    """`python -m handclip.evaluate args`, in this process; its exit status and output as a subprocess gives them."""
    from handclip.train.evaluate import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as stop:
            code = stop.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def scores(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(SCORES) and k != "zeroshot/retention"}


def check_labelled(out: Path, result: subprocess.CompletedProcess, kind: str, given: str) -> dict:
    """metrics.json names what was loaded; the tables and figures call it that, never baseline or fine-tuned."""
    payload = json.loads((out / "metrics.json").read_text())
    label = f"{kind} {given}"
    assert payload["evaluated"]["kind"] == kind and payload["evaluated"]["label"].startswith(label)
    assert list(payload["runs"]) == [payload["evaluated"]["label"]] == list(payload["cmc"])
    printed = "".join(result.stdout.split())  # rich wraps long paths anywhere
    assert "".join(label.split()) in printed
    assert "baseline" not in printed and "fine-tuned" not in printed and "untrained" not in printed
    for name in ("cmc.png", "embeddings.png", "ranked.png"):
        assert (out / name).stat().st_size > 1000, name
    return payload


@pytest.mark.slow
def test_a_run_its_export_and_its_checkpoint_score_what_the_run_reported(tmp_path):
    from handclip.tools.export import export
    from tests.test_train import train

    # no WiSE-FT: the run reports best.ckpt's own weights; features from pixels, as evaluate computes them
    train(tmp_path, "eval.wise_ft=null", "eval.baseline=false", "data.activation_cache=false", "eval.ranked=5",
          "run_name=r")  # fmt: skip
    run = tmp_path / "runs" / "r"
    reported = json.loads((run / "metrics.json").read_text())
    expected = scores(reported["metrics"])
    assert "test/rank1" in expected and "test_all/rank1" in expected and "retrieval/text_to_image_R@1" in expected

    result = ok(evaluate(run, "--out", tmp_path / "of-run"))
    payload = check_labelled(tmp_path / "of-run", result, "run", str(run))
    assert scores(payload["metrics"]) == pytest.approx(expected, abs=1e-6)
    assert payload["evaluated"]["checkpoint"] == str(run / "checkpoints" / "best.ckpt")
    assert payload["evaluated"]["protocol"]["manifest"] == reported["manifest"]

    best = run / "checkpoints" / "best.ckpt"
    result = ok(evaluate(best, "--out", tmp_path / "of-checkpoint"))
    payload = check_labelled(tmp_path / "of-checkpoint", result, "checkpoint", str(best))
    assert scores(payload["metrics"]) == pytest.approx(expected, abs=1e-6)

    # an export knows nothing of its data: the run's data settings are given as train.py took them; the output
    # goes to the default folder under paths.runs
    export(run, tmp_path / "exported")
    cache = os.environ["HANDCLIP_CACHE"]
    data = ["experiment=demo", "data.source.identities=10", "data.source.image_size=[96,72]", "data.runs=2",
            f"paths.root={tmp_path}", f"paths.cache={cache}"]  # fmt: skip
    result = ok(evaluate(tmp_path / "exported", *data))
    out = tmp_path / "runs" / "evaluate" / "exported-synthetic"
    payload = check_labelled(out, result, "export", str(tmp_path / "exported"))
    assert scores(payload["metrics"]) == pytest.approx(expected, abs=1e-5)
    assert payload["evaluated"]["protocol"]["manifest"] == reported["manifest"]

    # again into the same folder: an earlier evaluation is replaced, not refused
    ok(evaluate(tmp_path / "exported", *data, "eval.text=false"))
    assert "retrieval/text_to_image_R@1" not in json.loads((out / "metrics.json").read_text())["metrics"]


def test_a_model_folder_of_anyones_is_a_hub_model_scored_on_caption_data(tmp_path):
    from tests.fake_runs import model_folder
    from tests.test_prepare import caption_folder

    folder = model_folder(tmp_path / "tiny-clip")
    data = caption_folder(tmp_path / "flowers", split=lambda n: "test" if n >= 12 else "train")
    out = tmp_path / "scored"
    result = ok(evaluate(folder, "data=captions", f"data.source.root={data}", "data.runs=2", "--out", out,
                         f"paths.root={tmp_path}"))  # fmt: skip
    payload = check_labelled(out, result, "hub", str(folder))
    assert payload["evaluated"]["path"] == str(folder)
    assert payload["evaluated"]["protocol"]["data"] == "captions"
    assert payload["evaluated"]["protocol"]["settings"]["source"]["root"] == str(data)
    assert 0.0 <= payload["metrics"]["test/rank1"] <= 1.0 and "retrieval/text_to_image_R@1" in payload["metrics"]
    assert (out / "ranked_text.png").is_file()
    # the split and the resized images in the cache, and nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "flowers", "scored", "tiny-clip"]


def _refused(result: subprocess.CompletedProcess, message: str, *untouched: Path, loaded: bool = False) -> None:
    """Exit 2 and one `error:` line naming the problem (`loaded`: after progress bars of what was loaded)."""
    if loaded:
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-2000:]
        line = errors[0]
    else:
        line = one_error_line(result)
    assert message in line, line
    for path in untouched:
        assert not path.exists(), path


def test_what_is_not_a_model_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    _refused(evaluate(tmp_path / "nothing", "--out", out), "no such run folder, checkpoint, export or model", out)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    _refused(evaluate(tmp_path / "stuff", "--out", out), "is not a model HandCLIP can evaluate", out)
    _refused(evaluate("--out", out), "give the model to evaluate", out)


def test_a_missing_dataset_and_settings_evaluate_does_not_read_are_refused_before_any_weights(tmp_path):
    run, out = tmp_path / "runs" / "r", tmp_path / "out"
    fake_run(run)
    missing = tmp_path / "no-such-data"
    _refused(evaluate(run, "data=captions", f"data.source.root={missing}", "eval=default", "--out", out),
             f"data.source.root={missing} does not exist", out)  # fmt: skip
    _refused(evaluate(run, "trainer.max_epochs=3", "--out", out), "evaluate reads only the data, eval and paths", out)
    _refused(evaluate(run, "backbone=tiny", "--out", out), "backbone= is for evaluating a backbone config", out)
    _refused(evaluate(run, "data.runs=1,2", "--out", out), "a sweep", out)


def test_an_output_folder_that_is_a_run_the_model_or_someone_elses_is_refused(tmp_path, synthetic_hands):
    run = tmp_path / "runs" / "r"
    fake_run(run)
    data = ["data=hands11k", f"data.source.root={synthetic_hands}", "eval=default"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    _refused(evaluate(run, *data, "--out", run), "is the model")
    _refused(evaluate(run, *data, "--out", run / "scores"), "is the model")
    fake_run(tmp_path / "runs" / "other")
    _refused(evaluate(run, *data, "--out", tmp_path / "runs" / "other"), "is a run directory")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    _refused(evaluate(run, *data, "--out", tmp_path / "mine"), "is not empty and is not an earlier evaluation")
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "other" not in p.parts
                   and "mine" not in p.parts)  # fmt: skip
    assert after == before


def test_a_checkpoint_of_another_backbone_is_refused_and_nothing_is_written(tmp_path, synthetic_hands):
    run, out = tmp_path / "runs" / "r", tmp_path / "out"
    fake_run(run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["backbone"]["config"]["projection_dim"] = 8  # the config names a backbone the weights do not fit
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    data = ["data=hands11k", f"data.source.root={synthetic_hands}", "eval=default", f"paths.cache={tmp_path}"]
    _refused(evaluate(run / "checkpoints" / "best.ckpt", *data, "--out", out), "does not fit the run's backbone", out,
             loaded=True)  # fmt: skip


def test_the_command_line_refuses_in_one_line_and_documents_itself(tmp_path):
    result = command(tmp_path / "nothing", module="handclip.evaluate")
    _refused(result, "no such run folder, checkpoint, export or model")
    shown = command("--help", module="handclip.evaluate")
    assert shown.returncode == 0
    for words in ("--out DIR", "KEY=VALUE", "run ", "checkpoint ", "export ", "soup ", "hub ", "metrics.json"):
        assert words in shown.stdout, words


def test_a_sweep_is_averaged_into_a_soup_scored_as_its_export_scores(tmp_path, synthetic_hands):
    from handclip.tools.soup import soup

    sweep = tmp_path / "runs" / "sweeps" / "s"
    for seed in (1, 2):
        fake_run(sweep / f"seed={seed}", seed=seed)
    soup(sweep, tmp_path / "souped")
    data = ["data=hands11k", f"data.source.root={synthetic_hands}", "data.runs=2", "eval=default",
            "eval.text=false", f"paths.root={tmp_path}"]  # fmt: skip
    made = check_labelled(tmp_path / "of-sweep", ok(evaluate(sweep, *data, "--out", tmp_path / "of-sweep")),
                          "soup", str(sweep))  # fmt: skip
    assert made["evaluated"]["soup"] == [str(sweep / "seed=1"), str(sweep / "seed=2")]
    exported = check_labelled(tmp_path / "of-export", ok(evaluate(tmp_path / "souped", *data, "--out",
                              tmp_path / "of-export")), "soup", str(tmp_path / "souped"))  # fmt: skip
    assert exported["evaluated"]["export"]["soup"] == made["evaluated"]["soup"]
    assert scores(exported["metrics"]) == pytest.approx(scores(made["metrics"]), abs=1e-5)


def test_a_run_that_reported_a_wise_ft_mix_is_exported_and_evaluated_as_that_mix(tmp_path):
    """A run's numbers and card describe the model it reported: with WiSE-FT (on by default), its selected weights
    mixed with its initial ones. Exporting or evaluating the run gives that model, not the unmixed checkpoint."""
    from handclip.build import build
    from handclip.model.exports import load_export
    from handclip.tools.export import export
    run = tmp_path / "run"
    trained = fake_run(run)
    payload = json.loads((run / "metrics.json").read_text())
    payload.update(wise_ft={"alpha": 0.25}, best_checkpoint=str(run / "checkpoints" / "best.ckpt"))
    (run / "metrics.json").write_text(json.dumps(payload))
    original = build(HF_TINY, "backbone").load(tmp_path / "cache").state_dict()
    mixed = load_export(export(run, tmp_path / "mixed"), tmp_path / "cache").state_dict()
    unmixed = load_export(export(run, tmp_path / "unmixed", alpha=1.0), tmp_path / "cache").state_dict()
    for name, value in trained.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(mixed[name], 0.25 * value + 0.75 * original[name], atol=1e-6), name
            assert torch.allclose(unmixed[name], value), name
    named = export(tmp_path / "run" / "checkpoints" / "best.ckpt", tmp_path / "file")  # a checkpoint the user names
    assert torch.allclose(load_export(named, tmp_path / "cache").state_dict()[name], trained.state_dict()[name])
