"""`make bench-methods`: what each distillation method costs per training step (time, extra trainable
parameters, memory), like mdistiller's cost figure.

Every method in conf/method runs through the framework itself, one fresh subprocess each:

    python -m kd_experiments dataset=fake dataset.image_size=32 dataset.num_classes=100 \
        dataset.batch_size=64 teacher=resnet56 student=resnet20 teacher.weights=random method=<m> \
        ++trainer.limit_val_batches=0 logger=none trainer.max_steps=<warmup + steps> \
        +callbacks.step_timer._target_=kd_experiments.bench_methods.StepTimer ...

(checkpointing, the progress bar and the model summary off: nothing but the steps is measured). A method
that refuses resnet56 -> resnet20 (DeiT's distillation token needs a two-headed student) is run on the first
pair of `FALLBACK_PAIRS` it accepts, and its table row names that pair; one that accepts none is listed with
the framework's one-line error. `StepTimer`, a Lightning callback, measures inside the run:

- ms_per_step: the median over the timed steps (after `--warmup` untimed ones) of the wall time from
  `on_train_batch_start` to `on_train_batch_end`: teacher and student forward, the loss terms, backward,
  the optimizer step and the framework's per-step logging; data loading is outside it. Each method runs
  `--rounds` times, each in a fresh process, round after round, and the lowest median counts (all are in
  `ms_per_step_rounds`): on a shared 2-core VM one process's median of kd ranged 220-345 ms over an hour
  with nothing else running, while the steps inside one process agree within ~10%.
- extra_params: the LightningModule's trainable parameters minus those of the plain student network
  (`models.create_model(student_arch, num_classes, image_size=...)`): what the method adds, whether beside
  the student (FitNet's regressor, SRD / VkD projectors) or inside it (LSHFM's feat_fc).
- peak_mem_mb (MiB): on CPU, the growth of the process's peak RSS (getrusage ru_maxrss) from just before the
  first training step to the end of the last one. The RSS high-water mark is reset there first (Linux:
  /proc/self/clear_refs), so neither the Python / torch baseline nor the models and teacher statistics
  built before training count, and an earlier peak (a statistics pass) cannot hide the training's (where
  it cannot be reset, `high_water_reset: false`, the figure is the growth over that earlier peak). On CUDA,
  torch.cuda.max_memory_allocated over the same steps minus the memory allocated just before them.

Results: OUTPUT/methods.json (per method, plus the context) and OUTPUT/methods.md (the printed table).

    python -m kd_experiments.bench_methods [--methods kd,dkd] [--steps 8] [--warmup 3] [--rounds 2] \
        [--output outputs/bench] [--accelerator cpu|gpu]
"""

import argparse
import functools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

METHOD_DIR = Path(__file__).resolve().parent / "conf" / "method"
BATCH_SIZE, IMAGE_SIZE, NUM_CLASSES = 64, 32, 100
RUN_TIMEOUT_S = 1800  # one method's subprocess; a hung run must not hang the whole benchmark


@dataclass(frozen=True)
class Pair:
    """A teacher -> student pair by config names (conf/teacher, conf/student) and the student's model name."""

    teacher: str
    student: str
    student_arch: str

    def __str__(self) -> str:
        return f"{self.teacher} -> {self.student}"


DEFAULT_PAIR = Pair("resnet56", "resnet20", "resnet20")
# Tried in order for a method that refuses the default pair: the smallest two-headed DeiT student.
FALLBACK_PAIRS = (Pair("resnet56", "deit_ti", "deit_tiny_distilled_patch16_224"),)
COMMON_OVERRIDES = [
    "dataset=fake",
    f"dataset.image_size={IMAGE_SIZE}",
    f"dataset.num_classes={NUM_CLASSES}",
    f"dataset.batch_size={BATCH_SIZE}",
    "teacher.weights=random",
    "++trainer.limit_val_batches=0",
    "logger=none",
    # Not part of a step: a checkpoint write between epochs would only add to the memory figure.
    "++trainer.enable_checkpointing=false",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
]


def peak_rss_kib() -> float:
    """The process's peak resident set size so far, in KiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else float(peak)


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def trainable_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _parameter_counts(pl_module, student_arch: str, num_classes: int, image_size: int) -> dict:
    """Trainable parameters the method adds to the plain student network, inside and beside it."""
    from kd_experiments.models import create_model

    plain = trainable_parameters(create_model(student_arch, num_classes=num_classes, image_size=image_size))
    student = trainable_parameters(pl_module.student)
    total = trainable_parameters(pl_module)  # the teacher is outside the module tree
    return {
        "plain_student_params": plain,
        "extra_params": total - plain,
        "extra_params_in_student": student - plain,  # e.g. LSHFM's feat_fc, kept at deployment
        "extra_params_beside_student": total - student,  # side branches, dropped after training
    }


def _memory_baseline_mb(device) -> tuple[float, bool]:
    """Just before the first step: the memory in use (MiB) after resetting the peak, and whether the
    peak could be reset."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20, True
    reset = reset_peak_rss()
    return peak_rss_kib() / 1024, reset


