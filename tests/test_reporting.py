"""Reporting protocols (last / best epoch, LSHFM's average of the last epochs' weights), a recipe's paper
number copied next to the result, and the timm optimizer/scheduler factories."""

import json
import math

import pytest
import pytorch_lightning as pl
import torch

from kd_experiments.reporting import StudentEMA, WeightAveraging
from tests.conftest import QUICK, run_main_in_process


def test_weight_average_is_the_mean_of_the_last_epochs_weights(tmp_path):
    student = torch.nn.Linear(3, 2)
    averaging = WeightAveraging(epochs=2, output_dir=tmp_path)
    module = type("M", (), {"student": student})()
    snapshots = []
    for epoch in range(4):
        with torch.no_grad():
            student.weight.add_(torch.full_like(student.weight, float(epoch + 1)))
        snapshots.append(student.weight.detach().clone())
        averaging.on_train_epoch_end(type("T", (), {"current_epoch": epoch, "max_epochs": 4})(), module)
    assert averaging.averaged_epochs == 2
    torch.testing.assert_close(averaging.averaged.module.weight, (snapshots[2] + snapshots[3]) / 2)


def test_report_protocol_and_paper_gap_in_the_summary(workdir, monkeypatch, capsys):
    result = run_main_in_process(
        *QUICK, "trainer.max_epochs=3", "report=weight_average", "average_epochs=2",
        "+paper.top1=90.0", "+paper.source=a test", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = next(workdir.glob("outputs/runs/*/*/"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["report"] == "weight_average" and summary["averaged_epochs"] == 2
    assert summary["paper"] == {"top1": 90.0, "source": "a test"}
    assert summary["gap_to_paper"] == round(summary["student_top1_reported"] - 90.0, 2)
    assert (run_dir / "checkpoints/averaged_student.pt").is_file()
    assert "weights averaged over 2 epochs" in result.stdout and "paper (a test)" in result.stdout

    # A recipe's number measured on another data set (a CIFAR-100 recipe run on digits): no gap to it
    best = run_main_in_process(
        *QUICK, "trainer.max_epochs=3", "report=best", "seed=1", "+paper.top1=90.0", "+paper.source=a test",
        "+paper.dataset=cifar100", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    summaries = [json.loads(p.read_text()) for p in workdir.glob("outputs/runs/*/*/summary.json")]
    best_summary = next(s for s in summaries if s["report"] == "best")
    assert best.returncode == 0 and best_summary["student_top1_reported"] == best_summary["student_top1_best"]
    assert "gap_to_paper" not in best_summary and best_summary["paper"]["dataset"] == "cifar100"
    assert "on cifar100: not comparable with this run on digits" in best.stdout.replace("\n", "")

    bad = run_main_in_process(*QUICK, "report=average", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert bad.returncode == 2 and "report='average' is not one of last, best, weight_average" in bad.stderr
    no_ema = run_main_in_process(*QUICK, "report=ema", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys)
    assert no_ema.returncode == 2 and "report=ema needs an EMA of the student: set ema_decay" in no_ema.stderr


def test_student_ema_follows_the_optimizer_steps_and_survives_a_checkpoint(tmp_path):
    student = torch.nn.Linear(3, 2)
    ema = StudentEMA(decay=0.9, output_dir=tmp_path)
    module = type("M", (), {"student": student})()
    ema.on_fit_start(None, module)
    for step in (1, 2, 2, 3):  # the repeated step is a gradient-accumulation batch: no update
        with torch.no_grad():
            student.weight.fill_(float(step * 10))
        ema.on_train_batch_end(type("T", (), {"global_step": step})(), module, None, None, 0)
    # step 1 copies the weights (10); step 2: 0.9 * 10 + 0.1 * 20 = 11; step 3: 0.9 * 11 + 0.1 * 30 = 12.9
    torch.testing.assert_close(ema.ema.module.weight, torch.full((2, 3), 12.9))
    resumed = StudentEMA(decay=0.9, output_dir=tmp_path)
    resumed.load_state_dict(ema.state_dict())
    resumed.on_fit_start(None, type("M", (), {"student": torch.nn.Linear(3, 2)})())
    torch.testing.assert_close(resumed.ema.module.weight, ema.ema.module.weight)


def test_ema_is_scored_and_reported(workdir, monkeypatch, capsys):
    result = run_main_in_process(
        *QUICK, "ema_decay=0.5", "report=ema", cwd=workdir, monkeypatch=monkeypatch, capsys=capsys
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = next(workdir.glob("outputs/runs/*/*/"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ema_decay"] == 0.5 and 0.0 < summary["student_top1_ema"] <= 100.0
    assert summary["student_top1_reported"] == summary["student_top1_ema"]
    ema_weights = torch.load(run_dir / "checkpoints/ema_student.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)
    student_weights = {k.removeprefix("student."): v for k, v in last["state_dict"].items()}
    assert ema_weights.keys() <= student_weights.keys()
    assert any(not torch.equal(ema_weights[k], student_weights[k]) for k in ema_weights)
    assert "EMA of the weights (decay 0.5)" in result.stdout


def test_adamw_keeps_norms_biases_and_vit_tokens_out_of_weight_decay():
    from hydra.utils import instantiate

    from kd_experiments.methods.ce import CrossEntropy
    from kd_experiments.methods.compose import LossWeights, Objectives
    from kd_experiments.models import create_model
    from kd_experiments.module import DistillationModule
    from tests.conftest import compose_config

    cfg = compose_config("optimizer=adamw", "scheduler=cosine_warmup", "trainer.max_epochs=10")
    student = create_model("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=8, depth=1)
    module = DistillationModule(
        student=student, method=Objectives({"ce": CrossEntropy()}), loss_weights=LossWeights({"ce": 1.0}),
        num_classes=10,
        optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler, interval=None) and None,
    )  # fmt: skip
    optimizer = module.configure_optimizers()
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(student.pos_embed) not in decayed and id(student.dist_token) not in decayed
    assert id(student.blocks[0].norm1.weight) not in decayed and id(student.head.bias) not in decayed
    assert id(student.head.weight) in decayed and id(student.blocks[0].attn.qkv.weight) in decayed
    assert all(g["weight_decay"] in (0.0, 0.05) for g in optimizer.param_groups)
    assert isinstance(optimizer, torch.optim.AdamW)


def logged_learning_rates(workdir) -> list[float]:
    """The learning rates LearningRateMonitor wrote to the run's metrics.csv, in order."""
    rows = (next(workdir.glob("outputs/runs/*/*/csv/metrics.csv"))).read_text().splitlines()
    header = rows[0].split(",")
    column = next(i for i, name in enumerate(header) if name.startswith("lr-"))
    return [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]


def test_timm_cosine_warmup_is_stepped_per_epoch_by_the_module(workdir, monkeypatch, capsys):
    result = run_main_in_process(
        *QUICK, "trainer.max_epochs=4", "scheduler=cosine_warmup", "scheduler.warmup_t=2",
        "scheduler.warmup_lr_init=0.01", "optimizer.lr=0.1", "logger=csv", cwd=workdir,
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lrs = logged_learning_rates(workdir)
    # warm-up 0.01 -> 0.055 over 2 epochs, then cosine from 0.1 (timm: lr_min 5e-6, t_initial 4)
    assert [round(x, 4) for x in lrs] == [0.01, 0.055, 0.05, 0.0146]


def test_timm_cosine_warmup_with_interval_step_counts_updates_not_epochs(workdir, monkeypatch, capsys):
    """SRD / VkD step their cosine per iteration: the epoch-unit warm-up and length become updates."""
    result = run_main_in_process(
        *QUICK, "scheduler=cosine_warmup", "scheduler.interval=step", "scheduler.warmup_t=1",
        "scheduler.warmup_lr_init=0.01", "optimizer.lr=0.1", "++trainer.limit_train_batches=4",
        "trainer.log_every_n_steps=1", "logger=csv", cwd=workdir,
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lrs = logged_learning_rates(workdir)
    # 4 updates per epoch: a linear warm-up over updates 0-3, then the cosine over 8 updates (lr_min 5e-6)
    warmup = [0.01 + t * (0.1 - 0.01) / 4 for t in range(4)]
    cosine = [5e-6 + 0.5 * (0.1 - 5e-6) * (1 + math.cos(math.pi * t / 8)) for t in range(4, 8)]
    assert lrs == pytest.approx(warmup + cosine, abs=1e-9)


def test_sgd_recipe_settings_reach_torch_sgd():
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    factory = instantiate(compose_config("optimizer=sgd", "optimizer.opt=nesterov").optimizer)
    optimizer = factory([torch.nn.Parameter(torch.zeros(2))])
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["nesterov"], group["momentum"], group["weight_decay"], group["lr"]) == (
        True,
        0.9,
        5e-4,
        0.05,
    )
    assert pl.__version__  # Lightning drives the loop; the factory only builds the optimizer


def test_teacher_is_checked_against_its_reference_before_distilling(workdir, monkeypatch, capsys):
    # A tolerance of 0.5 points (default 2) makes the check fail for any teacher below 99.4%.
    result = run_main_in_process(
        *QUICK, "trainer.max_epochs=1", "teacher.reference_top1=99.9", "teacher.reference_tolerance=0.5",
        cwd=workdir, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    summary = json.loads(next(workdir.glob("outputs/runs/*/*/summary.json")).read_text())
    measured = summary["teacher_top1"]
    assert summary["teacher_reference_top1"] == 99.9 and 90 < measured < 99.9
    assert (
        f"TEACHER CHECK FAILED: convnet_wide scores {measured:.2f}% on digits val, "
        f"{99.9 - measured:.2f} points below its reference 99.90%"
    ) in output
    fine = run_main_in_process(
        *QUICK, "trainer.max_epochs=1", f"teacher.reference_top1={measured + 1:.2f}", "seed=1", cwd=workdir,
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    fine_output = fine.stdout + fine.stderr
    assert "TEACHER CHECK FAILED" not in fine_output and f"Teacher check: {measured:.2f}%" in fine_output


def test_lr_scaling_resolver_uses_the_global_batch():
    from omegaconf import OmegaConf

    import kd_experiments  # noqa: F401  (registers the resolver)

    cfg = OmegaConf.create(
        {
            "dataset": {"batch_size": 128},
            "trainer": {"devices": 4, "num_nodes": 2},
            "lr": "${kd.scaled_lr:5e-4,${dataset.batch_size},${trainer.devices},${trainer.num_nodes},512}",
        }
    )
    assert cfg.lr == 5e-4 * 128 * 4 * 2 / 512
    cfg.trainer.devices = "auto"
    with pytest.raises(Exception, match="needs an integer trainer.devices"):
        _ = cfg.lr


class _FallingAccuracy(pl.LightningModule):
    """A tiny module whose validation top-1 falls every epoch, so the best epoch is the first."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/student_top1", 10.0 - self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_is_the_last_epoch_even_when_an_earlier_one_was_best(tmp_path):
    from omegaconf import OmegaConf

    from kd_experiments.train import _standard_callbacks

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    cfg = OmegaConf.create({"trainer": {"enable_progress_bar": False}})
    trainer = pl.Trainer(
        max_epochs=3, callbacks=_standard_callbacks(cfg, tmp_path), logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(_FallingAccuracy(), loader, loader)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)


def test_the_final_epoch_is_validated_whatever_the_validation_interval(tmp_path):
    from kd_experiments.callbacks import ValidateFinalEpoch

    class RecordsValidatedEpochs(_FallingAccuracy):
        validated: list[int] = []

        def validation_step(self, batch, batch_idx):
            self.validated.append(self.current_epoch)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=4)
    module = RecordsValidatedEpochs()
    trainer = pl.Trainer(
        max_epochs=7, check_val_every_n_epoch=3, callbacks=[ValidateFinalEpoch()], logger=False,
        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, loader, loader)
    assert module.validated == [2, 5, 6]


def test_the_first_non_finite_loss_term_is_named_with_its_step_and_value():
    from kd_experiments.callbacks import NonFiniteWatch
    from kd_experiments.errors import UserError

    watch = NonFiniteWatch(["ce", "kd"])
    for step, (ce, kd) in enumerate([(1.0, 2.0), (0.5, float("nan")), (float("inf"), float("nan"))]):
        watch.update({"ce": torch.tensor(ce), "kd": torch.tensor(kd)}, step)
        if step == 0:
            watch.raise_if_nonfinite(step)  # all finite: nothing happens
    with pytest.raises(UserError, match=r"^loss term kd became nan at step 1 \(stopped at step 2;"):
        watch.raise_if_nonfinite(2)
