"""`make bench`'s hand-written loop runs on the framework's data module as it is (a batch is images,
targets and sample keys)."""

from kd_experiments.bench import time_plain_loop


def test_the_plain_loop_of_make_bench_runs_a_step():
    assert time_plain_loop(1) > 0
