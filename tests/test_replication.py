"""Replicated sweeps: intervals, paired comparisons and verdicts, checked against scipy on the same numbers."""

import csv
import json
import math
import re

import numpy as np
import pytest
import yaml
from scipy import stats

from handclip.eval.replication import interval, replicate
from handclip.train.sweep import collect_runs, write_summary

SEEDS, DRAWS = (0, 1, 2), (0, 1, 2)


def write_run(folder, blocks, seed, draw, rank1, baseline, manifest="data/splits/demo_draw{draw}.csv", failed=False,
              protocol=None):  # fmt: skip
    folder.mkdir(parents=True)
    config = {"seed": seed, "freeze": {"vision_blocks": blocks}, "data": {"draw": draw}, "trainer": {"max_epochs": 2}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if failed:
        (folder / "failed.json").write_text(json.dumps({"error": "RuntimeError: out of memory", "config": config}))
        return
    metrics = {"test/rank1": rank1, "baseline/test/rank1": baseline, "test/mAP": rank1 + 0.1,
               "baseline/test/mAP": baseline + 0.1, "val/rank1": rank1}  # fmt: skip
    payload = {"metrics": metrics, "manifest": manifest.format(draw=draw)}
    if protocol:  # as the published protocol states itself: the merged gallery (0.2 below) is its headline
        metrics.update({"test_all/rank1": rank1 - 0.2, "baseline/test_all/rank1": baseline - 0.25,
                        "test_all/mAP": rank1 - 0.1, "baseline/test_all/mAP": baseline - 0.15})  # fmt: skip
        payload["protocol"] = {"name": protocol, "headline": "test_all" if protocol == "published" else "test"}
    (folder / "metrics.json").write_text(json.dumps(payload))


def sweep_of(tmp_path, deltas, noise=0.0, **extra):
    """Groups vision_blocks=0,2,4 over 3 seeds x 3 draws; group g's test Rank-1 is the shared base + deltas[g]."""
    rng = np.random.default_rng(0)
    base = {(s, d): 0.3 + 0.05 * d + 0.01 * s for s in SEEDS for d in DRAWS}
    values = {}
    for blocks, delta in deltas.items():
        for (seed, draw), b in base.items():
            value = b + delta + (noise * rng.standard_normal() if delta else 0.0)
            values[blocks, seed, draw] = value
            write_run(tmp_path / f"blocks={blocks},seed={seed},draw={draw}", blocks, seed, draw, value, b - 0.02,
                      **extra.get((blocks, seed, draw), {}))  # fmt: skip
    return values


def read(path):
    return list(csv.DictReader(open(path)))


def test_intervals_p_values_and_verdicts_agree_with_scipy(tmp_path, capsys):
    values = sweep_of(tmp_path, {0: 0.0, 2: 0.0, 4: 0.06}, noise=0.01)
    write_summary(tmp_path)
    out = capsys.readouterr().out
    summary = {row["group"]: row for row in read(tmp_path / "summary.csv")}
    assert set(summary) == {"vision_blocks=0", "vision_blocks=2", "vision_blocks=4"}
    for blocks in (0, 2, 4):
        row = summary[f"vision_blocks={blocks}"]
        sample = [values[blocks, s, d] for s in SEEDS for d in DRAWS]
        low, high = stats.t.interval(0.95, len(sample) - 1, loc=np.mean(sample), scale=stats.sem(sample))
        assert int(row["n"]) == 9
        assert float(row["test/rank1_mean"]) == pytest.approx(np.mean(sample))
        assert float(row["test/rank1_std"]) == pytest.approx(np.std(sample, ddof=1))
        assert float(row["test/rank1_ci95"]) == pytest.approx((high - low) / 2)
        gain = [v - (0.3 + 0.05 * d + 0.01 * s - 0.02) for (b, s, d), v in values.items() if b == blocks]
        assert float(row["gain/test/rank1_mean"]) == pytest.approx(np.mean(gain))
    comparisons = {(r["a"], r["b"], r["metric"]): r for r in read(tmp_path / "comparisons.csv")}
    known = comparisons["vision_blocks=0", "vision_blocks=4", "test/rank1"]
    a = [values[0, s, d] for s in SEEDS for d in DRAWS]
    b = [values[4, s, d] for s in SEEDS for d in DRAWS]
    differences = np.subtract(a, b)
    low, high = stats.t.interval(0.95, 8, loc=differences.mean(), scale=stats.sem(differences))
    assert float(known["difference"]) == pytest.approx(-0.06, abs=0.01)
    assert float(known["difference"]) == pytest.approx(differences.mean())
    assert float(known["ci95_low"]) == pytest.approx(low) and float(known["ci95_high"]) == pytest.approx(high)
    assert float(known["p_value"]) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert int(known["pairs"]) == 9 and float(known["p_value"]) < 0.001
    same = comparisons["vision_blocks=0", "vision_blocks=2", "test/rank1"]
    assert float(same["difference"]) == 0.0 and float(same["p_value"]) == 1.0
    assert re.search(r"vision_blocks=0 trails vision_blocks=4 by -\d\.\d test Rank-1, 95% CI \[-\d\.\d, -\d\.\d\], "
                     r"p=\S+, 9 paired runs", out), out
    assert "vision_blocks=0 and vision_blocks=2 do not differ on test Rank-1" in out
    assert (tmp_path / "summary.png").stat().st_size > 1000 and (tmp_path / "runs.csv").is_file()
    for path in ("summary.csv", "comparisons.csv"):
        assert "nan" not in (tmp_path / path).read_text().lower()


def test_a_single_run_per_group_a_failed_run_and_other_data_are_said_never_nan(tmp_path, capsys):
    write_run(tmp_path / "a", 0, 0, 0, 0.4, 0.3)
    write_run(tmp_path / "b", 2, 0, 0, 0.5, 0.3)
    write_run(tmp_path / "c", 2, 1, 0, 0.5, 0.3, failed=True)
    write_run(tmp_path / "d", 4, 0, 0, 0.6, 0.3, manifest="elsewhere/splits/other{draw}.csv")
    write_run(tmp_path / "e", 4, 1, 0, 0.6, 0.3, manifest="elsewhere/splits/other{draw}.csv")
    write_summary(tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert "vision_blocks=0 has a single finished run: no 95% interval" in out
    assert "c (vision_blocks=2) failed: left out" in out
    assert "not compared on test Rank-1" in out and "share draw and seed but not their data" in out
    summary = {row["group"]: row for row in read(tmp_path / "summary.csv")}
    assert summary["vision_blocks=0"]["n"] == "1" and summary["vision_blocks=0"]["test/rank1_ci95"] == ""
    assert summary["vision_blocks=4"]["n"] == "2" and float(summary["vision_blocks=4"]["test/rank1_ci95"]) == 0.0
    rows = read(tmp_path / "comparisons.csv")
    single = next(r for r in rows if (r["a"], r["b"], r["metric"]) == ("vision_blocks=0", "vision_blocks=2",
                                                                       "test/rank1"))  # fmt: skip
    assert float(single["difference"]) == pytest.approx(-0.1) and single["ci95"] == "" and single["p_value"] == ""
    other = next(r for r in rows if (r["a"], r["b"], r["metric"]) == ("vision_blocks=0", "vision_blocks=4",
                                                                      "test/rank1"))  # fmt: skip
    assert other["difference"] == "" and "not their data" in other["note"]
    for path in ("summary.csv", "comparisons.csv"):
        assert "nan" not in (tmp_path / path).read_text().lower()


def test_the_published_protocol_heads_with_the_merged_gallery_and_protocols_are_never_compared(tmp_path, capsys):
    for blocks, value in ((0, 0.5), (4, 0.6)):
        for seed in (0, 1):
            write_run(tmp_path / f"b{blocks}s{seed}", blocks, seed, 0, value + 0.01 * seed, 0.4, protocol="published")
    write_summary(tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert "test_all: gallery merged over aspects, published protocol" in out
    assert re.search(r"vision_blocks=0 trails vision_blocks=4 by -10\.0 merged-gallery Rank-1", out), out
    summary = {row["group"]: row for row in read(tmp_path / "summary.csv")}
    assert float(summary["vision_blocks=4"]["gain/test_all/rank1_mean"]) == pytest.approx(0.6 + 0.005 - 0.2 - 0.15)

    # one group scored by HandCLIP's protocol, the other by the published one: the same names, other numbers
    for seed in (0, 1):
        (tmp_path / f"b0s{seed}" / "metrics.json").unlink()
        (tmp_path / f"b0s{seed}" / "config.yaml").unlink()
        (tmp_path / f"b0s{seed}").rmdir()
        write_run(tmp_path / f"b0s{seed}", 0, seed, 0, 0.5 + 0.01 * seed, 0.4, protocol="handclip")
    write_summary(tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert "follow different evaluation protocols (handclip vs published: eval.protocol)" in out
    rows = read(tmp_path / "comparisons.csv")
    assert all(r["difference"] == "" and "different evaluation protocols" in r["note"] for r in rows)


def test_groups_are_the_swept_settings_other_than_seed_and_draw(tmp_path):
    sweep_of(tmp_path, {0: 0.0, 4: 0.05})
    swept, runs = collect_runs(tmp_path)
    assert swept == ["data.draw", "freeze.vision_blocks", "seed"]
    result = replicate(runs, swept)
    assert result.swept == ["freeze.vision_blocks"] and sorted(len(g) for g in result.groups.values()) == [9, 9]
    spread = interval([1.0, 2.0, 3.0])
    assert spread.mean == 2.0 and math.isclose(spread.ci95, stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))


def test_a_setting_that_follows_the_seed_replicates_and_does_not_group(tmp_path, capsys):
    # every real run resolves data.run_seed: ${seed}, so it differs between runs exactly as the seed does; grouped
    # by it, each seed was a group of its own and no pair could be compared
    sweep_of(tmp_path, {2: 0.0, 4: 0.05}, noise=0.01)
    for config_path in tmp_path.glob("*/config.yaml"):
        config = yaml.safe_load(config_path.read_text())
        config["data"]["run_seed"] = config["seed"]
        config_path.write_text(yaml.safe_dump(config))
    swept, runs = collect_runs(tmp_path)
    assert swept == ["data.draw", "data.run_seed", "freeze.vision_blocks", "seed"]
    result = replicate(runs, swept)
    assert result.swept == ["freeze.vision_blocks"] and sorted(len(g) for g in result.groups.values()) == [9, 9]
    write_summary(tmp_path)
    verdict = r"vision_blocks=2 trails vision_blocks=4 by -5\.\d test Rank-1, .*, 9 paired runs"
    assert re.search(verdict, capsys.readouterr().out)
    assert {row["group"] for row in read(tmp_path / "summary.csv")} == {"vision_blocks=2", "vision_blocks=4"}


def test_a_swept_config_group_names_its_groups_as_the_command_line_did(tmp_path, capsys):
    # freeze=full,lp_ft differ in many settings inside the group (_target_, stages...): the groups are named
    # freeze=full and freeze=lp_ft, as swept, not by every setting that differs
    policies = {"full": {"_target_": "handclip.model.freeze.Full"},
                "lp_ft": {"_target_": "handclip.model.schedule.Staged", "stages": {"0": {"_target_": "Frozen"}}}}
    for name, freeze in policies.items():
        for seed in SEEDS:
            for draw in DRAWS:
                folder = tmp_path / f"data.draw={draw},data.source.image_size=[96,72],freeze={name},seed={seed}"
                write_run(folder, 0, seed, draw, 0.4 + (0.1 if name == "full" else 0.0) + 0.01 * seed, 0.3)
                config = yaml.safe_load((folder / "config.yaml").read_text())
                config["freeze"] = freeze
                (folder / "config.yaml").write_text(yaml.safe_dump(config))
    write_summary(tmp_path)
    assert {row["group"] for row in read(tmp_path / "summary.csv")} == {"freeze=full", "freeze=lp_ft"}
    assert re.search(r"freeze=full beats freeze=lp_ft by \+10\.0 test Rank-1", capsys.readouterr().out)