def _memory_peak_mb(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_kib() / 1024


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time this step's kernels only, not the previous step's


def _device_context(device) -> dict:
    """What a StepTimer report says about where it ran."""
    import torch

    cuda = device.type == "cuda"
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "peak_mem_kind": "cuda allocated growth" if cuda else "peak RSS growth",
    }


@functools.cache
def _step_timer_class() -> type:
    """StepTimer, built on first use: only the training subprocess needs it, and importing Lightning costs
    the measuring process seconds for nothing (see `__getattr__`)."""
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """Times each training step and measures the memory the steps add; writes the numbers, with the
        parameters the method adds to the plain `student_arch`, to `report_path` when training ends."""

        def __init__(self, report_path: str, student_arch: str, num_classes: int, image_size: int):
            self.report_path = Path(report_path)
            self.student_arch, self.num_classes, self.image_size = student_arch, num_classes, image_size
            self.step_seconds: list[float] = []
            self.parameters: dict[str, int] = {}
            self.memory_baseline_mb: float | None = None
            self.memory_peak_mb: float | None = None
            self.high_water_reset = False
            self._step_started = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            self.parameters = _parameter_counts(
                pl_module, self.student_arch, self.num_classes, self.image_size
            )

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            if self.memory_baseline_mb is None:  # just before the first step
                self.memory_baseline_mb, self.high_water_reset = _memory_baseline_mb(pl_module.device)
            _synchronize(pl_module.device)
            self._step_started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            _synchronize(pl_module.device)
            self.step_seconds.append(time.perf_counter() - self._step_started)
            self.memory_peak_mb = _memory_peak_mb(pl_module.device)

        def on_train_end(self, trainer, pl_module) -> None:
            growth = (self.memory_peak_mb or 0.0) - (self.memory_baseline_mb or 0.0)
            report = _device_context(pl_module.device) | {
                "step_seconds": self.step_seconds,
                "peak_mem_mb": max(0.0, growth),
                "high_water_reset": self.high_water_reset,
            }
            self.report_path.write_text(json.dumps(report | self.parameters, indent=2) + "\n")

    StepTimer.__module__, StepTimer.__qualname__ = __name__, "StepTimer"
    return StepTimer


def __getattr__(name: str):
    """`kd_experiments.bench_methods.StepTimer`, the `_target_` the training subprocess instantiates."""
    if name == "StepTimer":
        return _step_timer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cpu_name() -> str | None:
    """The CPU model (Linux /proc/cpuinfo), for the context; None where it is not readable."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:
        return None
    return names[0] if names else platform.processor() or None


def all_methods() -> list[str]:
    return sorted(path.stem for path in METHOD_DIR.glob("*.yaml"))


def run_command(method: str, pair: Pair, steps: int, work_dir: Path, report_path: Path, accelerator: str):
    overrides = [
        *COMMON_OVERRIDES,
        f"teacher={pair.teacher}",
        f"student={pair.student}",
        f"method={method}",
        f"trainer.max_steps={steps}",
        f"trainer.accelerator={accelerator}",
        f"paths.log_dir={work_dir}",
        "+callbacks.step_timer._target_=kd_experiments.bench_methods.StepTimer",  # not __main__
        f"+callbacks.step_timer.report_path={report_path}",
        f"+callbacks.step_timer.student_arch={pair.student_arch}",
        f"+callbacks.step_timer.num_classes={NUM_CLASSES}",
        f"+callbacks.step_timer.image_size={IMAGE_SIZE}",
    ]
    return [sys.executable, "-m", "kd_experiments", *overrides]


def error_line(stderr: str) -> str:
    """The framework's one-line refusal (`error: ...`), else the last line the run printed."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    refusals = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return (refusals or lines or ["no output"])[-1][:400]


