"""VkD's orthogonal projector: one forward + backward on a batch of 64, on one CPU thread, through torch's
`parametrizations.orthogonal` and through `methods.vkd.HouseholderStiefel` (the same map; docs/benchmarks.md).

    python -m kd_experiments.bench_projector [--dims 192x256,192x3024,384x3024]
"""

import argparse
import time

import torch
from torch.nn.utils.parametrizations import orthogonal

from kd_experiments.methods.vkd import orthogonal_linear


def projector(student_dim: int, teacher_dim: int, implementation: str) -> torch.nn.Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(student_dim, teacher_dim, bias=False)
    return orthogonal(linear) if implementation == "torch" else orthogonal_linear(linear)


def milliseconds_per_step(linear: torch.nn.Linear, student_dim: int, repeats: int) -> float:
    inputs = torch.randn(64, student_dim)
    linear(inputs).sum().backward()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        linear(inputs).sum().backward()
    return (time.perf_counter() - started) / repeats * 1000


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", default="192x256,192x3024,384x3024", help="student x teacher widths")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (3 for torch's slow wide case)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {pair: time_pair(pair, args.repeats) for pair in args.dims.split(",")}
    finally:
        torch.set_num_threads(threads)


def time_pair(pair: str, repeats: int) -> dict[str, float]:
    student_dim, teacher_dim = (int(width) for width in pair.split("x"))
    times = {}
    for implementation in ("torch", "HouseholderStiefel"):
        slow = implementation == "torch" and student_dim * teacher_dim > 100_000
        linear = projector(student_dim, teacher_dim, implementation)
        times[implementation] = milliseconds_per_step(
            linear, student_dim, min(repeats, 3) if slow else repeats
        )
    print(f"{student_dim} -> {teacher_dim}: torch {times['torch']:.1f} ms, HouseholderStiefel "
          f"{times['HouseholderStiefel']:.1f} ms per forward + backward")  # fmt: skip
    return times


if __name__ == "__main__":
    main()
