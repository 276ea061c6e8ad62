"""The GPU fast path, checked on the CPU: bf16-mixed autocast over student and teacher, channels_last,
torch.compile of the feature extraction (same losses, same checkpoint keys), a training step without host
syncs, and the GPU benchmark's CPU smoke mode."""

import json
import math
import re
import sys
import time

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from kd_experiments.errors import UserError
from kd_experiments.fast_path import FastPath
from kd_experiments.models.features import extract_features_eager
from kd_experiments.module import DistillationModule
from kd_experiments.train import data_phase, module_phase, student_and_objective_phase, teacher_phase
from tests.conftest import compose_config, run_main_in_process

# convnet_wide -> convnet_narrow on random 3 x 16 x 16 images: three batches of 32 per epoch.
SMALL = [
    "dataset=fake", "dataset.image_size=16", "dataset.batch_size=32", "dataset.train_length=96",
    "dataset.val_length=32", "teacher.weights=random",
]  # fmt: skip


def build(*overrides: str) -> tuple[DistillationModule, object]:
    """The module (and data) a run with `overrides` trains: the run's own phases, seeded as a run is."""
    cfg = compose_config(*SMALL, "logger=none", *overrides)
    datamodule = data_phase(cfg)
    parts = student_and_objective_phase(cfg, datamodule)
    teacher, teacher_top1 = teacher_phase(cfg, datamodule, parts)
    return module_phase(cfg, datamodule, parts, teacher, teacher_top1), datamodule


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 3, 16, 16, generator=generator), torch.randint(0, 10, (32,), generator=generator)


def loss_and_gradient(module: DistillationModule) -> tuple[float, torch.Tensor]:
    """The training step's loss on the fixed batch and the gradient of the student's first convolution."""
    module.train()
    loss = module.training_step(fixed_batch(), 0)
    loss.backward()
    return loss.item(), module.student.stem[0].weight.grad.clone()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # any output lands in the test's folder
    torch._dynamo.reset()  # compiled graphs of other tests do not count here
    yield
    torch._dynamo.reset()


