"""`make bench`: the framework's time per training step against a plain PyTorch loop doing the same work.

Both train resnet20 from a random resnet56 teacher (from `create_model`) with Hinton KD on the same fake
32x32 data (100 classes, batch 64), SGD, no validation. Each is timed at two run lengths and the time per
step is the difference divided by the extra steps, so start-up (imports, model building) cancels out. The
framework is timed as the documented command, end to end, in a subprocess.

    python -m kd_experiments.bench [--short 40] [--long 240] [--repeats 2]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FRAMEWORK_COMMAND = [
    "dataset=fake",
    "dataset.image_size=32",
    "dataset.num_classes=100",
    "dataset.batch_size=64",
    "teacher=resnet56",
    "student=resnet20",
    "teacher.weights=random",
    "method=kd",
    "++trainer.limit_val_batches=0",
    "logger=none",
]


def time_framework(steps: int, output_root: Path) -> float:
    """Wall seconds of `python -m kd_experiments <FRAMEWORK_COMMAND> trainer.max_steps=steps`."""
    command = [sys.executable, "-m", "kd_experiments", *FRAMEWORK_COMMAND, f"trainer.max_steps={steps}"]
    command.append(f"paths.log_dir={output_root}")
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def time_plain_loop(steps: int) -> float:
    """Wall seconds of a hand-written loop doing the framework's work for `steps` steps, model building
    and data set-up included (they cancel out in the difference, as the framework's start-up does)."""
    from kd_experiments.data.fake import FakeData
    from kd_experiments.losses import kd_loss
    from kd_experiments.models import create_model

    started = time.perf_counter()
    torch.manual_seed(0)
    teacher = create_model("resnet56", num_classes=100).eval().requires_grad_(False)
    student = create_model("resnet20", num_classes=100).train()
    data = FakeData(batch_size=64, num_classes=100, image_size=32)
    data.setup()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    done = 0
    while done < steps:
        for images, targets, _keys in data.train_dataloader():
            with torch.no_grad():
                teacher_logits = teacher(images)
            student_logits = student(images)
            loss = 0.1 * F.cross_entropy(student_logits, targets) + 0.9 * kd_loss(
                student_logits, teacher_logits, 4.0
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - started


def per_step(timer, short: int, long: int, repeats: int) -> float:
    """Seconds per step from the difference of two run lengths; the fastest of `repeats` tries each."""
    short_s = min(timer(short) for _ in range(repeats))
    long_s = min(timer(long) for _ in range(repeats))
    return (long_s - short_s) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", type=int, default=40, help="steps of the short run")
    parser.add_argument("--long", type=int, default=240, help="steps of the long run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per length; the fastest counts")
    parser.add_argument("--output", default="outputs/bench", help="where runs and bench.json go")
    args = parser.parse_args()
    output_root = Path(args.output).resolve()
    output_root.mkdir(parents=True, exist_ok=True)

    time_plain_loop(5)  # warm caches (imports, allocator) before timing
    plain = per_step(time_plain_loop, args.short, args.long, args.repeats)
    framework = per_step(
        lambda steps: time_framework(steps, output_root), args.short, args.long, args.repeats
    )
    result = {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "steps": [args.short, args.long],
        "plain_s_per_step": round(plain, 4),
        "framework_s_per_step": round(framework, 4),
        "plain_images_per_s": round(64 / plain, 1),
        "framework_images_per_s": round(64 / framework, 1),
        "ratio_framework_over_plain": round(framework / plain, 3),
        "target_ratio": 1.10,
    }
    (output_root / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"plain loop : {plain * 1000:7.1f} ms/step  ({result['plain_images_per_s']} images/s)")
    print(f"framework  : {framework * 1000:7.1f} ms/step  ({result['framework_images_per_s']} images/s)")
    verdict = "within" if result["ratio_framework_over_plain"] <= 1.10 else "OVER"
    print(f"ratio      : {result['ratio_framework_over_plain']:.3f}  ({verdict} the 1.10 target)")
    print(f"written    : {output_root / 'bench.json'}")


if __name__ == "__main__":
    main()
