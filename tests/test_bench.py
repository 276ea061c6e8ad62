"""`make bench`'s hand-written loop runs on the framework's data module as it is (a batch is images,
targets and sample keys)."""

from kd_experiments.bench import time_plain_loop


def test_the_plain_loop_of_make_bench_runs_a_step():
    assert time_plain_loop(1) > 0


def test_the_projector_benchmark_times_both_implementations(capsys):
    from kd_experiments.bench_projector import main

    results = main(["--dims", "4x8,8x4", "--repeats", "2"])
    assert set(results) == {"4x8", "8x4"}
    assert all(set(times) == {"torch", "HouseholderStiefel"} for times in results.values())
    assert all(value > 0 for times in results.values() for value in times.values())
    assert "4 -> 8: torch" in capsys.readouterr().out
