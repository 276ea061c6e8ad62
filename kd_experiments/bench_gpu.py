"""The GPU fast path benchmark: training images/s of the framework against a plain PyTorch loop doing the
same work, with bf16-mixed autocast, channels_last and (with --compile) torch.compile, on fake data.

Cases (`--cases`):
  vit    RegNetY-160 (timm regnety_160, random weights) -> DeiT-Ti (student=deit_ti, two heads), method deit
         (hard distillation token), 224 px (`--image-size`), batch 256 (`--vit-batch-size`), AdamW.
  cifar  resnet32x4 -> resnet8x4, Hinton KD (T 4, 0.1 CE + 0.9 KD), 32 px, batches 64, 128, 256, 512
         (`--batch-sizes`), SGD with momentum.

Each side trains `--warmup` steps untimed (cuDNN autotuning, compilation, the allocator's first blocks), then
`--steps` timed steps between two device synchronisations: images/s = steps x batch / seconds, batch loading
included. The framework runs in this process as `python -m kd_experiments OVERRIDES` runs (Hydra's entry
point; the overrides are in the JSON), with its progress bar, logging, callbacks and no validation, plus a
timing callback (`StepTimer`). The plain loop is a hand-written loop over the same data loader (`FakeData`)
with the same models, optimizer and loss weights (read from the config those overrides compose), autocast
and memory format, and nothing else. Weights are random: nothing is downloaded. Goal: framework / plain
>= 0.95.

    python -m kd_experiments.bench_gpu                          # both cases on the GPU
    python -m kd_experiments.bench_gpu --compile                # the same with torch.compile (inductor)
    python -m kd_experiments.bench_gpu --device cpu --steps 3 --warmup 1 --image-size 32 \\
        --vit-batch-size 4 --batch-sizes 8 --vit-teacher convnet_wide \\
        --cifar-teacher convnet_wide --cifar-student convnet_narrow    # a smoke run on the CPU

Writes OUTPUT/bench_gpu.json and prints a markdown table.
"""

import argparse
import gc
import json
import os
import runpy
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

GOAL = 0.95  # framework images/s over the plain loop's


class StepTimer(pl.Callback):
    """Times `steps` training steps after `warmup` ones, from the end of step `warmup` to the end of step
    `warmup + steps` (each end after a device synchronisation), and writes images/s to `result_file`. Added
    to the framework's run by the benchmark as `+callbacks.bench_timer`.

    On a GPU it also counts host syncs (torch.cuda.set_sync_debug_mode) in each timed step that is not a
    logging step (those read the logged numbers by design): from this step's start to this callback's end of
    it, so the training step, backward, optimizer step and the callbacks listed before this one."""

    def __init__(self, warmup: int, steps: int, result_file: str):
        self.warmup, self.steps, self.result_file = warmup, steps, Path(result_file)
        self._started: float | None = None
        self._images = 0
        self._watch: warnings.catch_warnings | None = None
        self._caught: list = []
        self._syncs = self._watched_steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        logs = (trainer.global_step + 1) % trainer.log_every_n_steps == 0  # this step's count once it ends
        if self._started is not None and pl_module.device.type == "cuda" and not logs:
            self._watch = warnings.catch_warnings(record=True)
            self._caught = self._watch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._watch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._watch.__exit__(None, None, None)
            self._syncs += sum("synchroniz" in str(caught.message) for caught in self._caught)
            self._watched_steps += 1
            self._watch = None
        if trainer.global_step == self.warmup:
            _synchronize(pl_module.device)
            self._started = time.perf_counter()
        elif self._started is not None:
            self._images += len(batch[0]) * trainer.world_size
            if trainer.global_step == self.warmup + self.steps:
                _synchronize(pl_module.device)
                seconds = time.perf_counter() - self._started
                result = {"images_per_s": self._images / seconds, "seconds": seconds, "images": self._images}
                if self._watched_steps:
                    result |= {"host_syncs": self._syncs, "watched_steps": self._watched_steps}
                self.result_file.write_text(json.dumps(result))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def case_runs(args) -> list[dict]:
    """What to measure: one entry per (case, batch size)."""
    runs = []
    if "vit" in args.cases:
        runs.append(
            {
                "case": "vit",
                "teacher": args.vit_teacher,
                "student": args.vit_student,
                "method": "deit",
                "image_size": args.image_size,
                "batch_size": args.vit_batch_size,
                "num_classes": 1000,
            }
        )
    if "cifar" in args.cases:
        for batch in args.batch_sizes:
            runs.append(
                {
                    "case": "cifar",
                    "teacher": args.cifar_teacher,
                    "student": args.cifar_student,
                    "method": "kd",
                    "image_size": 32,
                    "batch_size": batch,
                    "num_classes": 100,
                }
            )
    return runs


