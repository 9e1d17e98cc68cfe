"""The benchmark's arithmetic (the benchmark itself runs on purpose, never in tests)."""

import pytest

from handclip.train.benchmark import median_rate


def test_a_step_slowed_by_a_shared_machine_does_not_move_the_rate():
    # steps of 1, 1, 8 and 1 seconds: the median step is 1 s, so 32 samples/s; the mean would say 11.6
    assert median_rate([0.0, 1.0, 2.0, 10.0, 11.0], 32) == pytest.approx(32.0)


@pytest.mark.parametrize("option", ["--steps", "--batch"])
def test_a_benchmark_without_a_timed_batch_is_refused_before_it_measures(tmp_path, option, capsys):
    from handclip.train.benchmark import main

    with pytest.raises(SystemExit) as stop:
        main([option, "0", "--json", str(tmp_path / "rows.json")])
    assert stop.value.code == 2 and f"{option}=0: give at least 1" in capsys.readouterr().err
    assert not (tmp_path / "rows.json").exists()