class Recorder(pl.Callback):
    """Each step's loss, and for every forward of student and teacher: the stage (train / val), whether
    autocast was on and the dtype of the network's output."""

    def __init__(self):
        self.losses: list[float] = []
        self.forwards: set[tuple] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        for role, network in (("student", pl_module.student), ("teacher", pl_module.teacher)):

            def record(network, inputs, output, role=role):
                stage = "train" if trainer.training else "val"
                self.forwards.add((stage, role, torch.is_autocast_enabled("cpu"), output.dtype))

            network.register_forward_hook(record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def fit(module, datamodule, precision: str, max_steps: int, **trainer_args) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", precision=precision, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **trainer_args,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_bf16_mixed_autocasts_student_and_teacher_in_training_and_validation():
    """Lightning's autocast wraps the whole step: the teacher's forward runs in bf16 as the student's does,
    in training and in validation (where the teacher is scored once); the losses stay finite and the first
    one (same weights, same batch) is fp32's to bf16 precision."""
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        module, datamodule = build("method=kd")
        recorder = Recorder()
        fit(module, datamodule, precision, max_steps=3, limit_val_batches=1, callbacks=[recorder])
        runs[precision] = recorder
    bf16, fp32 = runs["bf16-mixed"], runs["32-true"]
    roles = [(stage, role) for stage in ("train", "val") for role in ("student", "teacher")]
    assert bf16.forwards == {(stage, role, True, torch.bfloat16) for stage, role in roles}
    assert fp32.forwards == {(stage, role, False, torch.float32) for stage, role in roles}
    assert len(bf16.losses) == 3 and all(math.isfinite(loss) for loss in bf16.losses)
    # The first step is the same step (weights, batch) as bf16 autocast around the whole training step...
    module, datamodule = build("method=kd")
    first_batch = next(iter(datamodule.train_dataloader()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.train().training_step(first_batch, 0).item() == pytest.approx(bf16.losses[0], rel=1e-6)
    # ... and fp32's to bf16 precision (8 mantissa bits; the KD term amplifies the logits' rounding).
    assert bf16.losses[0] != fp32.losses[0]
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=5e-2)


def test_channels_last_converts_weights_and_inputs_and_keeps_the_loss():
    plain, _ = build("method=kd")
    fast, _ = build("method=kd", "channels_last=true")
    seen = []
    for network in (fast.student, fast.teacher):
        weight = network.stem[0].weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        network.stem[0].register_forward_pre_hook(
            lambda conv, inputs: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
        )
    assert not plain.student.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain_loss, plain_gradient = loss_and_gradient(plain)
    fast_loss, fast_gradient = loss_and_gradient(fast)
    assert seen == [True, True]  # the teacher's batch, then the student's: both in channels_last
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    torch.testing.assert_close(fast_gradient, plain_gradient, rtol=1e-4, atol=1e-6)
    # Checkpoints hold the same names and values, whatever the memory format.
    assert list(fast.state_dict()) == list(plain.state_dict())


GRAPHS: list[int] = []


def tensor_count(output) -> int:
    return sum(
        len(value) if isinstance(value, list) else 1 for value in vars(output).values() if value is not None
    )


def _counting_aot_eager(graph_module, example_inputs):
    """aot_eager, counting the graphs compiled (and the outputs of each)."""
    from torch._dynamo.backends.registry import lookup_backend

    GRAPHS.append(len(graph_module.graph.find_nodes(op="output")[0].args[0]))
    return lookup_backend("aot_eager")(graph_module, example_inputs)


if "counting_aot_eager" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_counting_aot_eager, name="counting_aot_eager")


@pytest.mark.parametrize("method", ["srd", "fitnet"])  # reads logits + the pooled embedding; stage maps
def test_compiled_feature_extraction_keeps_the_loss_and_the_checkpoint_keys(method, tmp_path):
    GRAPHS.clear()
    plain, _ = build(f"method={method}")
    compiled, datamodule = build(
        f"method={method}",
        "compile.student=true",
        "compile.teacher=true",
        "compile.backend=counting_aot_eager",
    )
    plain_loss, plain_gradient = loss_and_gradient(plain)
    compiled_loss, compiled_gradient = loss_and_gradient(compiled)
    # One graph per network, each returning every tensor of the features the method reads (for fitnet the
    # stage maps too): no graph break splits the extraction.
    images = fixed_batch()[0]
    networks = [
        (plain.student, plain.method.student_features),
        (plain.teacher, plain.method.teacher_features),
    ]
    tensors = [tensor_count(extract_features_eager(network, images, needs)) for network, needs in networks]
    assert sorted(GRAPHS) == sorted(tensors), (GRAPHS, tensors)
    assert compiled_loss == pytest.approx(plain_loss, rel=1e-5)
    torch.testing.assert_close(compiled_gradient, plain_gradient, rtol=1e-4, atol=1e-6)

    # Two real steps, then a checkpoint: its keys are the uncompiled module's, and it loads into it.
    trainer = fit(compiled, datamodule, "32-true", max_steps=2, limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    state = torch.load(tmp_path / "compiled.ckpt", weights_only=False)["state_dict"]
    assert list(state) == list(plain.state_dict()) and not any("_orig_mod" in key for key in state)
    plain.load_state_dict(state, strict=True)
    assert len(GRAPHS) == 2  # the run reused both graphs: same shapes, same modes


def test_fast_path_options_are_checked():
    def options(**config):
        return FastPath.from_config(OmegaConf.create(config))

    assert options() == FastPath()
    compiled = options(channels_last=True, compile={"student": True, "backend": "aot_eager", "mode": None})
    assert compiled == FastPath(True, True, False, "aot_eager", None)
    refused = {
        "compile.backend='nope' is not a torch.compile backend": {"compile": {"backend": "nope"}},
        "compile.mode=null for compile.backend=eager": {
            "compile": {"backend": "eager", "mode": "max-autotune"}
        },
        "compile.mode must be null or one of default": {"compile": {"mode": "fast"}},
        "channels_last must be true or false, got 'yes'": {"channels_last": "yes"},
        "compile takes student, teacher, backend, mode, not students": {"compile": {"students": True}},
    }
    for message, config in refused.items():
        with pytest.raises(UserError, match=re.escape(message)) as error:
            options(**config)
        assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"channels_last=true needs image batches .* shape \(64,\)"):
        FastPath(channels_last=True).check_data(torch.zeros(64), "tabular")
    FastPath(channels_last=True).check_data(torch.zeros(3, 8, 8), "images")


HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "nonzero")