def framework_overrides(run: dict, args, output_root: Path, result_file: Path) -> list[str]:
    """The `python -m kd_experiments` overrides of one measurement (the timer callback last)."""
    batch = run["batch_size"]
    overrides = [
        f"teacher={run['teacher']}",
        f"student={run['student']}",
        f"method={run['method']}",
        "teacher.weights=random",
        "teacher.pretrained=null",
        "teacher.reference_top1=null",
        "dataset=fake",
        f"dataset.image_size={run['image_size']}",
        f"dataset.num_classes={run['num_classes']}",
        f"dataset.batch_size={batch}",
        f"dataset.train_length={(args.warmup + args.steps + 2) * batch}",  # one epoch covers the run
        f"dataset.num_workers={args.num_workers}",
        f"dataset.pin_memory={str(args.pin_memory).lower()}",
        f"trainer.precision={args.precision}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.max_steps={args.warmup + args.steps}",
        f"++trainer.benchmark={str(args.cudnn_benchmark).lower()}",
        "++trainer.limit_val_batches=0",
        f"channels_last={str(args.channels_last).lower()}",
        f"matmul_precision={args.matmul_precision}",
        "logger=none",
        f"paths.log_dir={output_root}",
    ]
    if args.compile:
        overrides += [
            "compile.student=true",
            "compile.teacher=true",
            f"compile.backend={args.compile_backend}",
        ]
        if args.compile_mode:
            overrides.append(f"compile.mode={args.compile_mode}")
    return overrides + [
        "+callbacks.bench_timer._target_=kd_experiments.bench_gpu.StepTimer",
        f"+callbacks.bench_timer.warmup={args.warmup}",
        f"+callbacks.bench_timer.steps={args.steps}",
        f"+callbacks.bench_timer.result_file={result_file}",
    ]


