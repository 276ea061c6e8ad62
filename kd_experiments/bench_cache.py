"""`make bench-cache`: what the teacher-output cache saves, measured on the documented command.

Runs `python -m kd_experiments` (resnet56 -> resnet20 from random weights, 32 px fake data with 100 classes,
batch 64, CPU, no validation) six times in subprocesses, each with a fresh run directory and one shared
cache directory:

  1. kd, teacher.output_cache=false     the teacher runs every step (the baseline)
  2. kd, teacher.output_cache=true      the first run of a study: runs the teacher and stores its logits
  3. kd, teacher.output_cache=true      a later seed-matched run: reads them
  4. dkd, teacher.output_cache=false    the DKD baseline
  5. dkd, teacher.output_cache=true     DKD reading what the kd run stored (same teacher, data and seed)
  6. ce                                 the student alone: no teacher at all, the ceiling of any cache

and reports each run's `train_images_per_s` from its summary.json (training batches only; the fastest of
`--repeats` passes over the six, each pass with a fresh cache, since a shared 2-core machine is noisy),
the speed-ups 3 / 1 and 5 / 4, the ceiling 6 / 1 (a cached run still trains the student, reads the stored
outputs and computes the loss terms: it cannot beat the student alone), and the disk the cache took per
stored sample (measured from the files), from which the disk cost of CIFAR-100 and ImageNet epochs follows.

    python -m kd_experiments.bench_cache [--epochs 3] [--repeats 2] [--output outputs/bench]
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from kd_experiments.bench import FRAMEWORK_COMMAND

# The pair and data of `make bench` (the method is set per run below), without the progress bar.
COMMAND = [arg for arg in FRAMEWORK_COMMAND if not arg.startswith("method=")]
COMMAND.append("++trainer.enable_progress_bar=false")
RUNS = [
    ("kd, teacher runs", "kd", False),
    ("kd, cache written", "kd", True),
    ("kd, cache read", "kd", True),
    ("dkd, teacher runs", "dkd", False),
    ("dkd, reading kd's cache", "dkd", True),
    ("ce, no teacher (the ceiling)", "ce", False),
]
# Samples per training epoch and the teacher outputs a method stores, for the disk-cost table.
DATA_SETS = {"CIFAR-100": 50_000, "ImageNet-1k": 1_281_167}
FEATURE_SIZES = {"CIFAR-100": {"logits": 100, "embedding (resnet32x4: 256)": 256},
                 "ImageNet-1k": {"logits": 1000, "embedding (RegNetY-160: 3024)": 3024}}  # fmt: skip


def run_once(method: str, cached: bool, epochs: int, root: Path, index: int) -> dict:
    run_dir = root / f"run{index}"
    command = [sys.executable, "-m", "kd_experiments", *COMMAND, f"method={method}"]
    command += [f"trainer.max_epochs={epochs}", f"hydra.run.dir={run_dir}", f"paths.log_dir={root}"]
    command += [f"paths.teacher_cache_dir={root / 'cache'}", f"teacher.output_cache={str(cached).lower()}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((run_dir / "summary.json").read_text())


def disk_per_sample(cache_root: Path) -> dict:
    """Bytes per stored sample of one epoch folder, per file (logits.npy, keys.npy), from the files."""
    epoch = next(cache_root.glob("outputs/*/epoch0000-rank0of1"))
    rows = json.loads((epoch / "meta.json").read_text())["rows"]
    return {path.name: path.stat().st_size / rows for path in sorted(epoch.glob("*.npy"))}


def measure(epochs: int, repeats: int, root: Path) -> list[dict]:
    """Each run's images/s over `repeats` passes (the fastest is kept), and its teacher batch counts."""
    rows = [
        {"run": label, "method": method, "output_cache": cached, "images_per_s_each": []}
        for label, method, cached in RUNS
    ]
    for _ in range(repeats):
        shutil.rmtree(root, ignore_errors=True)  # each pass starts with no cache: run 2 writes it
        root.mkdir(parents=True)
        for index, (label, method, cached) in enumerate(RUNS):
            summary = run_once(method, cached, epochs, root, index)
            outputs = summary["teacher_outputs"] or {"computed_batches": 0, "read_batches": 0}  # ce: None
            row = rows[index]
            row["images_per_s_each"].append(summary["train_images_per_s"])
            row |= {"computed_batches": outputs["computed_batches"], "read_batches": outputs["read_batches"]}
            print(f"{label:26s} {summary['train_images_per_s']:8.1f} images/s  ({outputs})", flush=True)
    for row in rows:
        row["images_per_s"] = max(row["images_per_s_each"])
    return rows


def markdown(result: dict) -> str:
    """The speed-up table and the disk-cost table of docs/benchmarks.md."""
    lines = ["| run | images/s | teacher batches computed / read |", "|---|---|---|"]
    for row in result["runs"]:
        batches = f"{row['computed_batches']} / {row['read_batches']}"
        lines.append(f"| {row['run']} | {row['images_per_s']:.1f} | {batches} |")
    lines += ["", f"kd: cached / uncached = **{result['kd_speedup_read_over_uncached']}x** "
              f"(writing: {result['kd_write_cost_written_over_uncached']}x); dkd on kd's cache: "
              f"**{result['dkd_speedup_on_kd_cache']}x**; the student alone (ce) / kd uncached = "
              f"{result['ceiling_ce_over_kd_uncached']}x, the most any cache can give kd", ""]  # fmt: skip
    per_sample = result["bytes_per_sample_float16"]
    key_bytes = per_sample["keys.npy"]
    logit_bytes_per_value = per_sample["logits.npy"] / 100  # 100 classes stored per sample
    lines += ["| data set | stored per sample | float16 per epoch | float32 per epoch |", "|---|---|---|---|"]
    for name, samples in DATA_SETS.items():
        for feature, size in FEATURE_SIZES[name].items():
            half = samples * (size * logit_bytes_per_value + key_bytes) / 1e9
            single = samples * (size * 2 * logit_bytes_per_value + key_bytes) / 1e9
            lines.append(f"| {name} ({samples:,}) | {feature} | {half:.3f} GB | {single:.3f} GB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs of 32 steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the runs; fastest counts")
    parser.add_argument("--output", default="outputs/bench", help="where runs and cache.json go")
    args = parser.parse_args()
    output = Path(args.output).resolve()
    root = output / "cache_runs"
    rows = measure(args.epochs, args.repeats, root)
    speed = {row["run"]: row["images_per_s"] for row in rows}

    def ratio(numerator: str, denominator: str) -> float:
        return round(speed[numerator] / speed[denominator], 2)

    result = {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "epochs": args.epochs,
        "repeats": args.repeats,
        "runs": rows,
        "kd_speedup_read_over_uncached": ratio("kd, cache read", "kd, teacher runs"),
        "kd_write_cost_written_over_uncached": ratio("kd, cache written", "kd, teacher runs"),
        "dkd_speedup_on_kd_cache": ratio("dkd, reading kd's cache", "dkd, teacher runs"),
        "ceiling_ce_over_kd_uncached": ratio("ce, no teacher (the ceiling)", "kd, teacher runs"),
        "bytes_per_sample_float16": disk_per_sample(root / "cache"),
    }
    (output / "cache.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (output / "cache.md").write_text(table + "\n")
    print(table)
    print(f"written: {output / 'cache.json'}, {output / 'cache.md'}")


if __name__ == "__main__":
    main()
