"""Any student on any data, as written: every method with the default student, a two-headed DeiT-Ti and
a CIFAR ResNet either trains on the embedded digits or refuses in one line; a ViT is fitted to the data;
a student config carries the optimizer it needs; a shape mistake stops the run before any teacher is
trained or any statistics pass starts."""

import json
from pathlib import Path

import pytest

from kd_experiments.errors import UserError
from kd_experiments.models import built_name, create_model, fitted_patch_size
from kd_experiments.train import train
from tests.conftest import REPO, compose_config

# The classification methods (a YAML with `task: detection` or `multilabel` has its own tests).
METHODS = sorted(p.stem for p in (REPO / "conf/method").glob("*.yaml") if "\ntask:" not in p.read_text())
STUDENTS = ["convnet_narrow", "deit_ti", "resnet8"]
ONE_HEAD = r"trains a distillation head \(distill_logits\), but .* has one head; use a two-headed DeiT"
# The pairs that cannot work, and the reason they give (everything else must train).
REFUSED = {
    ("deit", "convnet_narrow"): ONE_HEAD,
    ("deit", "resnet8"): ONE_HEAD,
    ("deit++", "convnet_narrow"): ONE_HEAD,
    ("deit++", "resnet8"): ONE_HEAD,
    ("reviewkd", "deit_ti"): "ReviewKD matches student and teacher levels one to one",
    ("reviewkd++", "deit_ti"): "ReviewKD matches student and teacher levels one to one",
}


def quick(project_dir: Path, out: Path, *overrides: str):
    return compose_config(
        *overrides, "logger=none", "trainer.max_epochs=1", "++trainer.limit_train_batches=2",
        "++trainer.limit_val_batches=1", "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false", f"paths.root_dir={project_dir}", f"paths.output_dir={out}",
    )  # fmt: skip


def test_every_refused_pair_is_a_real_method_and_student():
    assert {method for method, _ in REFUSED} <= set(METHODS)
    assert {student for _, student in REFUSED} <= set(STUDENTS)


@pytest.mark.parametrize("student", STUDENTS)
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_or_refuses_the_student_in_one_line(method, student, project_dir, tmp_path):
    cfg = quick(project_dir, tmp_path / "run", f"method={method}", f"student={student}")
    reason = REFUSED.get((method, student))
    if reason is not None:
        with pytest.raises(UserError, match=reason) as refused:
            train(cfg)
        assert "\n" not in str(refused.value)
        return
    train(cfg)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["teacher_source"] == "cache"
    if student == "deit_ti":  # fitted to the 8 px digits: patch 4, and the summary says so
        assert summary["student"] == "deit_tiny_distilled_patch4_8"
        assert summary["student_arch"] == "deit_tiny_distilled_patch16_224"


def test_a_vit_is_fitted_to_the_data_unless_its_size_is_set():
    assert [fitted_patch_size(size, 224, 16) for size in (8, 16, 32, 64, 96, 224)] == [4, 4, 4, 8, 12, 16]
    assert fitted_patch_size(4, 224, 16) == 2 and fitted_patch_size(8, 224, 16, multiple=2) == 4
    deit = create_model("deit_tiny_distilled_patch16_224", 10, in_chans=1, image_size=8)
    assert deit.patch_embed.img_size == (8, 8) and deit.patch_embed.patch_size == (4, 4)
    assert built_name("deit_tiny_distilled_patch16_224", deit) == "deit_tiny_distilled_patch4_8"
    same = create_model("deit_tiny_distilled_patch16_224", 10, image_size=224)
    assert built_name("deit_tiny_distilled_patch16_224", same) == "deit_tiny_distilled_patch16_224"
    chosen = create_model("deit_tiny_distilled_patch16_224", 10, image_size=32, img_size=32, patch_size=8)
    assert chosen.patch_embed.patch_size == (8, 8)
    stem = create_model("deit_ti_convstem", 10, in_chans=1, image_size=8)  # conv stem: even patches
    assert stem.patch_embed.patch_size == (4, 4)
    assert built_name("deit_ti_convstem", stem) == "deit_ti_convstem (8 px, patch 4)"
    cnn = create_model("resnet8", 10, in_chans=1, image_size=8)  # takes any size: unchanged
    assert built_name("resnet8", cnn) == "resnet8" and not hasattr(cnn, "fitted_input")


def test_a_vit_student_config_brings_adamw_and_a_warmup_which_recipes_and_the_command_line_override():
    vit = compose_config("student=deit_ti")
    assert vit.optimizer.opt == "adamw" and vit.scheduler._target_ == "timm.scheduler.CosineLRScheduler"
    assert vit.student.taps.kd_logits == "distill_logits" and vit.student.taps.feature == "patch_mean"
    assert (vit.trainer.max_epochs, vit.trainer.check_val_every_n_epoch) == (150, 5)
    assert compose_config("student=resnet8").trainer.check_val_every_n_epoch == 1
    vkd_recipe = compose_config("experiment=vkd_imagenet_regnety_160_deit_ti_convstem")
    assert (vkd_recipe.trainer.max_epochs, vkd_recipe.trainer.check_val_every_n_epoch) == (300, 1)
    assert compose_config("student=deit_ti", "optimizer=sgd").optimizer.opt == "momentum"
    assert compose_config("student=resnet8").optimizer.opt == "momentum"
    recipe = compose_config("experiment=kd_cifar100_resnet32x4_resnet8x4", "student=deit_ti")
    assert recipe.optimizer.opt == "momentum" and list(recipe.scheduler.milestones) == [150, 180, 210]


def test_a_shape_mistake_stops_before_the_teacher_is_trained(project_dir, tmp_path):
    # teacher.seed=7 has no cached teacher, so anything after the probe would train one for 60 epochs.
    cache = tmp_path / "teachers"
    cfg = quick(
        project_dir, tmp_path / "run", "method=kd++", "teacher.seed=7",
        f"paths.teacher_cache_dir={cache}", "student.arch=deit_tiny_patch16_224",
        "+student.model_kwargs.img_size=224",
    )  # fmt: skip
    with pytest.raises(
        UserError, match=r"the student \(VisionTransformer\) fails on one batch of digits"
    ) as e:
        train(cfg)
    assert "(1, 8, 8)" in str(e.value) and "\n" not in str(e.value)
    assert not cache.exists() or not any(cache.rglob("*.pt"))  # no teacher, no statistics


def test_a_method_mistake_stops_before_the_teacher_and_its_statistics(project_dir, tmp_path):
    # FitNet's hint layer is checked against the networks' stages when the probe sizes the regressor.
    cache = tmp_path / "teachers"
    cfg = quick(
        project_dir, tmp_path / "run", "method=fitnet", "teacher.seed=7", f"paths.teacher_cache_dir={cache}",
        "method.objectives.fitnet.hint_layer=9",
    )  # fmt: skip
    with pytest.raises(UserError, match="method.objectives.fitnet: FitNet hint_layer 9 is out of range"):
        train(cfg)
    assert not cache.exists() or not any(cache.rglob("*.pt"))