def framework_images_per_s(overrides: list[str], result_file: Path) -> dict:
    """Run the framework's entry point in this process with `overrides`; its StepTimer's result (images/s,
    and on a GPU the host syncs counted in steps that do not log). As `python -m kd_experiments` runs it:
    runpy executes the package's __main__ without registering it as a module."""
    result_file.unlink(missing_ok=True)
    argv = sys.argv
    sys.argv = [str(Path(__file__).with_name("__main__.py")), *overrides]
    try:
        runpy.run_module("kd_experiments", run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(
                f"the framework run failed (exit {exit_.code}): {' '.join(overrides)}"
            ) from None
    finally:
        sys.argv = argv
    return json.loads(result_file.read_text())


def composed_config(overrides: list[str]):
    """The config the framework composes from `overrides` (the plain loop reads its models, optimizer and
    loss weights from it, so both sides do the same work)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="kd_experiments.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def _plain_networks(cfg, run: dict, device: torch.device, channels_last: bool):
    """The frozen teacher and the training student, built as the framework builds them."""
    from omegaconf import OmegaConf

    from kd_experiments.models import create_model

    networks = []
    for node in (cfg.teacher, cfg.student):
        kwargs = OmegaConf.to_container(node.model_kwargs, resolve=True)
        network = create_model(
            node.arch, num_classes=run["num_classes"], image_size=run["image_size"], **kwargs
        )
        networks.append(network.to(device))
    teacher, student = networks
    teacher.eval().requires_grad_(False)
    student.train()
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    return teacher, student


def _plain_loss(cfg, method: str, student):
    """The method's loss written out: Hinton KD + CE, or DeiT's hard distillation on the second head."""
    from kd_experiments.losses import kd_loss

    weights = cfg.method.weights
    if method == "deit":
        if cfg.method.objectives.distill.kind != "hard":
            raise ValueError("the plain loop implements the deit method's hard distillation only")
        student.set_distilled_training(True)  # forward gives (class head, distillation head)

        def deit_loss(student_out, teacher_logits, targets):
            logits, distill_logits = student_out
            hard = teacher_logits.argmax(dim=1)
            return weights.ce * F.cross_entropy(logits, targets) + weights.distill * F.cross_entropy(
                distill_logits, hard
            )

        return deit_loss
    temperature = cfg.method.objectives.kd.temperature

    def hinton_loss(student_logits, teacher_logits, targets):
        kd = kd_loss(student_logits, teacher_logits, temperature)
        return weights.ce * F.cross_entropy(student_logits, targets) + weights.kd * kd

    return hinton_loss


def plain_images_per_s(run: dict, args, overrides: list[str]) -> float:
    """The hand-written loop: the framework's work for `run`, timed as StepTimer times the framework."""
    from hydra.utils import instantiate

    from kd_experiments.data.fake import FakeData

    cfg = composed_config(overrides)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    batch = run["batch_size"]
    teacher, student = _plain_networks(cfg, run, device, args.channels_last)
    optimizer = instantiate(cfg.optimizer)(student)  # timm's factory, as the framework builds it
    loss_fn = _plain_loss(cfg, run["method"], student)
    teacher_fn, student_fn = teacher, student
    if args.compile:
        options = {"backend": args.compile_backend, "mode": args.compile_mode, "dynamic": False}
        teacher_fn, student_fn = torch.compile(teacher, **options), torch.compile(student, **options)
    data = FakeData(
        batch_size=batch,
        num_classes=run["num_classes"],
        image_size=run["image_size"],
        train_length=(args.warmup + args.steps + 2) * batch,
        num_workers=args.num_workers,
        pin_memory=args.pin_memory,
    )
    data.setup("fit")
    autocast = args.precision.startswith("bf16")
    started = None
    for done, batch_data in enumerate(data.train_dataloader(), start=1):
        images = batch_data[0].to(device, non_blocking=True)
        targets = batch_data[1].to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                teacher_logits = teacher_fn(images)
            loss = loss_fn(student_fn(images), teacher_logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if done == args.warmup:
            _synchronize(device)
            started = time.perf_counter()
        elif done == args.warmup + args.steps:
            _synchronize(device)
            return args.steps * batch / (time.perf_counter() - started)
    raise RuntimeError("the fake data set ran out before the timed steps ended")


def _release_memory() -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def markdown_table(results: list[dict]) -> str:
    """One row per measurement; `host syncs` = syncs counted / timed steps watched (GPU only, goal 0)."""
    header = "| case | teacher -> student | px | batch | framework img/s | plain img/s | ratio |"
    lines = [f"{header} goal >= {GOAL} | host syncs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        verdict = "yes" if r["ratio"] >= GOAL else "**no**"
        syncs = r.get("framework_host_syncs")
        watched = "-" if syncs is None else f"{syncs} in {r['framework_steps_watched']} steps"
        lines.append(
            f"| {r['case']} ({r['method']}) | {r['teacher']} -> {r['student']} | {r['image_size']} | "
            f"{r['batch_size']} | {r['framework_images_per_s']:.1f} | {r['plain_images_per_s']:.1f} | "
            f"{r['ratio']:.3f} | {verdict} | {watched} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if cuda else "cpu")
    parser.add_argument("--cases", default="vit,cifar", help="comma-separated: vit, cifar")
    parser.add_argument("--batch-sizes", default="64,128,256,512", help="the cifar case's batch sizes")
    parser.add_argument("--vit-batch-size", type=int, default=256)
    parser.add_argument("--vit-teacher", default="regnety_160", help="a teacher config name")
    parser.add_argument("--vit-student", default="deit_ti", help="a two-headed DeiT student config name")
    parser.add_argument("--cifar-teacher", default="resnet32x4", help="a teacher config name")
    parser.add_argument("--cifar-student", default="resnet8x4", help="a student config name")
    parser.add_argument("--image-size", type=int, default=224, help="the vit case's image size")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--precision", default="bf16-mixed", choices=("bf16-mixed", "32-true"))
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--matmul-precision", default="high", choices=("highest", "high", "medium"))
    parser.add_argument("--num-workers", type=int, default=None, help="loader workers (default: 8 on cuda)")
    parser.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--output", default="outputs/bench_gpu", help="where runs and bench_gpu.json go")
    args = parser.parse_args(argv)
    args.cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = set(args.cases) - {"vit", "cifar"}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; use vit and/or cifar")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda but torch sees no GPU; use --device cpu for a smoke run")
    if args.num_workers is None:
        args.num_workers = min(8, os.cpu_count() or 1) if args.device == "cuda" else 0
    if args.pin_memory is None:
        args.pin_memory = args.device == "cuda"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_root = Path(args.output).resolve()
    output_root.mkdir(parents=True, exist_ok=True)
    result_file = output_root / "step_timer.json"
    results = []
    for run in case_runs(args):
        overrides = framework_overrides(run, args, output_root, result_file)
        _release_memory()
        timed = framework_images_per_s(overrides, result_file)
        framework = timed["images_per_s"]
        _release_memory()
        plain = plain_images_per_s(run, args, overrides)
        _release_memory()
        result = run | {
            "framework_images_per_s": round(framework, 1),
            "plain_images_per_s": round(plain, 1),
            "ratio": round(framework / plain, 3),
            # Host syncs in the framework's timed steps that do not log (GPU only; goal 0).
            "framework_host_syncs": timed.get("host_syncs"),
            "framework_steps_watched": timed.get("watched_steps"),
            "framework_command": "python -m kd_experiments " + " ".join(overrides[:-4]),
        }
        results.append(result)
        print(
            f"{run['case']} batch {run['batch_size']}: framework {framework:.1f}, plain {plain:.1f} images/s",
            flush=True,
        )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": {"backend": args.compile_backend, "mode": args.compile_mode} if args.compile else None,
        "cudnn_benchmark": args.cudnn_benchmark,
        "matmul_precision": args.matmul_precision,
        "num_workers": args.num_workers,
        "pin_memory": args.pin_memory,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "goal_ratio": GOAL,
        "results": results,
    }
    (output_root / "bench_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(results))
    print(f"written: {output_root / 'bench_gpu.json'}")
    return report


if __name__ == "__main__":
    main()