def test_no_host_syncs_in_a_training_step_that_does_not_log(tmp_path, monkeypatch, capsys):
    """A real run (progress bar, CSV logger with its LR monitor, EMA, epoch records, channels_last) with
    logging every 1000 steps: from each training step's start to the end of its on_train_batch_end hooks,
    nothing reads a tensor back to the host or copies a Python number to the device. Step 0 registers
    Lightning's logged names (one-off copies); the last step checks the loss terms for NaN, by design."""
    reads: dict[int, list[str]] = {}
    window = {"open": False, "step": -1}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            if window["open"]:
                reads.setdefault(window["step"], []).append(name)
            return original(*args, **kwargs)

        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor"):  # a Python number to a GPU is a blocking copy
        monkeypatch.setattr(torch, name, counting(f"torch.{name}", getattr(torch, name)))
    training_step, batch_end = DistillationModule.training_step, DistillationModule.on_train_batch_end

    def open_window(self, batch, batch_idx):
        window.update(open=True, step=self.global_step)
        return training_step(self, batch, batch_idx)

    def close_window(self, *args):
        try:
            return batch_end(self, *args)
        finally:
            window["open"] = False

    monkeypatch.setattr(DistillationModule, "training_step", open_window)
    monkeypatch.setattr(DistillationModule, "on_train_batch_end", close_window)
    result = run_main_in_process(
        *SMALL, "dataset.train_length=320", "trainer.max_steps=6", "trainer.log_every_n_steps=1000",
        "logger=csv", "ema_decay=0.99", "channels_last=true", "++trainer.limit_val_batches=0",
        cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert [step for step in range(1, 5) if reads.get(step)] == [], {s: reads[s] for s in range(1, 5)}
    assert "__bool__" in reads[5]  # the counting sees what is there: the last step's NaN check
    # What reads values still does, at its own time: the epoch's mean loss and its log line.
    summary = json.loads(next(tmp_path.glob("outputs/runs/*/*/summary.json")).read_text())
    loss = summary["history"][0]["train"]["loss"]
    assert summary["steps"] == 6 and math.isfinite(loss) and loss > 0
    assert f"epoch 1/25: loss {loss:.4f}" in result.stdout + result.stderr


def test_gpu_benchmark_smoke_run_on_the_cpu(tmp_path, capsys):
    from kd_experiments import bench_gpu

    started = time.perf_counter()
    report = bench_gpu.main(
        [
            "--device", "cpu", "--steps", "2", "--warmup", "1", "--image-size", "16", "--vit-batch-size", "4",
            "--batch-sizes", "8", "--vit-teacher", "convnet_wide", "--cifar-teacher", "convnet_wide",
            "--cifar-student", "convnet_narrow", "--output", str(tmp_path),
        ]
    )  # fmt: skip
    results = report["results"]
    assert [(r["case"], r["student"], r["batch_size"]) for r in results] == [
        ("vit", "deit_ti", 4),
        ("cifar", "convnet_narrow", 8),
    ]
    for r in results:
        assert r["framework_images_per_s"] > 0 and r["plain_images_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["framework_images_per_s"] / r["plain_images_per_s"], rel=2e-2)
        assert (
            "channels_last=true" in r["framework_command"]
            and "trainer.precision=bf16-mixed" in r["framework_command"]
        )
    assert json.loads((tmp_path / "bench_gpu.json").read_text()) == report
    out = capsys.readouterr().out
    assert "| vit (deit) | convnet_wide -> deit_ti | 16 | 4 |" in out and "goal >= 0.95" in out
    assert time.perf_counter() - started < 60
    # Run as `python -m` runs it: the package's __main__ is not left imported (a later in-process run of
    # the CLI would warn about it).
    assert "kd_experiments.__main__" not in sys.modules