def measure(method: str, pair: Pair, *, warmup: int, steps: int, work_dir: Path, accelerator: str) -> dict:
    """One method on one pair in a fresh process: its StepTimer report reduced to the table's numbers, or
    {"error": reason} when the framework refuses the pair."""
    # A plain file name: the path travels as a Hydra override value (no `+`, `@` or `=` in it).
    report_path = work_dir / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{method}__{pair.student}.json")
    command = run_command(method, pair, warmup + steps, work_dir, report_path, accelerator)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {RUN_TIMEOUT_S} s", "refused": False}
    if result.returncode != 0 or not report_path.is_file():
        # Exit code 2 is the framework's one-line refusal (a UserError); anything else is a crash.
        return {"error": error_line(result.stderr), "refused": result.returncode == 2}
    report = json.loads(report_path.read_text())
    timed_ms = [seconds * 1000 for seconds in report.pop("step_seconds")[warmup:]]
    if len(timed_ms) != steps:
        return {"error": f"timed {len(timed_ms)} steps instead of {steps}", "refused": False}
    quartiles = statistics.quantiles(timed_ms, n=4) if len(timed_ms) > 1 else [timed_ms[0]] * 3
    return {
        "teacher": pair.teacher,
        "student": pair.student,
        # Other processes on the machine slow the steps: each entry says how busy it was when done.
        "load_average_1min": round(os.getloadavg()[0], 2),
        "ms_per_step": round(statistics.median(timed_ms), 2),
        "ms_per_step_rounds": [round(statistics.median(timed_ms), 2)],
        "ms_per_step_quartiles": [round(quartiles[0], 2), round(quartiles[2], 2)],
        "extra_params": report.pop("extra_params"),
        "peak_mem_mb": round(report.pop("peak_mem_mb"), 1),
    } | report


def measure_method(method: str, run) -> dict:
    """The method on the default pair, else on the first fallback pair it accepts; never dropped.
    `run(method, pair)` is `measure` with this benchmark's settings."""
    measured = run(method, DEFAULT_PAIR)
    if "error" not in measured:
        return {"status": "ok"} | measured
    refusal = measured["error"]
    if not measured["refused"]:  # a crash is reported as it is, not hidden behind another pair
        return {"status": "not run", "reason": refusal}
    for pair in FALLBACK_PAIRS:
        fallback = run(method, pair)
        if "error" not in fallback:
            return {"status": "ok (other pair)", "default_pair_error": refusal} | fallback
    return {"status": "not run", "reason": refusal}


def pair_of(entry: dict) -> Pair:
    return next(p for p in (DEFAULT_PAIR, *FALLBACK_PAIRS) if (p.teacher, p.student) == pair_key(entry))


def pair_key(entry: dict) -> tuple[str, str]:
    return entry["teacher"], entry["student"]


def faster(entry: dict, again: dict) -> dict:
    """Of two runs of one method on one pair, the one with the lower ms_per_step (other work on a shared
    machine only ever slows a run down), with every run's ms_per_step in `ms_per_step_rounds`."""
    rounds = [*entry["ms_per_step_rounds"], again.get("ms_per_step")]  # None: that run failed
    if "error" not in again and again["ms_per_step"] < entry["ms_per_step"]:
        first_round = {key: entry[key] for key in ("status", "default_pair_error") if key in entry}
        entry = entry | again | first_round  # the status (and the refusal) found in the first round
    return entry | {"ms_per_step_rounds": rounds}


# What each figure in methods.json means, written into its context.
CONTEXT_DEFINITIONS = {
    "ms_per_step": (
        "median of the timed steps (on_train_batch_start -> on_train_batch_end) of one run; the lowest "
        "of the method's runs (ms_per_step_rounds), each in a fresh process, one round after another"
    ),
    "extra_params": "trainable parameters of the LightningModule minus the plain student network's",
    "peak_mem_mb": (
        "MiB; CPU: growth of the process's peak RSS over the steps, high-water mark reset just before "
        "the first; CUDA: max_memory_allocated over the steps minus the allocation before them"
    ),
}
RUN_CONTEXT_KEYS = ("device", "device_name", "torch_version", "torch_threads")


def run_context(entries: list[dict]) -> dict:
    """What the training subprocesses report about themselves, moved out of the per-method entries into
    the context: one value when all runs agree (they share one environment), else the list of values."""
    context = {}
    for key in RUN_CONTEXT_KEYS:
        values = [entry.pop(key) for entry in entries if key in entry]
        distinct = list(dict.fromkeys(values))
        context[key] = distinct[0] if len(distinct) == 1 else distinct or None
    return context


def markdown_table(methods: dict, references: dict) -> str:
    """method | ms/step | x kd | extra params | peak mem MB; x kd against kd on the same pair."""
    kd_ms = {(entry["teacher"], entry["student"]): entry["ms_per_step"] for entry in references.values()}
    if methods.get("kd", {}).get("status") == "ok":
        kd_ms[(DEFAULT_PAIR.teacher, DEFAULT_PAIR.student)] = methods["kd"]["ms_per_step"]
    rows = ["| method | ms/step | × kd | extra params | peak mem MB |", "|---|---:|---:|---:|---:|"]
    notes = []
    for name, entry in methods.items():
        if entry["status"] == "not run":
            rows.append(f"| {name} | not run: {entry['reason']} | | | |")
            continue
        label = name
        if (entry["teacher"], entry["student"]) != (DEFAULT_PAIR.teacher, DEFAULT_PAIR.student):
            label = f"{name} ({entry['teacher']} → {entry['student']})"
            notes.append(f"{name}: refuses {DEFAULT_PAIR} ({entry['default_pair_error']})")
        reference = kd_ms.get((entry["teacher"], entry["student"]))
        ratio = f"{entry['ms_per_step'] / reference:.2f}" if reference else "-"
        rows.append(
            f"| {label} | {entry['ms_per_step']:.1f} | {ratio} | {entry['extra_params']:,} | "
            f"{entry['peak_mem_mb']:.1f} |"
        )
    table = "\n".join(rows) + "\n"
    if notes:
        table += "\n" + "\n".join(f"- {note}; × kd is against kd on the same pair." for note in notes) + "\n"
    return table


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", help="comma-separated conf/method names (default: all)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="runs per method; the faster one counts")
    parser.add_argument("--output", default="outputs/bench", help="where methods.json and methods.md go")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"), help="trainer.accelerator")
    args = parser.parse_args(argv)
    known = all_methods()
    methods = args.methods.split(",") if args.methods else known
    unknown = sorted(set(methods) - set(known))
    if unknown:
        parser.error(f"unknown methods {unknown}; conf/method has {', '.join(known)}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
    return args, methods


def measure_all(methods: list[str], rounds: int, run, started: float) -> tuple[dict, dict]:
    """Every method (on the pair it accepts) over `rounds` rounds, and kd on each other pair used."""
    results, references = {}, {}
    for method in methods:  # the first round also finds the pair each method accepts
        results[method] = measure_method(method, run)
        print(f"{method:12s} {results[method]['status']:16s} ({time.perf_counter() - started:.0f} s)")
    # The x kd column compares a method run on another pair with kd on that pair.
    other_pairs = {pair_key(entry) for entry in results.values() if entry["status"] == "ok (other pair)"}
    for pair in FALLBACK_PAIRS:
        if "kd" in methods and (pair.teacher, pair.student) in other_pairs:
            reference = run("kd", pair)
            if "error" not in reference:
                references[f"kd@{pair}"] = reference
    # Later rounds rerun each measured method in a new process, minutes after its first run, so that a
    # slow spell of the machine (or of one process) does not decide its number.
    for round_number in range(2, rounds + 1):
        for method, entry in results.items():
            if entry["status"] != "not run":
                results[method] = faster(entry, run(method, pair_of(entry)))
        for name, entry in references.items():
            references[name] = faster(entry, run("kd", pair_of(entry)))
        print(f"round {round_number} done ({time.perf_counter() - started:.0f} s)")
    return results, references


def main(argv: list[str] | None = None) -> None:
    args, methods = parse_arguments(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()  # other work on the machine slows every step; the context says so
    # Run folders and the teacher-statistics cache are scratch: only methods.json / methods.md are kept.
    with tempfile.TemporaryDirectory(prefix="bench_methods_") as scratch:
        settings = {"warmup": args.warmup, "steps": args.steps, "accelerator": args.accelerator}
        run = functools.partial(measure, work_dir=Path(scratch), **settings)
        results, references = measure_all(methods, args.rounds, run, started)

    context = {
        "date": date.today().isoformat(),
        **run_context([*results.values(), *references.values()]),
        "cpu_count": os.cpu_count(),
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "default_pair": str(DEFAULT_PAIR),
        "batch_size": BATCH_SIZE,
        "image_size": IMAGE_SIZE,
        "num_classes": NUM_CLASSES,
        "warmup_steps": args.warmup,
        "steps_timed": args.steps,
        "rounds": args.rounds,
        **CONTEXT_DEFINITIONS,
        "command": " ".join(["python -m kd_experiments.bench_methods", *(argv or sys.argv[1:])]),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (output / "methods.json").write_text(
        json.dumps({"context": context, "methods": results, "references": references}, indent=2) + "\n"
    )
    table = markdown_table(results, references)
    (output / "methods.md").write_text(table)
    print(table, end="")
    print(f"written: {output / 'methods.json'}, {output / 'methods.md'}")


if __name__ == "__main__":
    main()
